# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
FASHION := /usr/share/datasets/fashion-mnist
export NO_ALBUMENTATIONS_UPDATE := 1
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: demo test test-slurm lint report clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# Real Fashion-MNIST from Debian (offline); elsewhere the download rule uses torchvision.
$(FASHION):
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	else echo "note: $(FASHION) missing; install Debian's dataset-fashion-mnist or set data.source"; fi

demo: $(STAMP) | $(FASHION)
	$(BIN)/snakemake --configfile presets/demo.yaml --cores all
	@echo "Demo report: $(CURDIR)/results/report/summary.md"

# The SLURM tests need a cluster: `make test-slurm` runs them.
test: $(STAMP) | $(FASHION)
	$(BIN)/python -m pytest -m "not slurm"

# The workflow through profiles/slurm on a throw-away single-node SLURM cluster (as root:
# installs munge and slurm-wlm when missing); the cluster is stopped even when tests fail.
test-slurm: $(STAMP)
	status=0; scripts/slurm-local/start.sh && \
	$(BIN)/python -m pytest -m slurm tests/test_slurm.py || status=$$?; \
	scripts/slurm-local/stop.sh; exit $$status

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/snakemake --lint

# Redraw figures and tables from existing predictions (retrains nothing).
report: $(STAMP)
	$(BIN)/snakemake --cores all --forcerun plot_training_curves plot_ensemble_curve plot_reliability \
		plot_accuracy plot_cost plot_shift plot_diversity plot_ood plot_selective summary
	$(BIN)/snakemake --report report.html

clean:
	rm -rf results logs .snakemake report.html
