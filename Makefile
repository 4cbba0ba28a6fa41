# The two set-up commands (README): `make report` and `make test`.
# Each creates .venv and installs everything on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install report test info

$(STAMP): pyproject.toml scripts/install.sh
	VENV=$(VENV) scripts/install.sh
	touch $(STAMP)

install: $(STAMP)

report: $(STAMP)  ## the main job: train-inference mismatch report on SmolLM2-135M
	$(VENV)/bin/vllm-rl-compat check $(ARGS)

test: $(STAMP)  ## the whole suite, real engines included
	$(PY) -m pytest $(PYTEST_ARGS)

info: $(STAMP)
	$(VENV)/bin/vllm-rl-compat info
