# The two commands of the README: `make demo` and `make test`.
# Both create .venv and install what is needed, system services included.

VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: demo test check lint typecheck services venv clean

demo: $(STAMP)
	demo/run.sh

test: services $(STAMP) lint typecheck
	$(BIN)/pytest

check: lint typecheck

lint: $(STAMP)
	$(BIN)/ruff check mqttsvc tests twisted demo
	$(BIN)/ruff format --check mqttsvc tests twisted demo

typecheck: $(STAMP)
	$(BIN)/mypy

services:
	scripts/services.sh ensure

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml scripts/venv.sh
	scripts/venv.sh
	touch $@

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
