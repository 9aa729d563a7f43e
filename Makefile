# `make test` and `make demo` do all set-up on a fresh machine (see README).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.cogumi-installed

.PHONY: setup test test-fast demo lint clean

$(STAMP): pyproject.toml scripts/setup_env.sh
	VENV=$(VENV) bash scripts/setup_env.sh
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

demo: $(STAMP)
	$(VENV)/bin/cogumi run recipes/demo.yaml
	$(VENV)/bin/cogumi eval compare runs/demo/eval-base runs/demo/eval-finetuned
	@echo "demo results: runs/demo (each step's manifest.json lists its outputs)"

lint: $(STAMP)
	$(VENV)/bin/ruff check cogumi tests scripts

clean:
	rm -rf runs .pytest_cache
