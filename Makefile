# Plain entry points. Every target sets itself up first; a second `make setup` is a no-op.
#   make run     the whole pipeline on the default data (Snakemake), then record it for DVC
#   make test    lint + the test suite
#   make repro   the same pipeline through DVC, then tell Snakemake it is up to date
#   make cluster the same pipeline on a SLURM cluster (profiles/slurm)

SHELL := /bin/bash
VENV := .venv
STAMP := $(VENV)/.installed
FASHION_MNIST := /usr/share/datasets/fashion-mnist
# Stage commands call plain `python`: the venv must come first on PATH for both runners.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: setup dataset browser profile run repro cluster push pull test lint benchmarks gpu-check clean

setup: $(STAMP) dataset

$(STAMP): pyproject.toml requirements.lock
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -c requirements.lock -e ".[dev]"
	touch $@

# Debian ships Fashion-MNIST (the default data) as a package; the download stage reads it from
# there first and falls back to the network mirrors in params.yaml.
dataset:
	@if [ -d $(FASHION_MNIST) ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing Debian's dataset-fashion-mnist"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null; \
	else \
		echo "note: $(FASHION_MNIST) is missing; install it with 'sudo apt-get install dataset-fashion-mnist'"; \
		echo "      (the download stage will otherwise fetch Fashion-MNIST from the mirrors in params.yaml)"; \
	fi

# The report test opens reports/index.html in a real headless browser: Debian's chromium.
browser:
	@if command -v chromium >/dev/null || command -v chromium-browser >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing Debian's chromium (for the report test)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	else \
		echo "note: chromium is missing; the report's browser test will be skipped (sudo apt-get install chromium)"; \
	fi

# `make run PROFILE=params.gpu.yaml` (or `make repro PROFILE=...`) first merges the profile, an
# overlay of params keys, into params.yaml, which both runners read; `git checkout params.yaml`
# goes back. Without PROFILE nothing is merged.
PROFILE ?=
profile: setup
	@if [ -n "$(PROFILE)" ]; then python -m pipeline profile "$(PROFILE)"; fi

# `dvc commit` records what Snakemake made in dvc.lock, so `dvc repro`/`dvc status` agree afterwards.
# QUIET keeps the console to one line per job start and end (the Snakefile's job messages), the
# stages' own lines and the per-epoch progress: no header block, no reasons. Each job's detail is
# in its log under logs/; `snakemake -n` lists every job's files and why it would run.
QUIET := --quiet reason host
run: setup profile
	snakemake --cores all $(QUIET)
	dvc commit --force --quiet

# The same pipeline on a SLURM cluster (README, "Past one machine"): every job through sbatch with
# what params.yaml's resources section asks for. SLURM_ARGS adds Snakemake options, for example
# SLURM_ARGS="--slurm-status-command squeue" where the cluster keeps no accounting.
cluster: setup profile
	snakemake --profile profiles/slurm $(QUIET) $(SLURM_ARGS)
	dvc commit --force --quiet

# `snakemake --touch` records what DVC made in Snakemake's metadata, so `snakemake -n` agrees.
repro: setup profile
	python -m pipeline execution dvc repro
	snakemake --touch --no-hooks --cores 1 --quiet

# Results shared through a DVC remote (README, "Sharing results"): `make push` uploads the
# outputs dvc.lock records, `make pull` downloads them and records them for Snakemake too.
NO_REMOTE = error: no DVC remote is set; add one with: dvc remote add -d shared /path/to/store (or s3://bucket/prefix), then git commit .dvc/config
NO_LOCK = error: there is no dvc.lock to share; run make run (or make repro) first, then git commit dvc.lock
push:
	@dvc remote default >/dev/null 2>&1 || { echo "$(NO_REMOTE)" >&2; exit 1; }
	@test -f dvc.lock || { echo "$(NO_LOCK)" >&2; exit 1; }
	dvc push

pull:
	@dvc remote default >/dev/null 2>&1 || { echo "$(NO_REMOTE)" >&2; exit 1; }
	@test -f dvc.lock || { echo "error: no dvc.lock here: git pull the commit that shared the run" >&2; exit 1; }
	dvc pull
	snakemake --touch --no-hooks --cores 1 --quiet

lint: setup
	ruff check .
	ruff format --check .
	snakefmt --check Snakefile rules
	snakemake --lint

# One pytest process per core, each taking whole files (a module's fixtures are built once):
# most of the suite waits on imports and subprocesses, so two processes on two cores finish
# sooner than one. Files are handed out in collection order, which tests/conftest.py starts
# with the files that take minutes (HEAVY_FILES): xdist's default order (most tests first) would
# leave those, which have few tests, to the end. --durations lists where CI time goes.
test: lint browser
	pytest -n auto --dist loadfile --no-loadscope-reorder --durations=20

# Speed and quality benchmarks, including the whole default pipeline from a clean clone (run on a
# quiet machine; about 30 minutes here); results in benchmarks/results/, summary in BENCHMARKS.md.
benchmarks: setup
	python -m benchmarks

# On a GPU machine (README, "Checking a GPU machine"): the GPU tests, every method's speed, the
# GPU profile's cost and a mini-study in at most 8 minutes on one GPU; results in
# benchmarks/results/gpu.json (and $OUT) and BENCHMARKS.md. No setup: it runs with the machine's
# own torch, lightning, torchmetrics and numpy, offline; GPU_CHECK_ARGS adds options (--data).
gpu-check:
	python -m benchmarks.gpu $(GPU_CHECK_ARGS)

clean:
	rm -rf data/raw data/prepared data/splits data/augment models metrics reports logs .snakemake
