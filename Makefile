# Two entry points for a fresh machine: `make demo` and `make test`. Both create .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU torch pin lives here (constraints/cpu.txt), not in the package: GPU users keep their torch.
PIP_INSTALL := $(BIN)/pip install -c constraints/cpu.txt

.PHONY: venv demo lint test clean

$(BIN)/embedkit: pyproject.toml constraints/cpu.txt
	$(PY) -m venv $(VENV)
	$(PIP_INSTALL) -q torch==2.13.0
	$(PIP_INSTALL) -q -e '.[test,plot,lint,st]'
	touch $@

venv: $(BIN)/embedkit

demo: venv
	$(BIN)/embedkit fit

# the lint gate: pyflakes, import order, bugbear, complexity (rules in pyproject.toml)
lint: venv
	$(BIN)/ruff check embedkit tests bench

test: venv lint
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) runs build *.egg-info
