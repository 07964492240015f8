# The two commands of the README's quick start:
#   make run    set everything up, then run the main job: benchmarks/throughput.py on 2 emulated
#               nodes (as root; unshaped loopback otherwise)
#   make test   set everything up (Slurm and munge from apt as root, for the Slurm test), then
#               run the test suite
# Both create .venv, install torch==2.13.0 there when no torch is present (CPU wheel, never an
# unpinned torch) and install commlib in editable mode.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.commlib-installed

.PHONY: setup run test kernels bench-kernels docs clean

$(STAMP): pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[test,docs,bench,mpi,deepspeed,privacy,parity,trainers,gpu]"
	touch $(STAMP)

setup: $(STAMP)

kernels: setup
	$(PY) -m commlib.ext build

run: kernels
	$(PY) benchmarks/throughput.py

bench-kernels: kernels
	$(PY) benchmarks/bench_kernels.py

test: kernels
	scripts/install_slurm.sh
	$(PY) -m pytest -q
	COMMLIB_FORCE_PYTHON=1 $(PY) -m pytest -q tests/ops tests/compress

docs: setup
	$(PY) -m mkdocs build --strict

clean:
	rm -rf $(VENV) build site *.egg-info
