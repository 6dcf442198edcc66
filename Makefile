# The two commands of the README:
#   make repro   set up .venv (pinned), run the DVC pipeline, print where the report is
#   make test    set up .venv (pinned), run the whole test suite
# Presets (aladin/presets.py), as a DVC experiment with every value set by -S:
#   make paper [RECIPE=alignment-triplet]             the paper profile (MS-COCO, VinVL), GPU and internet
#   make exp PROFILE=embedded RECIPE=...              a released recipe on the embedded default
#   ... EXTRA=site.yaml                               your own overrides last (mirrors, backbone.path, ...)
#   make released CHECKPOINT=model_best_rsum.pth.tar  the released ALADIN model, evaluated without training
# Sweeps:
#   make sweep [TEMPERATURES=1.0,2.0,4.0,6.0,8.0]     queued DVC experiments, collected, report re-rendered
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(abspath $(VENV))/bin
STAMP := $(VENV)/.installed
# Stages run `python -m stages.<name>`: put the venv first on PATH so that `python` is the venv's.
export PATH := $(BIN):$(PATH)
export DVC_NO_ANALYTICS := true
SHELL := bash
.SHELLFLAGS := -o pipefail -c
# This machine's pip.conf names local indexes that may be absent; pip's warnings about them are noise.
QUIET := 2>&1 | { grep -v "is ignored: it is neither" || true; }

.PHONY: setup repro test lock clean-venv paper exp released sweep sweep-report

PROFILE ?= paper
RECIPE ?= matching-distill-finetune
TEMPERATURES ?= 1.0,2.0,4.0,6.0,8.0

setup: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "Python 3.11 is required, found " + sys.version.split()[0])'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c requirements.lock -e . $(QUIET)
	touch $(STAMP)

repro: setup
	$(BIN)/dvc config --local core.check_update false
	$(BIN)/dvc repro
	@echo
	@echo "Report: $(CURDIR)/reports/report.html   (metrics: dvc metrics show)"

paper: PROFILE = paper
paper: exp

exp: setup
	$(BIN)/dvc config --local core.check_update false
	$(BIN)/python -m aladin.presets --profile $(PROFILE) --recipe $(RECIPE) $(if $(EXTRA),--extra $(EXTRA)) --run
	@echo
	@echo "Report: $(CURDIR)/reports/report.html   (compare: dvc exp show --only-changed; dvc metrics diff)"

# The paper profile's inputs (data, backbone, features) as a DVC experiment, then the released checkpoint
# imported and evaluated by the normal evaluate stage into metrics/released.json.
released: setup
	@test -n "$(CHECKPOINT)" || { echo "usage: make released CHECKPOINT=path/to/model_best_rsum.pth.tar"; exit 2; }
	$(BIN)/dvc config --local core.check_update false
	$(BIN)/python -m aladin.presets --profile paper $(if $(EXTRA),--extra $(EXTRA)) --name paper-inputs --run -- features
	$(BIN)/python -m stages.import_checkpoint --params params.yaml --checkpoint $(CHECKPOINT) \
		--backbone data/backbone --out models/released
	$(BIN)/python -m stages.evaluate --params params.yaml --dataset data/dataset --features data/features \
		--model models/released --metrics metrics/released.json --latency metrics/released_latency.json \
		--qualitative eval/released_qualitative.json

# One queued experiment per temperature (write values as floats: -S 8 would store the int 8), run one at a
# time, then collected from `dvc exp show --json` into sweeps/temperature.json and the report re-rendered.
sweep: setup
	$(BIN)/dvc config --local core.check_update false
	$(BIN)/dvc exp run --queue -S 'distill.temperature=$(TEMPERATURES)'
	$(BIN)/dvc exp run --run-all -j 1
	$(MAKE) sweep-report

# Re-collect every experiment of the current commit and re-render the report (after `dvc queue start`, say).
sweep-report: setup
	$(BIN)/python -m aladin.sweep --out sweeps/temperature.json
	$(BIN)/dvc repro report
	@echo
	@echo "Report: $(CURDIR)/reports/report.html   (sweep: sweeps/temperature.json; dvc exp show --only-changed)"

test: setup
	$(BIN)/python -m pytest -q tests

# Re-pin every transitive dependency after changing pyproject.toml.
lock: setup
	$(BIN)/python -m pip freeze --exclude-editable > requirements.lock

clean-venv:
	rm -rf $(VENV)
