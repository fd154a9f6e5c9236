# Quick start:  make demo   (install, make the local model, run the stack, send the seed's prompt)
#               make test   (checks, unit tests + end-to-end tests on the real stack)
PY := .venv/bin/python
CONFIG ?= etc/disagg.yaml

.PHONY: install demo test check lint docs reference unit bench up down status clean

install:
	bash scripts/install.sh

demo: install
	$(PY) -m daemons.ops.ctl --config $(CONFIG) demo

test:
	bash scripts/install-system.sh
	bash scripts/install.sh
	$(MAKE) check
	$(PY) -m pytest

# What runs before the tests: lint, types, the generated references current, the docs built strictly.
check: lint docs

lint:
	$(PY) -m ruff check .
	$(PY) -m mypy

docs:
	$(PY) -m daemons.ops.reference --check
	$(PY) -m mkdocs build --strict --quiet

# Rewrite docs/reference/ from the code (after changing config.py, config_sections.py, edge/door_settings.py, metrics.py, names.py or the rules).
reference:
	$(PY) -m daemons.ops.reference

unit: install
	$(PY) -m pytest tests/unit

bench: install
	bash scripts/bench.sh

up: install
	$(PY) -m daemons.ops.ctl --config $(CONFIG) up
down:
	$(PY) -m daemons.ops.ctl --config $(CONFIG) down
status:
	$(PY) -m daemons.ops.ctl --config $(CONFIG) status

clean:
	rm -rf var .pytest_cache
