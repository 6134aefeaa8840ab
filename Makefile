# The two set-up commands of the README: `make demo` and `make test`. Both create .venv if missing,
# install (idempotent: a stamp file keyed on pyproject.toml skips a repeat install), then run.
PYTHON ?= python3
VENV ?= .venv
# Installed first. Where pip's index serves the CPU build of 2.13.0 by default (as on the project's CI
# machines) that is what it gets; elsewhere see the README. A GPU user sets e.g. TORCH_SPEC="torch==2.14.1".
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.install-stamp

.PHONY: install demo test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[test]"
	$(BIN)/python -c "import torch, dpo_eval; print('installed dpo-eval', dpo_eval.__version__, 'torch', torch.__version__)"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/dpo-eval demo --out runs/demo

test: install
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
