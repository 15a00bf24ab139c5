# diffusion_jax: `make demo` and `make test` set everything up on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# Tests use 8 virtual CPU devices to exercise sharding; xdist runs 2 workers on the 2 cores.
TEST_ENV := XLA_FLAGS=--xla_force_host_platform_device_count=8 TF_CPP_MIN_LOG_LEVEL=3

.PHONY: install test demo bench lint clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(TEST_ENV) $(PY) -m pytest -n 2 --dist loadfile --durations=15 tests

demo: $(STAMP)
	$(PY) -m experiments.digits_unet --workdir runs/digits

bench: $(STAMP)
	$(PY) -m benchmarks.train
	$(PY) -m benchmarks.sample

lint: $(STAMP)
	$(PY) -m pip install --quiet ruff
	$(VENV)/bin/ruff check diffusion_jax experiments benchmarks tests

clean:
	rm -rf $(VENV) runs .pytest_cache
