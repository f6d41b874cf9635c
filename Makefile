# The two set-up commands of the README: `make demo` and `make test`. Both create .venv and install
# what they need from pyproject.toml; nothing has to be installed by hand first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=
DEMO_ARGS ?=

.PHONY: demo test lint format install clean browser

# Debian's Chromium, for the map page's test in a real browser.
CHROMIUM := /usr/bin/chromium

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -U pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -e ".[test]"
	touch $@ $(VENV)/.installed $(VENV)/.installed-devtools

# Installs Chromium from Debian's packages when it is missing (as root, or through sudo).
browser:
	@test -x $(CHROMIUM) || { \
		s=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$s apt-get install -y -q chromium || { $$s apt-get update -q && $$s apt-get install -y -q chromium; }; }

# The moto S3 server of `make demo S3=1` (the test extra has it too).
$(VENV)/.installed-devtools: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -e ".[devtools]"
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed

# `make demo S3=1` puts every URI on s3://, against a moto server the demo starts and stops.
# The demo owns runs/demo: each run replaces the previous demo's outputs there.
demo: $(VENV)/.installed $(if $(S3),$(VENV)/.installed-devtools)
	$(BIN)/segray demo --out runs/demo $(if $(S3),--s3) $(DEMO_ARGS)

# pytest exits 5 when it collects no test: say so and do not count it as a failure.
# The browser test must run here (SEGRAY_REQUIRE_BROWSER): a missing Chromium fails it.
test: $(VENV)/.installed-test browser
	SEGRAY_REQUIRE_BROWSER=1 $(BIN)/python -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 0; fi; exit $$rc

lint: $(VENV)/.installed-test
	$(BIN)/ruff check segray tests jobs
	$(BIN)/ruff format --check segray tests jobs

format: $(VENV)/.installed-test
	$(BIN)/ruff format segray tests jobs
	$(BIN)/ruff check --fix segray tests jobs

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
