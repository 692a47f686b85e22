"""Optimizer-style second-moment normalizers, applied to each per-example gradient.

- Adam: ``G / (sqrt(v) + eps)`` elementwise. It needs the full ``G`` of each
  example, so the collector forms it (per module, per batch) before projecting.
- Adafactor: row/column second moments ``r[O]``, ``c[I]`` give
  ``G / sqrt(r c^T / mean(r))``, which factors into a row scaling of the output
  gradients ``g`` and a column scaling of the activations ``a``. It therefore
  composes with the Kronecker projection and never forms ``G``.

Sources: an optimizer state (``optimizer.pt`` of an HF Trainer checkpoint,
loaded with ``weights_only=True``) or moments fitted from data. Normalizers are
saved as safetensors plus a JSON manifest; their fingerprint goes into every
table built with them, so a query and an index normalized differently are
never compared.
"""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn
from transformers.pytorch_utils import Conv1D

from rayattr import storage
from rayattr.config import RayattrError, stable_hash

NormalizerKind = Literal["adam", "adafactor"]
MANIFEST = "normalizer.json"
TENSORS = "normalizer.safetensors"
ADAM_EPS = 1e-8
ADAFACTOR_EPS = 1e-30


@dataclass
class Normalizer:
    """Per-module second moments: ``{"v": [O, I]}`` (Adam) or ``{"row": [O], "col": [I]}`` (Adafactor)."""

    kind: NormalizerKind
    moments: dict[str, dict[str, torch.Tensor]]
    source: str = ""

    @property
    def fingerprint(self) -> str:
        """Identity of the numbers themselves (kind + a digest of every moment)."""
        digest = {
            name: {key: f"{t.double().sum().item():.9e}/{t.double().square().sum().item():.9e}/{tuple(t.shape)}"
                   for key, t in sorted(tensors.items())}
            for name, tensors in sorted(self.moments.items())
        }
        return stable_hash({"kind": self.kind, "moments": digest})

    def to_adafactor(self) -> Normalizer:
        """Reduce Adam moments to Adafactor row/column means (memory O(O + I) per module)."""
        if self.kind == "adafactor":
            return self
        moments = {name: {"row": m["v"].mean(1), "col": m["v"].mean(0)} for name, m in self.moments.items()}
        return Normalizer("adafactor", moments, f"{self.source} (adam reduced to adafactor)")

    def factors(self, module: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | torch.Tensor:
        """What the collector multiplies by: Adafactor ``(row scale of g [O], col scale of a [I])``,
        Adam the elementwise ``1 / (sqrt(v) + eps)`` ``[O, I]``."""
        if module not in self.moments:
            raise RayattrError(f"the normalizer ({self.source}) has no moments for module {module!r}; "
                               "fit or load it for the same module selection")
        m = self.moments[module]
        if self.kind == "adam":
            return (1.0 / (m["v"].float().sqrt() + ADAM_EPS)).to(device)
        row, col = m["row"].double() + ADAFACTOR_EPS, m["col"].double() + ADAFACTOR_EPS
        row_scale = (row.mean() / row).sqrt()
        return row_scale.float().to(device), col.rsqrt().float().to(device)

    def check_shapes(self, shapes: dict[str, tuple[int, int]]) -> None:
        """Every selected module has moments of its ``(out, in)`` shape."""
        for name, (out_features, in_features) in shapes.items():
            m = self.moments.get(name)
            expected = {"v": (out_features, in_features)} if self.kind == "adam" else {"row": (out_features,), "col": (in_features,)}
            got = None if m is None else {k: tuple(v.shape) for k, v in m.items()}
            if got != expected:
                raise RayattrError(
                    f"normalizer ({self.source}) does not fit module {name!r}: expected moments {expected}, found {got}; "
                    "it was made for another model or module selection"
                )

    def save(self, directory: str | Path) -> None:
        """Tensors first, manifest last: a directory with a manifest is complete."""
        flat = {f"{name}::{key}": t.contiguous().float() for name, m in self.moments.items() for key, t in m.items()}
        storage.write_bytes(storage.join(str(directory), TENSORS), save_safetensors(flat))
        manifest = {"kind": self.kind, "source": self.source, "fingerprint": self.fingerprint, "modules": sorted(self.moments)}
        storage.write_bytes(storage.join(str(directory), MANIFEST), json.dumps(manifest, indent=2).encode())

    @classmethod
    def load(cls, directory: str | Path) -> Normalizer:
        """Load from safetensors + JSON only; the stored fingerprint must match the numbers."""
        manifest_uri, tensors_uri = storage.join(str(directory), MANIFEST), storage.join(str(directory), TENSORS)
        if not storage.exists(manifest_uri) or not storage.exists(tensors_uri):
            raise RayattrError(f"{directory} is not a normalizer directory (no {MANIFEST}/{TENSORS}); "
                               "create one with `rayattr normalizer`")
        manifest = json.loads(storage.read_bytes(manifest_uri))
        moments: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in load_safetensors(storage.read_bytes(tensors_uri)).items():
            name, part = key.rsplit("::", 1)
            moments.setdefault(name, {})[part] = tensor
        normalizer = cls(manifest["kind"], moments, manifest.get("source", str(directory)))
        if normalizer.fingerprint != manifest["fingerprint"]:
            raise RayattrError(f"normalizer in {directory} does not match its manifest fingerprint (corrupt or edited); recreate it")
        return normalizer


def from_optimizer_state(
    path: str | Path, model: nn.Module, kind: NormalizerKind = "adafactor", include_bias: bool = False
) -> Normalizer:
    """Moments of the model's Linear/Conv1D weights from an AdamW or Adafactor state dict.

    With ``include_bias`` a biased module's moments are ``[v_W | v_b]``, laid
    out like the collector's ``[G | g_b]``; only an unfactored (Adam) state
    holds the bias column's moments exactly.

    Parameter order: ``optimizer_param_names.json`` beside the file when present,
    else the HF Trainer's order (decayed weights first, then biases and norms),
    else plain ``named_parameters`` order; the first order whose shapes all match
    is used, so a state from another model is refused instead of mis-mapped.
    """
    path = Path(path)
    if not path.exists():
        raise RayattrError(f"optimizer state {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # never runs code from the file
    except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
        raise RayattrError(
            f"{path} is not a plain optimizer state: {str(exc).splitlines()[0]}. Only tensors and plain containers "
            "are loaded (torch.load weights_only=True); pass the optimizer.pt an HF Trainer checkpoint holds"
        ) from exc
    if not isinstance(state, dict) or "state" not in state or "param_groups" not in state:
        raise RayattrError(f"{path} is not a torch optimizer state_dict (no 'state'/'param_groups')")
    indices = [i for group in state["param_groups"] for i in group["params"]]
    names = _match_order(path, state["state"], indices, model)
    entries = [(name, state["state"][index]) for index, name in zip(indices, names) if index in state["state"]]
    normalizer = _from_entries(entries, model, kind, include_bias, str(path))
    if normalizer is None:
        raise RayattrError(f"{path} has no second moments (exp_avg_sq / exp_avg_sq_row) for any Linear/Conv1D weight")
    return normalizer


def from_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module, kind: NormalizerKind = "adafactor",
                   include_bias: bool = False) -> Normalizer | None:
    """The moments a live optimizer holds now (None before its first step has made any): what a
    training run normalizes the rows of its next step by."""
    # By module, not by parameter name: a tied output head (GPT-2's lm_head) is listed under the embedding.
    entries = [(f"{module_name}.{leaf}", optimizer.state[param]) for module_name, module in model.named_modules()
               if isinstance(module, (nn.Linear, Conv1D)) for leaf, param in module.named_parameters(recurse=False)
               if optimizer.state.get(param)]
    return _from_entries(entries, model, kind, include_bias, f"{type(optimizer).__name__} (live)")


def _from_entries(entries: list[tuple[str, dict]], model: nn.Module, kind: NormalizerKind, include_bias: bool,
                  source: str) -> Normalizer | None:
    """Moments of the model's Linear/Conv1D weights from ``(parameter name, optimizer state)`` pairs."""
    weights = {name: module for name, module in model.named_modules() if isinstance(module, (nn.Linear, Conv1D))}
    moments: dict[str, dict[str, torch.Tensor]] = {}
    bias_moments: dict[str, torch.Tensor] = {}
    for name, entry in entries:
        module_name, _, leaf = name.rpartition(".")
        if module_name not in weights:
            continue
        if leaf == "bias" and include_bias and "exp_avg_sq" in entry:
            bias_moments[module_name] = entry["exp_avg_sq"].float()
        if leaf != "weight":
            continue
        transposed = isinstance(weights[module_name], Conv1D)  # stored [in, out]
        if "exp_avg_sq" in entry:
            v = entry["exp_avg_sq"].detach().float()
            moments[module_name] = {"v": v.T if transposed else v}
        elif "exp_avg_sq_row" in entry:
            row, col = entry["exp_avg_sq_row"].detach().float(), entry["exp_avg_sq_col"].detach().float()
            moments[module_name] = {"row": col, "col": row} if transposed else {"row": row, "col": col}
            if kind == "adam":
                raise RayattrError(f"{source} holds Adafactor (factored) moments; use --kind adafactor")
    if not moments:
        return None
    if include_bias:
        _append_bias_moments(source, moments, bias_moments, weights)
    factored = "row" in next(iter(moments.values()))
    normalizer = Normalizer("adafactor" if factored else "adam", moments, source)
    return normalizer.to_adafactor() if kind == "adafactor" else normalizer


def _append_bias_moments(
    path: Path | str, moments: dict[str, dict[str, torch.Tensor]], bias_moments: dict[str, torch.Tensor],
    weights: dict[str, nn.Module],
) -> None:
    """``v <- [v | v_b]`` for every biased module, in place."""
    for name, m in moments.items():
        if getattr(weights[name], "bias", None) is None:
            continue
        if "v" not in m or name not in bias_moments:
            raise RayattrError(
                f"{path} holds no unfactored second moment for {name}'s weight and bias, which --include-bias needs; "
                "fit the normalizer from data (`rayattr normalizer`) or leave out --include-bias"
            )
        m["v"] = torch.cat([m["v"], bias_moments[name][:, None]], dim=1)


def _match_order(path: Path, state: dict, indices: list[int], model: nn.Module) -> list[str]:
    """Parameter names in optimizer order, checked against every state tensor's shape."""
    params = dict(model.named_parameters())
    names_file = path.parent / "optimizer_param_names.json"
    candidates = []
    if names_file.exists():
        candidates.append(json.loads(names_file.read_text()))
    # The HF Trainer's groups: weights that decay, then biases and the parameters of norm layers
    # (found by module type, as GPT-2's ln_1 is named without "norm").
    norms = {name for name, module in model.named_modules() if "norm" in type(module).__name__.lower()}
    no_decay = [n for n in params if n.endswith("bias") or "norm" in n.lower() or n.rpartition(".")[0] in norms]
    candidates.append([n for n in params if n not in no_decay] + no_decay)
    candidates.append(list(params))
    for names in candidates:
        if len(names) == len(indices) and all(_shape_fits(state.get(i), params.get(n)) for i, n in zip(indices, names)):
            return names
    raise RayattrError(
        f"optimizer state {path} does not match the model: its {len(indices)} entries and their shapes fit no "
        f"ordering of the model's {len(params)} parameters; use the optimizer state saved with this model "
        "(or put optimizer_param_names.json beside it)"
    )


def _shape_fits(entry: dict | None, param: nn.Parameter | None) -> bool:
    if param is None:
        return False
    if not entry:
        return True  # no step taken for this parameter yet
    if "exp_avg_sq" in entry:
        return tuple(entry["exp_avg_sq"].shape) == tuple(param.shape)
    if "exp_avg_sq_row" in entry:
        return tuple(entry["exp_avg_sq_row"].shape) + tuple(entry["exp_avg_sq_col"].shape) == tuple(param.shape)
    return True  # no second moment to check (e.g. a bias under Adafactor without factoring)
