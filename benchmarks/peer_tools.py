"""The peers' side of ``peers.py``: their virtual environments, their inputs, their score files.

Bergson and kronfluence only ever run as subprocesses of their own
environments, never imported next to rayattr. This module therefore imports
nothing but the standard library at the top, and numpy and pyarrow (present in
both peer environments and in rayattr's) where needed: run as a script
with the kronfluence environment's Python, it is the kronfluence runner
(``kronfluence_scores``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# Renders [prompt, completion] as prompt + completion, exactly as rayattr joins them.
CONCAT_TEMPLATE = "{% for message in messages %}{{ message['content'] }}{% endfor %}"


@dataclass(frozen=True)
class Peer:
    """A peer pinned to one release; installed without its pins, then with the runtime deps it imports."""

    name: str
    version: str
    deps: tuple[str, ...]


PEERS = {
    "bergson": Peer("bergson", "2.5.1", (
        "accelerate", "datasets", "jinja2", "jaxtyping>=0.3.3", "ml_dtypes", "natsort", "numpy", "scipy", "peft>=0.17",
        "petname", "pyarrow", "pyyaml", "simple-parsing", "torchopt", "transformers>=5", "huggingface-hub>=1.13",
    )),
    "kronfluence": Peer("kronfluence", "1.0.1", (
        "accelerate", "einops", "einconv", "opt-einsum", "safetensors", "tqdm", "transformers", "numpy", "scipy",
        "pyarrow",
    )),
}


def installed_version(python: Path, package: str) -> str | None:
    """``package``'s version in the environment of ``python``, or None."""
    if not python.exists():
        return None
    probe = subprocess.run([str(python), "-c", f"import importlib.metadata as m; print(m.version({package!r}))"],
                           capture_output=True, text=True)
    return probe.stdout.strip() if probe.returncode == 0 else None


def ensure_venv(peer: Peer, root: Path, torch_spec: str, install: bool) -> Path:
    """The peer's environment under ``root``, (re)made unless the pinned version is already there."""
    venv = root / peer.name
    python = venv / "bin" / "python"
    found = installed_version(python, peer.name)
    if found == peer.version:
        return venv
    if not install:
        raise SystemExit(f"{venv} has {peer.name} {found or 'not installed'}, not {peer.version}; "
                         "run without --skip-install to make it")
    print(f"installing {peer.name} {peer.version} into {venv}", flush=True)
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "--quiet"]
    subprocess.run(pip + [torch_spec], check=True)
    subprocess.run(pip + ["--no-deps", f"{peer.name}=={peer.version}"], check=True)
    subprocess.run(pip + list(peer.deps), check=True)
    return venv


