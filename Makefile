# make demo: build the venv, write phantom demo data into input/ when it holds no data set, run the chain.
# make test: build the venv, lint, run the tests.
PYTHON_BOOT ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv demo test lint clean-work

venv: $(STAMP)

$(STAMP): requirements.txt
	@test -x $(PY) || $(PYTHON_BOOT) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	@touch $(STAMP)

demo: $(STAMP)
	@if [ -z "$$(find input -maxdepth 2 -name '*.csv' 2>/dev/null)" ]; then \
		$(PY) src/00_make_demo_data.py --config configs/demo.yaml; \
	else echo "input/ already holds a data set; using it"; fi
	bash run_all.sh --config configs/demo.yaml
	@echo "submission: $$(pwd)/submissions/submission.csv"
	@echo "report:     $$(pwd)/submissions/report.md"

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench

test: $(STAMP)
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/pytest -q

clean-work:
	rm -rf work/* folds/folds.csv oof/*.csv submissions/*
