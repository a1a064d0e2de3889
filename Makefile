# Two commands set up a fresh machine and do the work:
#   make demo   - install, then run the demo study (20 trials on the offline tiny model) and retrain its best config
#   make test   - install, then run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test test-fast lint bench docs

$(VENV)/.installed: pyproject.toml requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	@# Without a GPU, take the CPU build of torch first: nothing then pulls a multi-GB CUDA build.
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install --quiet "torch==2.13.0"; fi
	$(PY) -m pip install --quiet -r requirements.txt -e ".[dev]"
	touch $@

demo: $(VENV)/.installed
	$(PY) ax_optimization.py --trials 20 --output configs/optimization_results.json --overwrite
	$(PY) finetune_lora.py --config configs/best_config.yaml --overwrite

test: $(VENV)/.installed  # two pytest workers, a file each at a time (tests/conftest.py gives each trial one thread)
	$(PY) -m pytest -n 2 --dist loadfile

test-fast: $(VENV)/.installed  # a quick loop: the unit tests (no study, no trial process), about a minute
	$(PY) -m pytest -n 2 --dist loadfile -m "not slow" tests/unit

docs: $(VENV)/.installed  # the site's generated references (docs/config.md, docs/commands.md) from the code, then the site
	$(PY) docs/config_reference.py --write
	$(PY) -m mkdocs build --strict

bench: $(VENV)/.installed
	$(PY) -m pip install --quiet -e ".[bench]"
	$(PY) benchmarks/run_all.py

lint: $(VENV)/.installed
	$(PY) -m ruff check .