def peer_env(venv: Path) -> dict[str, str]:
    """The environment a peer runs in: its own bin first, no inherited Python paths, CPU, offline."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    return env | {"PATH": f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", "VIRTUAL_ENV": str(venv),
                  "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                  "TOKENIZERS_PARALLELISM": "false"}


def run_steps(steps: list[tuple[str, list[str]]], log: Path, env: dict[str, str] | None = None) -> dict[str, float]:
    """Run each ``(name, argv)`` in order, output appended to ``log``; seconds per step.

    A failing step stops the benchmark with the end of its log: the peers'
    errors are only legible in their own words.
    """
    seconds = {}
    log.parent.mkdir(parents=True, exist_ok=True)
    for name, argv in steps:
        with log.open("a") as out:
            out.write(f"\n$ {' '.join(argv)}\n")
            out.flush()
            start = time.perf_counter()
            code = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, env=env).returncode
        seconds[name] = time.perf_counter() - start
        if code:
            tail = "\n".join(log.read_text().splitlines()[-40:])
            raise SystemExit(f"step {name!r} failed with exit status {code}; end of {log}:\n{tail}")
    return seconds


def bergson_inputs(train: Path, queries: Path, model: Path, out: Path) -> tuple[Path, Path, Path]:
    """jsonl copies of the fixture (Bergson reads no parquet) and a model copy with a chat template.

    Bergson's prompt/completion path goes through the tokenizer's chat
    template; ``CONCAT_TEMPLATE`` makes that the plain concatenation rayattr
    tokenizes. ``optimizer.pt`` stays behind, so neither tool gets a normalizer
    from the fine-tune's optimizer state.
    """
    import pyarrow.parquet as pq

    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, source, columns in (("train", train, ["text"]), ("queries", queries, ["prompt", "completion"])):
        files[name] = out / f"{name}.jsonl"
        rows = pq.read_table(source, columns=columns).to_pylist()
        files[name].write_text("".join(json.dumps(row) + "\n" for row in rows))
    copy = out / "model"
    if not copy.exists():
        shutil.copytree(model, copy, ignore=shutil.ignore_patterns("optimizer.pt", "optimizer_param_names.json"))
        # transformers reads chat_template.jinja before tokenizer_config.json: replace the template in both
        (copy / "chat_template.jinja").write_text(CONCAT_TEMPLATE)
        config = json.loads((copy / "tokenizer_config.json").read_text())
        (copy / "tokenizer_config.json").write_text(json.dumps(config | {"chat_template": CONCAT_TEMPLATE}, indent=1))
    return files["train"], files["queries"], copy


def bergson_scores(scores_dir: Path, num_queries: int):
    """``[queries, train rows]`` from a Bergson ``score`` directory (a structured memmap described by info.json)."""
    import numpy as np

    info = json.loads((scores_dir / "info.json").read_text())
    layout = info["dtype"]
    dtype = np.dtype({key: layout[key] for key in ("names", "formats", "offsets", "itemsize")})
    table = np.memmap(scores_dir / "scores.bin", dtype=dtype, mode="r")
    if not all(table[f"written_{q}"].all() for q in range(num_queries)):
        raise SystemExit(f"{scores_dir} is incomplete: some scores were never written")
    return np.stack([np.asarray(table[f"score_{q}"], np.float64) for q in range(num_queries)])


def kronfluence_scores(model_dir: str, train: str, queries: str, out: str, empirical: bool, batch_size: int) -> None:
    """EK-FAC pairwise scores ``[queries, train rows]`` with kronfluence, saved as .npy.

    Loss and measurement are the summed causal-LM cross-entropy over label
    tokens: every token after the first of a training document, the
    completion of a query (its prompt masked), as rayattr computes them. Every
    Linear but the output head is tracked; damping is kronfluence's heuristic
    (``None``: 0.1 x the mean eigenvalue).
    """
    import numpy as np
    import pyarrow.parquet as pq
    import torch
    import torch.nn.functional as F
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task
    from kronfluence.utils.dataset import DataLoaderKwargs
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)  # the true Fisher's sampled labels
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    texts = pq.read_table(train, columns=["text"]).column("text").to_pylist()
    train_docs = [(ids, ids) for ids in tokenizer(texts)["input_ids"]]
    rows = pq.read_table(queries, columns=["prompt", "completion"]).to_pylist()
    prompts = tokenizer([r["prompt"] for r in rows])["input_ids"]
    completions = tokenizer([r["completion"] for r in rows], add_special_tokens=False)["input_ids"]
    query_docs = [(p + c, [-100] * len(p) + c) for p, c in zip(prompts, completions)]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def collate(docs):
        width = max(len(ids) for ids, _ in docs)
        def padded(seq, fill):
            return torch.tensor([s + [fill] * (width - len(s)) for s in seq])
        return {"input_ids": padded([ids for ids, _ in docs], pad), "labels": padded([lab for _, lab in docs], -100),
                "attention_mask": padded([[1] * len(ids) for ids, _ in docs], 0)}

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    head = model.get_output_embeddings()
    tracked = [name for name, module in model.named_modules()
               if isinstance(module, torch.nn.Linear) and module is not head]

    class CausalLM(Task):
        def compute_train_loss(self, batch, model, sample=False):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
            labels = batch["labels"][:, 1:]
            if sample:  # true Fisher: labels drawn from the model where the data has one
                with torch.no_grad():
                    drawn = torch.distributions.Categorical(logits=logits.detach()).sample()
                labels = torch.where(labels == -100, labels, drawn)
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
                                   reduction="sum")

        def compute_measurement(self, batch, model):
            return self.compute_train_loss(batch, model)

        def get_influence_tracked_modules(self):
            return tracked

        def get_attention_mask(self, batch):
            return batch["attention_mask"]

    task = CausalLM()
    work = Path(out).parent / "kronfluence"
    analyzer = Analyzer("fixture", prepare_model(model, task), task, cpu=True, output_dir=str(work), disable_tqdm=True)
    analyzer.set_dataloader_kwargs(DataLoaderKwargs(collate_fn=collate))
    factors = "empirical" if empirical else "true"
    analyzer.fit_all_factors(factors, train_docs, per_device_batch_size=batch_size, overwrite_output_dir=True,
                             factor_args=FactorArguments(strategy="ekfac", use_empirical_fisher=empirical))
    analyzer.compute_pairwise_scores(f"scores-{factors}", factors, query_docs, train_docs, overwrite_output_dir=True,
                                     per_device_query_batch_size=len(query_docs),
                                     per_device_train_batch_size=batch_size,
                                     score_args=ScoreArguments(damping_factor=None))
    scores = analyzer.load_pairwise_scores(f"scores-{factors}")["all_modules"]
    np.save(out, scores.double().numpy())


def main() -> None:
    parser = argparse.ArgumentParser(description="kronfluence runner (run with the kronfluence environment's Python)")
    parser.add_argument("--model", required=True)
    parser.add_argument("--train", required=True)
    parser.add_argument("--queries", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--fisher", choices=["empirical", "true"], default="empirical")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    kronfluence_scores(args.model, args.train, args.queries, args.out, args.fisher == "empirical", args.batch_size)


if __name__ == "__main__":
    main()
