# The two commands of the README: `make demo` and `make test`.
# Both create .venv and install what is needed, system services included.

VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: demo test check lint typecheck services browser venv clean bench

demo: $(STAMP)
	demo/run.sh

# The reliability scenarios run beside the rest (scripts/test.sh).
test: services browser $(STAMP) lint typecheck
	scripts/test.sh

check: lint typecheck

lint: $(STAMP)
	$(BIN)/ruff check mqttsvc tests twisted demo bench
	$(BIN)/ruff format --check mqttsvc tests twisted demo bench

typecheck: $(STAMP)
	$(BIN)/mypy

services:
	scripts/services.sh ensure

# Headless Chromium and chromedriver for the status page's browser test.
browser:
	scripts/browser.sh ensure

# The benchmark suite at full size (about 10 minutes): writes BENCHMARKS.md.
bench: services $(STAMP)
	$(BIN)/python -m bench

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml scripts/venv.sh
	scripts/venv.sh
	touch $@

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
