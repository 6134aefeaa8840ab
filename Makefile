# The two set-up commands of the README: `make demo` and `make test`. Both create .venv if missing,
# install (idempotent: a stamp file keyed on pyproject.toml and requirements.lock skips a repeat install), then run.
# requirements.lock pins every package the suite last passed with (torch aside: TORCH_SPEC picks its build), so
# a clean clone installs exactly what was tested; `make lock` refreshes it from pyproject's ranges.
PYTHON ?= python3
VENV ?= .venv
# Installed first. Where pip's index serves the CPU build of 2.13.0 by default (as on the project's CI
# machines) that is what it gets; elsewhere see the README. A GPU user sets e.g. TORCH_SPEC="torch==2.14.1".
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.install-stamp
LOCK := requirements.lock
LOCK_VENV := .lock-venv

.PHONY: install demo test clean lock

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml $(LOCK) | $(BIN)/python
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet --constraint $(LOCK) -e ".[test]"
	$(BIN)/python -c "import torch, dpo_eval; print('installed dpo-eval', dpo_eval.__version__, 'torch', torch.__version__)"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/dpo-eval demo --out runs/demo

# Two workers, one test file each at a time (--dist loadfile keeps a module's fixtures, trained models and
# evaluated runs in one process); TEST_WORKERS=0 runs the suite in this process alone.
TEST_WORKERS ?= 2
test: install
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

# The newest releases that pyproject's ranges admit, resolved in a fresh venv and written as exact pins.
# Run the whole suite (`make test`) after it and commit the lock only when it passes.
lock: | $(BIN)/python
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/pip install --quiet --upgrade pip
	$(LOCK_VENV)/bin/pip install --quiet "$(TORCH_SPEC)"
	$(LOCK_VENV)/bin/pip install --quiet ".[test]"
	{ echo "# Exact versions the suite passed with; written by \`make lock\` on $$(date -u +%F). torch is not"; \
	  echo "# here: TORCH_SPEC installs it first (its build, CPU or CUDA, depends on the machine)."; \
	  $(LOCK_VENV)/bin/pip freeze --all --exclude-editable | grep -viE '^(torch|dpo-eval|pip|wheel)([=@ ]|$$)'; \
	} > $(LOCK)
	rm -rf $(LOCK_VENV)

clean:
	rm -rf $(VENV) runs .pytest_cache
