# One venv for everything; torch's CPU build goes in first so nothing pulls a CUDA build.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.edgeward-installed
DEMO_OUT ?= demo-out

.PHONY: install system-deps test test-slow demo clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[audit,test]'
	touch $(STAMP)

install: $(STAMP)

system-deps:
	bash scripts/install-system-deps.sh

test: $(STAMP) system-deps
	$(PY) -m pytest -m "not slow" -q

test-slow: $(STAMP) system-deps
	$(PY) -m pytest -m slow -q

demo: $(STAMP)
	PYTHON=$(abspath $(PY)) bash scripts/demo.sh $(DEMO_OUT)

clean:
	rm -rf $(DEMO_OUT) .pytest_cache
