# qconv developer entry points. `make demo` and `make test` work on a fresh machine that can
# reach the package registries (PyPI). torch is pinned to the CPU build this project uses.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
CACHE ?= .cache
SHARED ?= ../shared

# The llama.cpp test oracle (llama-cpp-python) compiles llama.cpp from source. Left to itself it
# builds with -march=native, and such a build crashes on AMX / AVX512-BF16 Xeons when it evaluates
# quantized GGUFs. So it is built for one fixed x86-64 baseline instead: AVX2 + FMA + F16C + BMI2,
# no AVX-512, no AMX (the same code on every machine that has AVX2). Non-x86 machines get the
# compiler's generic target (GGML_NATIVE=OFF only).
LLAMA_CPP_VERSION ?= 0.3.36
ifeq ($(shell uname -m),x86_64)
ORACLE_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_CPU_ALL_VARIANTS=OFF -DGGML_BACKEND_DL=OFF \
	-DGGML_SSE42=ON -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
	-DGGML_AVX_VNNI=OFF -DGGML_AVX512=OFF -DGGML_AVX512_VBMI=OFF -DGGML_AVX512_VNNI=OFF \
	-DGGML_AVX512_BF16=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF
else
ORACLE_CMAKE_ARGS ?= -DGGML_NATIVE=OFF
endif
# The portable wheel is built once per (version, flags) into a directory named by their hash,
# outside pip's cache: pip's own wheel cache is keyed by the sdist's URL, not by CMAKE_ARGS, so it
# could hand back a native build made earlier by a plain `pip install llama-cpp-python`. The wheel
# is built from the downloaded sdist file with --no-cache-dir and installed with --no-index from
# this directory only.
ORACLE_KEY := $(shell printf '%s %s' '$(LLAMA_CPP_VERSION)' '$(ORACLE_CMAKE_ARGS)' | sha256sum | cut -c1-12)
ORACLE_WHEELS ?= $(HOME)/.cache/qconv/llama-cpp-python-$(LLAMA_CPP_VERSION)-$(ORACLE_KEY)

.PHONY: demo test venv venv-test clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e .
	touch $@

# The sdist is kept beside the wheel: the tests also run llama.cpp's own convert_hf_to_gguf.py
# from its vendor/llama.cpp as the oracle for GGUF export.
ORACLE_SDIST = $(ORACLE_WHEELS)/llama_cpp_python-$(LLAMA_CPP_VERSION).tar.gz

$(ORACLE_SDIST): | $(VENV)/bin/python
	mkdir -p $(ORACLE_WHEELS)
	$(PY) -m pip download -q --no-cache-dir --no-deps --no-binary :all: -d $(ORACLE_WHEELS) \
		llama-cpp-python==$(LLAMA_CPP_VERSION)

$(ORACLE_WHEELS)/.built: | $(ORACLE_SDIST)
	rm -f $(ORACLE_WHEELS)/*.whl
	CMAKE_ARGS="$(ORACLE_CMAKE_ARGS)" FORCE_CMAKE=1 $(PY) -m pip wheel -q --no-cache-dir --no-deps \
		-w $(ORACLE_WHEELS) $(ORACLE_SDIST)
	touch $@

# The oracle comes from the portable wheel only (--no-index; --force-reinstall replaces a native
# build installed by hand since). It goes in before the test extras, which then find it satisfied
# (and install its dependencies), and again, in about a second, before every test run.
ORACLE_INSTALL = $(PY) -m pip install -q --force-reinstall --no-deps --no-index --only-binary :all: \
	--find-links $(ORACLE_WHEELS) llama-cpp-python==$(LLAMA_CPP_VERSION)

$(VENV)/.installed-test: pyproject.toml Makefile $(VENV)/.installed | $(ORACLE_WHEELS)/.built
	$(ORACLE_INSTALL)
	$(PY) -m pip install -q -e '.[test]'
	touch $@

venv: $(VENV)/.installed
venv-test: $(VENV)/.installed-test

test: venv-test $(ORACLE_SDIST)
	$(ORACLE_INSTALL)
	QCONV_LLAMA_CPP_SDIST=$(ORACLE_SDIST) $(PY) -m pytest -q

demo: venv
	$(PY) bench/example_model.py --cache $(CACHE) --demo --eval-text $(SHARED)/data/wikitext-2-raw-test.txt \
		--calib $(SHARED)/data/c4-sample.jsonl

clean:
	rm -rf $(VENV) $(CACHE) .pytest_cache
