"""Checkpoints of partial statistics, so an interrupted fit resumes instead of starting over.

Each worker of a statistics pass saves, every so often and when it is done,
its running sums together with the ids of the documents they cover, as one
safetensors file of its own (written atomically, so a file always holds a
consistent pair). A rerun of the same pass reads those files, streams only
the documents they do not cover, and reduces old and new sums together. The
files live under ``OUT_DIR/_partial/<pass key>``; the key hashes the run spec,
the method and the eigenbases a pass uses, so files of another pass are never
mixed in. They are removed once the statistics are saved.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from rayattr import storage
from rayattr.config import RunSpec, stable_hash, to_dict
from rayattr.hessian.stats import Sums

PARTIALS_DIR = "_partial"
IDS_KEY = "__ids__"
SEPARATOR = "::"


@dataclass
class Partial:
    """Sums over a set of documents, and their ids."""

    sums: Sums
    ids: np.ndarray


def pass_directory(out_dir: str, spec: RunSpec, method: str, eigenbases: Sums | None) -> str:
    """Where the partial sums of one pass live; any change of data, model, gradients or bases changes it."""
    bases = None if eigenbases is None else {
        f"{module}{SEPARATOR}{key}": f"{t.double().sum().item():.12e}/{t.double().square().sum().item():.12e}"
        for module, tensors in sorted(eigenbases.items()) for key, t in sorted(tensors.items())
    }
    return storage.join(out_dir, PARTIALS_DIR, f"{method}-{stable_hash({'spec': to_dict(spec), 'bases': bases})}")


def load_partials(directory: str) -> list[Partial]:
    """Every partial saved in ``directory`` (none when it does not exist)."""
    partials = []
    for name in storage.list_files(directory, ".safetensors"):
        flat = load_safetensors(storage.read_bytes(storage.join(directory, name)))
        ids = flat.pop(IDS_KEY).numpy()
        sums: Sums = {}
        for key, tensor in flat.items():
            module, _, leaf = key.rpartition(SEPARATOR)
            sums.setdefault(module, {})[leaf] = tensor
        partials.append(Partial(sums, ids))
    return partials


def remove_partials(out_dir: str) -> None:
    storage.remove_tree(storage.join(out_dir, PARTIALS_DIR))


class PartialWriter:
    """A worker's checkpoint file, rewritten at most every ``every_seconds`` with its running sums."""

    def __init__(self, directory: str, every_seconds: float) -> None:
        self.uri = storage.join(directory, f"{uuid.uuid4().hex}.safetensors")
        self.every_seconds = every_seconds
        self.ids: list[np.ndarray] = []
        self.last = time.monotonic()

    def covered(self, ids: np.ndarray) -> None:
        """Record that the running sums now include these documents."""
        self.ids.append(ids)

    def maybe_save(self, current: Callable[[], Sums], force: bool = False) -> None:
        """Save ``current()`` when a checkpoint is due (or ``force``); the sums are only asked for then."""
        if not self.ids or (not force and time.monotonic() - self.last < self.every_seconds):
            return
        sums = current()
        if any(not tensors for tensors in sums.values()):
            return  # no document with a loss token yet: nothing worth keeping
        flat = {f"{module}{SEPARATOR}{key}": t.contiguous() for module, tensors in sums.items() for key, t in tensors.items()}
        flat[IDS_KEY] = torch.from_numpy(np.concatenate(self.ids).astype(np.int64))
        storage.write_bytes(self.uri, save_safetensors(flat))
        self.last = time.monotonic()
