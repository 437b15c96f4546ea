# Targets named in the README. Every target creates (once) and reuses the local virtual environment .venv.
VENV ?= .venv
PY := $(VENV)/bin/python
# torch 2.14.1 + torchvision 0.29.1 are what this project is tested with (served from local disk on the dev machines).
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=

.PHONY: setup quickstart toy-scaling toy-variants demo test lint format bench clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --no-cache-dir --upgrade pip
	$(PY) -m pip install -q --no-cache-dir $(TORCH_SPEC)
	$(PY) -m pip install -q --no-cache-dir -e ".[test]"
	touch $@

setup: $(VENV)/.installed

# The main job: a small scaling study on the toy data (local Ray, local MLflow), about 9 minutes on 2 cores.
quickstart: setup
	$(VENV)/bin/ditscale run quickstart

# The longer toy study where FID itself falls with Gflops (6 models x 2 seeds, 2 EMAs), about 56 minutes on 2 cores.
toy-scaling: setup
	$(VENV)/bin/ditscale run toy_scaling

# The 2023 DiT against a modern design (flow, RoPE, SwiGLU, RMSNorm, QK-norm), 12 trials, about 35 minutes on 2 cores.
toy-variants: setup
	$(VENV)/bin/ditscale run toy_variants

demo: setup
	$(PY) -m dit_core.demo

# Two test processes (pytest-xdist): one fills the other's waits on Ray's process start-ups (tests/conftest.py).
test: setup
	$(PY) -m pytest -q -n 2 --dist loadgroup $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: setup
	$(PY) benchmarks/train_step.py --modes eager compiled-model compiled --sample-presets DiT-d6w128/2

clean:
	rm -rf $(VENV) ditscale-work .pytest_cache
