"""Loading causal LMs and tokenizers (local paths or hub names) and fingerprinting them."""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from rayattr.config import ModelSpec, RayattrError, stable_hash, verbose

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def quiet_transformers() -> None:
    """transformers' warnings and weight-loading bars only with ``--verbose`` (``config.verbose``)."""
    from transformers.utils import logging as hf_logging

    if verbose():
        hf_logging.set_verbosity_warning()
        hf_logging.enable_progress_bar()
    else:
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()


def resolve_device(device: str) -> torch.device:
    """``auto`` means the first GPU when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_config(spec: ModelSpec):
    """The model's config alone: a cheap early check that the model exists."""
    from transformers import AutoConfig

    quiet_transformers()

    try:
        return AutoConfig.from_pretrained(spec.model, revision=spec.revision)
    except (OSError, ValueError) as exc:
        raise RayattrError(
            f"cannot load model {spec.model!r}: {exc.__class__.__name__}: {str(exc).splitlines()[0]}. "
            "Pass a local directory saved with save_pretrained or a hub name reachable from this machine"
        ) from exc


def load_model(spec: ModelSpec) -> nn.Module:
    """The causal LM in eval mode on its device, every parameter frozen."""
    from transformers import AutoModelForCausalLM

    config = load_config(spec)  # also quiets transformers unless --verbose
    kwargs = {"revision": spec.revision, "dtype": _DTYPES[spec.precision]}
    if spec.attn_implementation:
        kwargs["attn_implementation"] = spec.attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(spec.model, config=config, **kwargs)
    except ValueError as exc:
        raise RayattrError(f"model {spec.model!r} is not a causal LM ({config.model_type}): {exc}") from exc
    model.requires_grad_(False)
    return model.eval().to(resolve_device(spec.device))


@functools.lru_cache(maxsize=4)
def load_tokenizer(name: str, revision: str | None = None):
    """The model's tokenizer, once per process; a pad token is added if missing."""
    from transformers import AutoTokenizer

    quiet_transformers()

    try:
        tokenizer = AutoTokenizer.from_pretrained(name, revision=revision)
    except (OSError, ValueError) as exc:
        raise RayattrError(f"cannot load a tokenizer for {name!r}: {str(exc).splitlines()[0]}") from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def max_positions(model_or_config) -> int:
    """The longest sequence the model accepts, from its config."""
    config = getattr(model_or_config, "config", model_or_config)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


def model_fingerprint(model: nn.Module, spec: ModelSpec) -> dict[str, str]:
    """Identity of a model: its name, revision, config hash and a weights digest.

    The weights digest hashes each parameter's sum and sum of squares, which is
    cheap and changes with any fine-tuning step, so tables from two checkpoints
    of one architecture never look compatible.
    """
    config = model.config.to_dict()
    for volatile in ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "_attn_implementation_autoset"):
        config.pop(volatile, None)
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, param in whole_parameters(model):
            p = param.detach().to("cpu", torch.float64)  # same digest on any device
            digest.update(f"{name}:{tuple(p.shape)}:{p.sum().item():.9e}:{p.square().sum().item():.9e}".encode())
    name = spec.model if "://" in spec.model or not Path(spec.model).exists() else Path(spec.model).name
    return {
        "name": name,
        "revision": spec.revision or "",
        "config": stable_hash(config),
        "weights": digest.hexdigest()[:16],
    }


def whole_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """``named_parameters`` with each parameter whole while the caller reads it.

    A ZeRO-3 partitioned parameter is gathered for that moment and released
    after, so a digest of a partitioned model equals the replica's and no
    worker ever holds the whole model. Gathering is a collective: every worker
    of the group must walk the parameters together.
    """
    for name, param in model.named_parameters():
        if not hasattr(param, "ds_id"):
            yield name, param
            continue
        import deepspeed

        with deepspeed.zero.GatheredParameters([param]):
            yield name, param
