"""Loading causal LMs (local paths or hub names) and fingerprinting them; their tokenizers load in ``rayattr.tokenizer``."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from rayattr.config import ModelSpec, RayattrError, stable_hash, verbose
from rayattr.tokenizer import quiet_transformers

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ADAPTER_CONFIG = "adapter_config.json"  # what makes a directory a PEFT adapter
ADAPTER_MODULES = ("*.lora_A.*", "*.lora_B.*")  # the default --modules of an adapter model

def resolve_device(device: str) -> torch.device:
    """``auto`` means the first GPU when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)

def adapter_config(spec: ModelSpec) -> dict | None:
    """The PEFT adapter config when ``spec.model`` is an adapter directory, else None."""
    path = Path(spec.model) / ADAPTER_CONFIG
    if "://" not in spec.model and path.is_file():
        return json.loads(path.read_text())
    if spec.base_model:
        raise RayattrError(f"--base-model is for PEFT adapters, and {spec.model!r} has no {ADAPTER_CONFIG}; drop --base-model")
    return None

def base_of(spec: ModelSpec) -> ModelSpec:
    """The spec of the full model to load: ``spec`` itself, or an adapter's base (``--base-model`` first)."""
    config = adapter_config(spec)
    if config is None:
        return spec
    base = spec.base_model or config.get("base_model_name_or_path")
    if not base:
        raise RayattrError(f"adapter {spec.model!r} names no base model in {ADAPTER_CONFIG}; pass --base-model")
    return dataclasses.replace(spec, model=base, revision=None, base_model=None)

def is_adapted(model: nn.Module) -> bool:
    """Whether ``model`` carries PEFT adapters (their modules are the default gradient modules)."""
    return hasattr(model, "peft_config")

def tokenizer_source(spec: ModelSpec) -> str:
    """Where the tokenizer lives: the model, or an adapter's base when the adapter saved none."""
    if adapter_config(spec) is not None and not (Path(spec.model) / "tokenizer_config.json").is_file():
        return base_of(spec).model
    return spec.model

def load_config(spec: ModelSpec):
    """The (base) model's config alone: a cheap early check that the model exists."""
    from transformers import AutoConfig

    quiet_transformers()
    base = base_of(spec)
    try:
        return AutoConfig.from_pretrained(base.model, revision=base.revision)
    except (OSError, ValueError) as exc:
        raise RayattrError(
            f"cannot load model {base.model!r}: {exc.__class__.__name__}: {str(exc).splitlines()[0]}. "
            "Pass a local directory saved with save_pretrained (or a PEFT adapter directory) or a hub name "
            "reachable from this machine"
        ) from exc

def load_model(spec: ModelSpec) -> nn.Module:
    """The causal LM (with its PEFT adapters, for an adapter directory) in eval mode on its device,
    every parameter frozen."""
    from transformers import AutoModelForCausalLM

    config = load_config(spec)  # also quiets transformers unless --verbose
    base = base_of(spec)
    kwargs = {"revision": base.revision, "dtype": _DTYPES[spec.precision]}
    if spec.attn_implementation:
        kwargs["attn_implementation"] = spec.attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(base.model, config=config, **kwargs)
    except ValueError as exc:
        raise RayattrError(f"model {base.model!r} is not a causal LM ({config.model_type}): {exc}") from exc
    if base is not spec:
        model = _with_adapter(model, spec, base.model)
    set_numerics(spec)
    model.requires_grad_(False)
    return model.eval().to(resolve_device(spec.device))

def set_numerics(spec: ModelSpec) -> None:
    """The process-wide kernel choices a model spec asks for (a worker process runs one model).

    ``force_math_sdp`` turns off the fused scaled-dot-product-attention kernels,
    whose results can depend on the batch's padding; ``use_tf32_matmuls`` lets fp32
    matmuls run in TF32 on GPUs that have it (off: full fp32, PyTorch's default).
    """
    torch.backends.cuda.matmul.allow_tf32 = spec.use_tf32_matmuls
    torch.backends.cudnn.allow_tf32 = spec.use_tf32_matmuls
    fused = not spec.force_math_sdp
    torch.backends.cuda.enable_flash_sdp(fused)
    torch.backends.cuda.enable_mem_efficient_sdp(fused)
    if hasattr(torch.backends.cuda, "enable_cudnn_sdp"):
        torch.backends.cuda.enable_cudnn_sdp(fused)
    torch.backends.cuda.enable_math_sdp(True)

def _with_adapter(model: nn.Module, spec: ModelSpec, base: str) -> nn.Module:
    from peft import PeftModel

    try:
        with quiet_peft():
            return PeftModel.from_pretrained(model, spec.model, revision=spec.revision)
    except (ValueError, RuntimeError, KeyError) as exc:
        raise RayattrError(
            f"adapter {spec.model!r} does not fit base model {base!r} ({type(exc).__name__}: "
            f"{str(exc).strip().splitlines()[0][:200]}); pass the model it was trained on with --base-model"
        ) from exc

@contextlib.contextmanager
def quiet_peft() -> Iterator[None]:
    """PEFT calls transformers APIs that warn of their deprecation; shown with ``--verbose`` only."""
    with warnings.catch_warnings():
        if not verbose():
            warnings.simplefilter("ignore", FutureWarning)
        yield

def model_skeleton(spec: ModelSpec) -> nn.Module:
    """The model's modules on the meta device (names and shapes, no weights), adapters included."""
    from transformers import AutoModelForCausalLM

    config = load_config(spec)
    try:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
            if adapter_config(spec) is not None:
                from peft import PeftConfig, get_peft_model

                with quiet_peft():
                    skeleton = get_peft_model(skeleton, PeftConfig.from_pretrained(spec.model))
    except ValueError as exc:
        raise RayattrError(
            f"the model is not a causal LM ({config.model_type}: {str(exc).splitlines()[0]}); "
            "pass a decoder-only model that AutoModelForCausalLM loads"
        ) from exc
    return skeleton

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
