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

# Local services for the Kafka and portable-runner tests (tests/services.py), built by Maven
# and Go from pinned versions into .services/: a Kafka broker, Beam's Kafka expansion service
# and Prism, Beam's portable runner (the same version as the Python SDK; a job that names it
# with --prism_location never waits on a download).
SERVICES := .services
BEAM_VERSION := 2.77.0
MVN := mvn -B -q --no-transfer-progress

.PHONY: install prometheus services run test lint bench-trainer clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,kafka,s3]'
	touch $@

## The main streaming job: MNIST (or the packaged 5000-image subset when MNIST cannot be had)
## until Ctrl-C, metrics on http://127.0.0.1:9890/metrics (the port deploy/prometheus scrapes).
run: install
	$(BIN)/aevb train --streaming --dataset mnist --fallback-dataset mnist-5k --output $(RUN_DIR) \
		--snapshot-every-seconds 30 --log-every-steps 100 --metrics-port 9890

## Debian's `prometheus` package: `prometheus` and `promtool` for the alert-rule tests and the
## end-to-end test (tests start their own server on loopback; the package's service is not
## used); and Debian's `docker-compose`, whose `config -q` validates docker-compose.yml
## without a Docker engine (tests/test_stack.py). Installed when missing and when running
## as root (CI); otherwise those tests skip.
prometheus:
	@if command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1 \
		&& command -v docker-compose >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
			apt-get install -y -qq --no-install-recommends prometheus docker-compose >/dev/null; \
	else echo "prometheus/promtool/docker-compose not installed (not root): their tests will be skipped"; fi

services: $(SERVICES)/kafka/.installed $(SERVICES)/kafka-expansion-service/.installed \
	$(SERVICES)/bin/prism

$(SERVICES)/kafka/.installed: deploy/local/kafka-broker.pom.xml
	$(MVN) -f $< dependency:copy-dependencies -DincludeScope=runtime \
		-DoutputDirectory=$(abspath $(SERVICES)/kafka/libs)
	touch $@

$(SERVICES)/kafka-expansion-service/.installed: deploy/local/kafka-expansion-service.pom.xml
	$(MVN) -f $< package
	touch $@

$(SERVICES)/bin/prism: Makefile
	GOBIN=$(abspath $(SERVICES)/bin) GOFLAGS=-mod=mod go install -p 1 \
		github.com/apache/beam/sdks/v2/go/cmd/prism@v$(BEAM_VERSION)

test: install lint prometheus services
	$(BIN)/pytest

lint: install
	$(BIN)/ruff check vae pipeline tests benchmarks

## The speed bar: `aevb bench trainer` (float32 and bfloat16 steps) against the plain PyTorch step,
## float32 and bfloat16-autocast, alternated in one run.
bench-trainer: install
	test -x .torch-venv/bin/python || ($(PYTHON) -m venv .torch-venv && \
		.torch-venv/bin/pip install --quiet torch==2.13.0 numpy)
	$(BIN)/aevb bench trainer --json --repeats 5 \
		--reference-command "$(abspath .torch-venv/bin/python) $(abspath ../shared/bench/torch_reference.py)" \
		--reference-command "$(abspath .torch-venv/bin/python) $(abspath ../shared/bench/torch_reference.py) --bf16"

clean:
	rm -rf $(VENV) $(SERVICES) runs .pytest_cache .ruff_cache
