# Two entry points for a fresh machine: `make demo` and `make test`. Both create .venv first.
# `make test` runs `make lint` first (the docker/ files, checked without a Docker engine).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU torch pin lives here (constraints/cpu.txt), not in the package: GPU users keep their torch.
PIP_INSTALL := $(BIN)/pip install -c constraints/cpu.txt

.PHONY: venv demo lint test faults docker-smoke device-wheels clean

$(BIN)/embedkit: pyproject.toml constraints/cpu.txt
	$(PY) -m venv $(VENV)
	$(PIP_INSTALL) -q torch==2.13.0
	$(PIP_INSTALL) -q -e '.[test,plot,lint,st,mteb]'
	touch $@

venv: $(BIN)/embedkit

demo: venv
	$(BIN)/embedkit fit

# the lint gate: ruff (pyflakes, import order, bugbear, complexity; rules in pyproject.toml), then
# hadolint and Compose, binaries inside pip packages (the `lint` extra). Compose is called as its
# binary: the Python wrapper exits 0 on errors. check-jsonschema carries the compose-spec schema.
lint: venv
	$(BIN)/ruff check embedkit tests bench
	$(BIN)/hadolint --failure-threshold warning docker/Dockerfile
	$(BIN)/docker-compose -f docker/compose.yaml config -q
	$(BIN)/check-jsonschema --builtin-schema vendor.compose-spec docker/compose.yaml

# two workers, a test file each at a time (module fixtures stay in one process): the 2-core
# machine idles while a test waits on a subprocess's start-up (Lightning's import, DDP ranks)
test: venv lint
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -n 2 --dist loadfile tests

# SIGKILL and a full disk at seeded named points of fit, encode, mine and eval; each resumed or re-run and
# compared with an uninterrupted run (docs/faults.md). Minutes; CI runs a shorter set (tests/e2e/test_fault_driver.py).
faults: venv
	PYTHONPATH=. HF_HUB_OFFLINE=1 $(BIN)/python bench/faults.py --kills 10 --seed 0

# The packages a GPU machine's image lacks (omegaconf, webdataset), as Python 3.12 wheels in .whl/,
# for bench/gpu_session.sh (carried by the `device` tool; docs/gradcache.md, "On a GPU").
device-wheels: venv
	$(BIN)/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux2014_x86_64 -d .whl omegaconf==2.4.0 webdataset==1.0.2 braceexpand==0.1.7

# Needs a Docker engine (not run in CI): build the image, run a short demo fit in it on the CPU.
docker-smoke:
	docker build -f docker/Dockerfile -t embedkit:smoke .
	docker run --rm embedkit:smoke fit trainer.max_steps=5 data.demo.train_size=256 data.demo.val_size=16

clean:
	rm -rf $(VENV) runs build *.egg-info
