# The entry points of README.md. Each creates .venv and installs vitopt when missing.
PYTHON ?= python3
VENV   := .venv
STAMP  := $(VENV)/.installed-stamp

.PHONY: quickstart test readme-numbers

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

## readme-numbers: print the README's result tables from benchmarks/results/*.json (each with its marker line),
## then check the marked tables of README.md against those files.
readme-numbers: $(STAMP)
	$(VENV)/bin/python benchmarks/readme_numbers.py
	$(VENV)/bin/python benchmarks/readme_numbers.py --check README.md
