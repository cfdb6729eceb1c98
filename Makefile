# The two commands a new user needs: `make run` and `make test` (see README.md).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
RUN_DIR ?= runs/demo

# The shared data folder beside the checkout, when there is one (CI, development machines);
# elsewhere the loaders try the user cache, then download, then the packaged fallback.
AEVB_DATA_DIR ?= $(if $(wildcard ../shared/data/SHA256SUMS),$(abspath ../shared/data),)
export AEVB_DATA_DIR
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: install run test lint bench-trainer clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

## Train on MNIST (or the packaged 5000-image subset when MNIST cannot be had) until Ctrl-C.
run: install
	$(BIN)/aevb train --dataset mnist --fallback-dataset mnist-5k --output $(RUN_DIR) \
		--snapshot-every-seconds 30 --log-every-steps 100

test: install lint
	$(BIN)/pytest

lint: install
	$(BIN)/ruff check vae pipeline tests

## The speed bar: `aevb bench trainer` against the plain PyTorch step, alternated in one run.
bench-trainer: install
	test -x .torch-venv/bin/python || ($(PYTHON) -m venv .torch-venv && \
		.torch-venv/bin/pip install --quiet torch==2.13.0 numpy)
	$(BIN)/aevb bench trainer --json --repeats 5 \
		--reference-command "$(abspath .torch-venv/bin/python) $(abspath ../shared/bench/torch_reference.py)"

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
