# One venv for everything; torch's CPU build goes in first so nothing pulls a CUDA build,
# then every other package at the version requirements.lock pins (`make lock` regenerates it).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.edgeward-installed
DEMO_OUT ?= demo-out
TORCH := torch==2.13.0
LOCK := requirements.lock
# Where this machine keeps torch's CPU wheel (pip's find-links); the lock is resolved against it.
TORCH_WHEELS ?= /opt/wheels
EXTRAS := audit,test,redis,dev,fleet,provenance,grpc,ray,pt2e
PYTEST_ARGS ?=
# Tests run in a random order (pytest-randomly); the seed is printed, `make test SEED=N` repeats one.
ifeq ($(origin SEED), undefined)
SEED := $(shell python3 -c 'import random; print(random.randrange(1, 10**6))')
endif

.PHONY: install system-deps lock lint test test-slow demo clean grpc-stubs

$(STAMP): pyproject.toml $(LOCK)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -c $(LOCK) -e '.[$(EXTRAS)]'
	$(PY) -m pip check
	touch $(STAMP)

install: $(STAMP)

# Deliberate bumps only: regenerate, review the diff, commit it.
lock: $(STAMP)
	echo '$(TORCH)+cpu' > $(VENV)/torch-cpu.txt
	$(VENV)/bin/uv pip compile pyproject.toml --extra audit --extra test --extra redis --extra dev --extra fleet --extra provenance --extra grpc --extra ray --extra pt2e \
	  --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
	  --find-links $(TORCH_WHEELS) -c $(VENV)/torch-cpu.txt --no-emit-package torch \
	  --no-header --quiet -o $(LOCK)
	sed -i '1i # Pinned versions for make, CI and the docs tests; regenerate with `make lock`.\n# torch is installed first, separately: pip install $(TORCH) (CPU build).' $(LOCK)

# OIP gRPC messages from api/oip/proto/open_inference.proto (committed; rerun after editing it).
grpc-stubs: $(STAMP)
	$(PY) -m grpc_tools.protoc -I. --python_out=. --pyi_out=. api/oip/proto/open_inference.proto

system-deps:
	bash scripts/install-system-deps.sh

# Layering (import-linter contracts in pyproject.toml), ruff, and mypy --strict on the
# device packages. `make test` (and so CI) runs it first.
lint: $(STAMP)
	$(VENV)/bin/lint-imports
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

test: $(STAMP) system-deps lint
	@echo "test order seed: $(SEED) (make test SEED=$(SEED) repeats it)"
	$(PY) -m pytest -m "not slow" -q -p randomly --randomly-seed=$(SEED) $(PYTEST_ARGS)

test-slow: $(STAMP) system-deps
	$(PY) -m pytest -m slow -q -p randomly --randomly-seed=$(SEED) $(PYTEST_ARGS)

demo: $(STAMP)
	PYTHON=$(abspath $(PY)) bash scripts/demo.sh $(DEMO_OUT)

clean:
	rm -rf $(DEMO_OUT) .pytest_cache build dist
