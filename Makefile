# The entry points of README.md. Each creates .venv and installs vitopt when missing.
PYTHON ?= python3
VENV   := .venv
STAMP  := $(VENV)/.installed-stamp

.PHONY: quickstart test gpu-wheels readme-numbers

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

## quickstart: train, sparse-train, prune, fine-tune, export and validate a ViT on the embedded digits.
quickstart: $(STAMP)
	$(VENV)/bin/vitopt run recipes/quickstart.yaml

## test: lint (ruff) and the whole test suite (CPU).
test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/python -m pytest -q

## gpu-wheels: download the wheels benchmarks/gpu_check.py needs (besides PyTorch) for CPython 3.12 on
## manylinux x86-64 into .whl/ (ignored by git), for a GPU machine without a package registry.
GPU_WHEEL_PLATFORMS := --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64
gpu-wheels:
	$(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--abi cp312 --abi abi3 --abi none $(GPU_WHEEL_PLATFORMS) -d .whl -r benchmarks/gpu_requirements.txt
	@ls .whl | wc -l | xargs echo "wheels in .whl/:"

## readme-numbers: print the README's result tables from benchmarks/results/*.json (each with its marker line),
## then check the marked tables of README.md against those files.
readme-numbers: $(STAMP)
	$(VENV)/bin/python benchmarks/readme_numbers.py
	$(VENV)/bin/python benchmarks/readme_numbers.py --check README.md
