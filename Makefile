# medidiff: `make demo` runs the main job end to end; `make test` runs the test suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test fuzz lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	# CPU torch wheel where no CUDA GPU is present (a plain `torch` would pull a multi-GB CUDA build)
	if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then \
	  $(BIN)/python -m pip install "torch>=2.2,<3"; \
	else \
	  $(BIN)/python -m pip install torch==2.13.0; \
	fi
	$(BIN)/python -m pip install -e ".[dev]"
	touch $(STAMP)

demo: install
	$(BIN)/medidiff demo

test: install
	$(BIN)/python -m pytest -q tests

# long property-based run of the readers (2000 examples per property; the normal suite runs 50)
fuzz: install
	MEDIDIFF_FUZZ_PROFILE=long $(BIN)/python -m pytest -q tests/io/test_io_fuzz.py

lint: install
	$(BIN)/ruff check medidiff tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info
