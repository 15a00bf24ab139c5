# diffusion_jax: `make demo` and `make test` set everything up on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# tests/conftest.py gives the tests one CPU device (the sharding tests, marked devices(8), run together
# in a process with 8 virtual devices) and XLA flags that compile faster: the suite is compile-bound.
# xdist runs 2 workers on the 2 cores.
TEST_ENV := TF_CPP_MIN_LOG_LEVEL=3

.PHONY: install test test-fast demo bench bench-gpu lint clean

# Two installs: the package alone (CORE, what `make demo` and `make bench` need: no TensorFlow,
# no torch) and with its dev extra (STAMP, for the tests). uv installs them, or pip where uv cannot be
# installed: the same versions (`pip freeze` compared), the dev extra in 41-54 s where pip took
# 60-107 s on a fresh clone (BENCHMARKS.md). uv does not read pip's configuration, so the wheel
# folders and indexes pip is configured with (a machine's CPU build of torch) are passed on and
# resolved as pip resolves them.
# Neither byte-compiles the dependencies: Python caches the bytecode of each module the first time a
# process imports it, as it does by default (PYTHONDONTWRITEBYTECODE, set on some machines, is cleared
# for make's commands). The tests import ~6,400 of the dev extra's modules: compiling them as they are
# imported costs each of the two test workers ~10 s at its start, where compiling every module ahead
# (compileall on both cores) took 22 s of the install and pip's own pass ~105 s on one core.
export PYTHONDONTWRITEBYTECODE :=
CORE     := $(VENV)/.installed-core
pip_config = $(shell $(PYTHON) -m pip config get global.$(1) 2>/dev/null)
NEW_VENV  = (test -d $(VENV) || $(PYTHON) -m venv $(VENV)) && \
	($(PY) -m pip install --quiet uv || echo "make: uv could not be installed; pip installs instead")
UV_INSTALL = $(VENV)/bin/uv pip install --python $(PY) --quiet --no-cache -c constraints.txt \
	$(addprefix --find-links ,$(call pip_config,find-links)) \
	$(addprefix --extra-index-url ,$(call pip_config,extra-index-url)) --index-strategy unsafe-best-match
PIP_INSTALL = $(PY) -m pip install --quiet --no-compile -c constraints.txt
install_with = if test -x $(VENV)/bin/uv; then $(UV_INSTALL) $(1); else $(PIP_INSTALL) $(1); fi

$(CORE): pyproject.toml constraints.txt
	$(NEW_VENV)
	$(call install_with,-e .)
	touch $(CORE)

$(STAMP): pyproject.toml constraints.txt
	$(NEW_VENV)
	$(call install_with,-e '.[dev]')
	touch $(STAMP) $(CORE)

install: $(STAMP)

test: $(STAMP)
	$(TEST_ENV) $(PY) -m pytest -n 2 --dist loadgroup --durations=15 tests

# The quick tier for the edit-test loop: pure functions and oracles (the modules marked slow are left out).
test-fast: $(STAMP)
	$(TEST_ENV) $(PY) -m pytest -n 2 --dist loadgroup -m "not slow" --durations=10 tests

demo: $(CORE)
	$(PY) -m experiments.digits_unet --workdir runs/digits

# CPU-sized benchmarks (the quickstart model); bench-gpu runs the published-size ones.
bench: $(CORE)
	$(PY) -m benchmarks.flops --model ddpm_cifar10 --model dit_b2 --model unet_digits
	$(PY) -m benchmarks.train --model unet_digits --batch 128 --dtype float32 --steps 40
	$(PY) -m benchmarks.sample --model unet_digits --batch 256 --dtype float32 --methods ddpm:1000,ddim:50

# On a GPU host with jax[cuda]: every accelerator benchmark, plus the diffusers peer if torch
# and diffusers are importable; JSON lines and logs in $(OUT).
bench-gpu: $(STAMP)
	OUT=$(or $(OUT),runs/bench_gpu) PY=$(PY) bash benchmarks/gpu_session.sh

lint: $(STAMP)
	$(PY) -m pip install --quiet ruff
	$(VENV)/bin/ruff check diffusion_jax experiments benchmarks tests

clean:
	rm -rf $(VENV) runs .pytest_cache
