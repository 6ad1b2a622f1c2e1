# Three commands do everything on a fresh machine (Python 3.11+):
#   make train [ARGS="--model_name_or_path ../shared/models/minilm-l6 ..."]
#   make serve [ARGS="--model_dir ./fine-tuned-bert --port 8000"]    # python -m serve
#   make test
# Each creates .venv and installs torch, then requirements.lock: exactly the versions the tests ran
# with (again only when the lock changes). `make lock` regenerates the lock from requirements.txt's
# ranges; `make test-latest` runs the suite against the newest releases those ranges allow.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch comes first and on its own: the lock leaves it out, so a GPU user can pick a CUDA build
# (README, Installing). Here PyPI's torch==2.13.0 is the CPU file on this machine's disk.
TORCH ?= $(shell sed -n 's/^\(torch==[^ ]*\).*/\1/p' lock.in)
PIP_VERSION := 26.3
UV_VERSION := 0.13.9

.PHONY: install train test serve lock test-latest

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "pip==$(PIP_VERSION)"

$(VENV)/.installed: requirements.lock | $(BIN)/python
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -r requirements.lock
	touch $@

install: $(VENV)/.installed

train: $(VENV)/.installed
	$(BIN)/accelerate launch train_loop.py $(ARGS)

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q $(ARGS)

serve: $(VENV)/.installed
	$(BIN)/python -m serve $(ARGS)

# One resolution for every platform and Python 3.11+ (uv's --universal). torch and the CUDA stack its
# PyPI wheel pins exactly (nvidia-*, cuda-*, triton) stay out: the TORCH step brings the right ones.
# uv runs from a venv of its own, so the tests' environment holds only what the lock says.
lock:
	test -x .venv-lock/bin/uv || { $(PYTHON) -m venv .venv-lock && .venv-lock/bin/pip install --quiet "uv==$(UV_VERSION)"; }
	.venv-lock/bin/uv pip compile lock.in --universal --python-version 3.11 --no-emit-package torch \
		--custom-compile-command "make lock" --quiet -o requirements.lock
	awk '/^[^ #]/ { skip = /^(nvidia-|cuda-|triton==)/ } !skip' requirements.lock > requirements.lock.tmp
	mv requirements.lock.tmp requirements.lock

# A throw-away environment from requirements.txt's ranges with the newest releases, and the suite.
LATEST := .venv-latest
test-latest:
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install --quiet --upgrade pip
	$(LATEST)/bin/python -m pip install --quiet --upgrade $(or $(TORCH_LATEST),torch)
	$(LATEST)/bin/python -m pip install --quiet --upgrade -r requirements.txt "deepspeed>=0.18,<1"
	$(LATEST)/bin/python -m pip freeze > $(LATEST)/versions.txt
	$(LATEST)/bin/python -m pytest -q $(ARGS)
