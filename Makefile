# `make demo` and `make test` bootstrap .venv on first use (and again when pyproject.toml changes).
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test bench

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/defectscope demo --out demo-output $(if $(DATA),--data $(DATA))

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q -n 2 --dist loadfile

bench: $(STAMP)
	$(VENV)/bin/python benchmarks/mvtec.py --root ../shared/datasets/mvtec_ad --categories bottle ../mvtec_3d_ad_rgb/tire --generate rotated-parts
