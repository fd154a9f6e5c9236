# Quick start:  make demo   (install, make the local model, run the stack, send the seed's prompt)
#               make test   (unit tests + end-to-end tests on the real stack)
PY := .venv/bin/python
CONFIG ?= etc/disagg.yaml

.PHONY: install demo test unit bench up down status clean

install:
	bash scripts/install.sh

demo: install
	$(PY) -m daemons.ctl --config $(CONFIG) demo

test:
	bash scripts/install-system.sh
	bash scripts/install.sh
	$(PY) -m pytest

unit: install
	$(PY) -m pytest tests/unit

bench: install
	bash scripts/bench.sh

up: install
	$(PY) -m daemons.ctl --config $(CONFIG) up
down:
	$(PY) -m daemons.ctl --config $(CONFIG) down
status:
	$(PY) -m daemons.ctl --config $(CONFIG) status

clean:
	rm -rf var .pytest_cache
