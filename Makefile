# Two commands: `make train` (set up + quick-start run) and `make test` (set up + test suite).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION := 2.13.0
# Extra index for the CPU build of torch, e.g. TORCH_INDEX=https://download.pytorch.org/whl/cpu on a machine
# whose package index would otherwise serve the CUDA build. Empty: use pip's configured indexes/find-links.
TORCH_INDEX ?=
# Set CPU_ONLY=0 to allow a CUDA build of torch (GPU machines).
CPU_ONLY ?= 1
STAMP := $(VENV)/.lit_nas-installed
CONFIG ?= quickstart.yaml
# TensorFlow (TFLite export) lives in its own environment: its protobuf/numpy pins clash with the training
# stack, and tflite-runtime may not share a process with it anyway. device_bench runs it as a subprocess.
EXPORT_VENV ?= .venv-export
EXPORT_STAMP := $(EXPORT_VENV)/.lit_nas-export-installed

.PHONY: setup export-env pi pi64 data train test lint bench reports docs gpu-check clean

setup: $(STAMP) $(EXPORT_STAMP)

export-env: $(EXPORT_STAMP)

$(EXPORT_STAMP): device_bench/requirements-export.txt
	@test -x $(EXPORT_VENV)/bin/python || $(PYTHON) -m venv $(EXPORT_VENV)
	$(EXPORT_VENV)/bin/python -m pip install -q -r device_bench/requirements-export.txt
	@touch $(EXPORT_STAMP)

# The emulated Raspberry-Pi-like devices (root + binfmt_misc; see device_bench/emulator/build_pi.sh): armv7l with
# tflite-runtime (32-bit Pi OS), aarch64 with LiteRT (today's 64-bit Pi OS).
pi:
	bash device_bench/emulator/build_pi.sh

pi64:
	bash device_bench/emulator/build_pi.sh --arch aarch64

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@# torch first and alone, so nothing later pulls the CUDA build (and its nvidia-* packages).
	@if ! $(PY) -c "import torch" 2>/dev/null; then \
	  $(PIP) install --no-deps "torch==$(TORCH_VERSION)" $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX)) \
	  && $(PIP) install filelock typing-extensions sympy networkx jinja2 fsspec "setuptools>=77.0.3"; fi
	@# torchvision's only other dependencies are numpy and pillow; --no-deps keeps torch as installed.
	$(PIP) install --no-deps "torchvision==0.28.0" && $(PIP) install pillow
	$(PIP) install -e ".[dev,device,study,docs]"
	@if [ "$(CPU_ONLY)" = 1 ]; then $(PY) -c "import sys, torch; \
	  sys.exit(0 if torch.version.cuda is None else 'a CUDA build of torch was installed; rerun with \
	  TORCH_INDEX=<CPU wheel index> after rm -rf $(VENV), or set CPU_ONLY=0')"; fi
	@if $(PIP) list 2>/dev/null | grep -qi '^nvidia-' && [ "$(CPU_ONLY)" = 1 ]; then \
	  echo "error: nvidia-* packages were pulled into $(VENV)"; exit 1; fi
	@touch $(STAMP)

# Fashion-MNIST from Debian's package when we can install it (root + apt); otherwise say what to do.
data:
	@if [ -d /usr/share/datasets/fashion-mnist ]; then echo "Fashion-MNIST: /usr/share/datasets/fashion-mnist"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  (apt-get install -y -q dataset-fashion-mnist || (apt-get update -q && apt-get install -y -q dataset-fashion-mnist)); \
	else echo "Fashion-MNIST is not installed. Run 'sudo apt-get install dataset-fashion-mnist', or put the IDX"; \
	  echo "files in a directory and add '--data.init_args.root DIR' to the train command."; fi

train: setup data
	$(PY) train.py fit --config $(CONFIG)

test: setup
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=20

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# On a machine with one GPU: the gpu-marked tests, then a short search on the GPU and on the CPU (images/s of
# each); its log goes to OUT. No setup here: a GPU machine may have no network, so it runs the Python that
# has torch (.venv's when there is one). Without a GPU it says so and exits 0.
OUT ?= runs/gpu_check
GPU_PYTHON ?= $(if $(wildcard $(PY)),$(PY),$(PYTHON))
gpu-check:
	$(GPU_PYTHON) benchmarks/gpu_check.py --out $(OUT)

# The documentation site (docs/, mkdocs.yml, the docstrings): site/index.html. --strict: a broken link or a
# missing reference fails the build.
docs: setup
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet

# Every committed study report (CSV, markdown, Pareto plots) again from its trial records; git diff shows drift.
reports: setup
	@for spec in studies/*.yaml; do $(PY) study.py report $$spec --no-wandb >/dev/null || exit 1; done
	git status --short studies/results

bench: setup data
	$(PY) benchmarks/throughput.py

clean:
	-bash device_bench/emulator/build_pi.sh --stop 2>/dev/null
	-bash device_bench/emulator/build_pi.sh --stop --arch aarch64 2>/dev/null
	rm -rf $(VENV) $(EXPORT_VENV) runs site .pytest_cache
