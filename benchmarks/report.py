"""Refresh the README's results section from the JSON under ``benchmarks/results/``.

Every script that writes its tables as markdown (``common.write_results``)
appears, in the order of ``SECTIONS``; ``make bench`` runs the scripts and then
this. Only the default (small) size is shown: the full-size files sit beside
them and ``benchmarks/README.md`` discusses both.

    python benchmarks/report.py [--readme README.md]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
SECTIONS = {  # results file stem: what it measures
    "throughput": "Throughput against the physical limit (`benchmarks/throughput.py`)",
    "memory": "Peak memory at 1x and more data (`benchmarks/memory.py`)",
    "fact_tracing_easy": "Fact-tracing quality (`benchmarks/fact_tracing.py`)",
    "query": "LanceDB query latency (`benchmarks/query.py`)",
    "scaling": "Build scaling over workers on a 2-node cluster (`benchmarks/scaling.py`)",
    "peers": "Side by side with Bergson and kronfluence (`benchmarks/peers.py`)",
    "peer_fidelity": "Stored rows against exact gradients, beside Bergson's index (`benchmarks/peer_fidelity.py`)",
    "same_job": "`rayattr build` against `bergson build` on the same job (`benchmarks/same_job.py`)",
    "feature_cost": "What each loss and view costs against a plain build (`benchmarks/feature_cost.py`)",
    "train_time": "Train-time collection overhead against plain HF training (`benchmarks/train_time.py`)",
    "trackstar_storage_hard": "TrackStar recall against the bytes stored per example (`benchmarks/trackstar_storage.py`)",
    "lds": "Counterfactual truth: the LDS of each method, Adam fine-tune (`benchmarks/lds.py`)",
    "lds_sgd": "Counterfactual truth: the LDS of each method, SGD fine-tune (`benchmarks/lds.py --optimizer sgd`)",
}
START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def section() -> str:
    """The markdown between the README's markers."""
    parts = ["Refreshed by `make bench` (small sizes; `--size full` results and how each number is "
             "measured are in `benchmarks/README.md`)."]
    for stem, heading in SECTIONS.items():
        path = RESULTS / f"{stem}.json"
        record = json.loads(path.read_text()) if path.exists() else {}
        if "markdown" not in record:  # not run yet, or written before the scripts kept markdown
            continue
        parts.append(f"### {heading}\n\n{record.get('date', '')}, {record['machine']}.\n\n" + "\n\n".join(record["markdown"]))
    return "\n\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readme", default=str(Path(__file__).parent.parent / "README.md"))
    args = parser.parse_args()
    readme = Path(args.readme)
    text = readme.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{readme} has no {START} ... {END} markers to refresh between")
    head, rest = text.split(START, 1)
    tail = rest.split(END, 1)[1]
    readme.write_text(f"{head}{START}\n{section()}\n{END}{tail}")
    print(f"refreshed {readme}")


if __name__ == "__main__":
    main()
