# Three commands do everything on a fresh machine (Python 3.10+):
#   make train [ARGS="--model_name_or_path ../shared/models/minilm-l6 ..."]
#   make serve [ARGS="--model_dir ./fine-tuned-bert --port 8000"]    # python -m serve
#   make test
# Each creates .venv and installs requirements.txt first (again only when it changes).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: train test serve

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: requirements.txt | $(BIN)/python
	$(BIN)/python -m pip install --quiet -r requirements.txt
	touch $@

train: $(VENV)/.installed
	$(BIN)/accelerate launch train_loop.py $(ARGS)

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q $(ARGS)

serve: $(VENV)/.installed
	$(BIN)/python -m serve $(ARGS)
