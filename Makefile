# Every target makes or refreshes .venv first; nothing else is needed on a fresh machine.
# torch: `pip install torch==2.13.0` takes the local CPU build on these machines. On a GPU workstation
# install the CUDA build instead, e.g. `make test TORCH_INDEX=https://download.pytorch.org/whl/cu128`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
# The suite runs on TEST_WORKERS processes (pytest-xdist), each taking whole test files (module fixtures are built
# once): run one after another on 2 cores, it left the CPU idle 41% of the time (imports, servers, containers and
# waits). --no-loadscope-reorder keeps tests/conftest.py's order (the longest files first) instead of xdist's
# largest-count-first, which started the 7-minute demo file last. TEST_WORKERS=0: one process, one test at a time.
TEST_WORKERS ?= 2
# Two workers on 2 cores: OpenMP threads spinning at their barriers took the CPU the other worker needed. Measured
# on a fresh clone (.ci/run, set-up included): serial 49:08 (55 CPU-minutes); two workers 47:30 (80); two workers
# with passive OpenMP threads and the long files first 34:17 (57).
TEST_ENV := OMP_WAIT_POLICY=PASSIVE

.PHONY: setup demo test test-fast image-test image-cpu bench lint format clean

setup: $(STAMP)

$(STAMP): pyproject.toml docker/requirements.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install --quiet -e ".[dev]" -c docker/requirements.lock  # the versions the Docker image pins
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/seg3d demo

test: $(STAMP)
	$(TEST_ENV) $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(TEST_ENV) $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder -m "not slow" $(PYTEST_ARGS)

# The image built and run for real on the CPU (tests/test_image.py; part of `make test` too). docker/host-setup.sh
# installs Docker, debootstrap and docker-compose from Debian's packages if missing (root) and starts dockerd.
image-test: $(STAMP)
	-sh docker/host-setup.sh
	$(PY) -m pytest -q tests/test_image.py $(PYTEST_ARGS)

# The same image, tagged seg3d:0.1.0-cpu; BUNDLE=RUN_DIR/bundle bakes a model in.
image-cpu: $(STAMP)
	$(PY) docker/cpu_image.py build --tag seg3d:0.1.0-cpu $(if $(BUNDLE),--bundle $(BUNDLE))

bench: $(STAMP)
	$(PY) -m benchmarks.layers
	$(PY) -m benchmarks.models
	$(PY) -m benchmarks.loader
	$(PY) -m benchmarks.inference
	$(PY) -m benchmarks.memory
	$(PY) -m benchmarks.startup --write
	$(PY) -m benchmarks.serve --write
	$(PY) -m benchmarks.engines --write
	$(PY) -m benchmarks.variant_engines --write

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
