# Two promises: `make demo` and `make test` work on a fresh clone.
# TORCH pins the CPU build that these machines install from local disk; on a
# GPU machine run e.g. `make TORCH=torch demo` to get a CUDA build instead.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.rayattr-installed

.PHONY: demo test bench bench-peers install clean

install: $(STAMP)

# pip's and setuptools' output goes to $(INSTALL_LOG); its tail is shown when a step fails.
INSTALL_LOG := $(VENV)/install.log
$(STAMP): pyproject.toml
	@echo "rayattr: installing into $(VENV) (log: $(INSTALL_LOG))"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@{ $(PY) -m pip install --upgrade pip && $(PY) -m pip install "$(TORCH)" && $(PY) -m pip install -e ".[dev]"; } \
		> $(INSTALL_LOG) 2>&1 || { tail -n 30 $(INSTALL_LOG); echo "rayattr: install failed, see $(INSTALL_LOG)"; exit 1; }
	@touch $(STAMP)
	@echo "rayattr: installed"

demo: $(STAMP)
	$(PY) examples/demo.py

# Before the tests, what they would otherwise build inside the first test that needs it (cached; seconds
# once built): the offline fixture with its fine-tuned model (~70 s on 2 cores), and DeepSpeed's CPU
# shared-memory op, which DeepSpeed JIT-compiles for each venv on its first ZeRO-3 group (~30 s).
test: $(STAMP)
	@echo "rayattr: preparing the offline fixture and DeepSpeed's CPU op (cached after the first run)"
	@$(PY) -c "from rayattr.fixtures import default_cache_dir, make_fixture, train_fixture_model; \
		train_fixture_model(make_fixture(default_cache_dir()))"
	@$(PY) -c "from deepspeed.accelerator import get_accelerator; \
		op = get_accelerator().create_op_builder('ShareMemCommBuilder'); \
		op is not None and op.is_compatible() and op.load()" >> $(INSTALL_LOG) 2>&1
	$(PY) -m pytest -q --durations=15

# Every benchmark at its small size (~40 min on 2 cores), then the README's results section.
BENCH := PYTHONPATH=benchmarks:. $(PY)
bench: $(STAMP)
	$(PY) -m pip install --quiet -e ".[bench]"
	$(BENCH) benchmarks/throughput.py --size small
	$(BENCH) benchmarks/memory.py --size small
	$(BENCH) benchmarks/fact_tracing.py --size small
	$(BENCH) benchmarks/query.py --size small
	$(BENCH) benchmarks/scaling.py --size small
	$(BENCH) benchmarks/feature_cost.py --size small
	$(BENCH) benchmarks/lds.py --size small
	$(BENCH) benchmarks/lds.py --size small --optimizer sgd
	$(PY) benchmarks/report.py

# rayattr next to Bergson and kronfluence (~40 min on 2 cores); their venvs are made once under ~/.cache/rayattr/peers.
bench-peers: $(STAMP)
	$(PY) -m pip install --quiet -e ".[bench]"
	$(BENCH) benchmarks/peers.py --size small --torch "$(TORCH)"
	$(BENCH) benchmarks/peer_fidelity.py --skip-install
	$(BENCH) benchmarks/same_job.py --size small --skip-install
	$(PY) benchmarks/report.py

clean:
	rm -rf $(VENV) runs .pytest_cache
