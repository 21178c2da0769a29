# mailpipe — the two commands of the quick start are `make demo` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
CONFIG := configs/mailpipe.toml

.PHONY: install demo test lint format bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	$(BIN)/python -m compileall -q pipeline  # as a regular install would: no compiling at every start
	@touch $(STAMP)

# Runs the example jobs on sample_data/. Rows that are bad on purpose make
# `mailpipe run` exit 1; anything worse (2: config, 3: bug) fails the demo.
demo: $(STAMP)
	$(BIN)/mailpipe config check --config $(CONFIG)
	rm -f state/mailpipe.db state/mailpipe.db-wal state/mailpipe.db-shm state/mailpipe.ledger.db state/mailpipe.ledger.db-wal state/mailpipe.ledger.db-shm
	$(BIN)/mailpipe subscribers import --config $(CONFIG) sample_data/subscribers.csv
	$(BIN)/mailpipe suppression import --config $(CONFIG) sample_data/suppression.csv
	$(BIN)/mailpipe run --config $(CONFIG) || test $$? -eq 1
	@echo
	$(BIN)/mailpipe results "$$(ls -d out/*/ | sort | tail -n 1)" || test $$? -eq 1

test: $(STAMP)
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check pipeline tests bench
	$(BIN)/ruff format --check pipeline tests bench
	$(BIN)/mypy pipeline

format: $(STAMP)
	$(BIN)/ruff format pipeline tests bench
	$(BIN)/ruff check --fix pipeline tests bench

bench: $(STAMP)
	$(BIN)/python bench/run.py
	$(BIN)/python bench/smtp.py
	$(BIN)/python bench/http.py

clean:
	rm -rf out state bench/data bench/out
