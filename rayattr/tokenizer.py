"""Loading tokenizers, apart from the models: it imports neither torch nor transformers until a
tokenizer is loaded, so a module that only refers to tokenizing (a Ray Data plan) stays light."""

from __future__ import annotations

import functools

from rayattr.config import RayattrError, verbose


def quiet_transformers() -> None:
    """transformers' warnings and weight-loading bars only with ``--verbose`` (``config.verbose``)."""
    from transformers.utils import logging as hf_logging

    if verbose():
        hf_logging.set_verbosity_warning()
        hf_logging.enable_progress_bar()
    else:
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()


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
