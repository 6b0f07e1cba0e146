# Two commands on a fresh machine:  `make serve`  and  `make test`  (`make lint` runs ruff, as CI does).
# Both create ./.venv on first use: torch first (TORCH_SPEC; a CPU wheel here, the CUDA build on a GPU box from
# PyPI), then this project with its test extras. Override e.g. `make serve TORCH_SPEC=torch ARGS="--model ..."`.

PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.13.0
ARGS       ?=
BIN         = $(VENV)/bin

.PHONY: install serve test lint format gpu-bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

serve: install
	$(BIN)/glm4v-edge serve $(ARGS)

test: install
	$(BIN)/python -m pytest -q $(ARGS)

# ruff: pyflakes, pycodestyle, import order and bugbear (pyproject.toml), and the formatter in check mode.
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# On a GPU machine: every GPU figure docs/PERFORMANCE.md and docs/PROFILING.md ask for, from random weights of the
# real architecture (no download). `profile` adds the fp16 baseline where it fits (else estimates it); the bf16
# serving run needs >= 32 GiB. Results land in $(OUT)/; paste them into the docs with the GPU's name.
OUT ?= gpu-results
BENCH = --synthetic full --device cuda --concurrency 1,8 --requests 8 --synthetic-images --image-side 1120 \
        --prompt-tokens 1000 --max-tokens 256
gpu-bench: install
	$(BIN)/python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
	$(BIN)/glm4v-edge profile --synthetic full --precision int8,nf4 --vision-precision same,bf16 --out $(OUT)/profile
	$(BIN)/glm4v-edge bench-decode --synthetic full --precision nf4 --device cuda --batch 1,8 --context 1024 \
	    --modes off,static,reduce-overhead,cudagraphs --out $(OUT)/decode-nf4
	$(BIN)/glm4v-edge bench-serve $(BENCH) --precision nf4 --out $(OUT)/serve-nf4
	$(BIN)/glm4v-edge bench-serve $(BENCH) --precision nf4 --compile --out $(OUT)/serve-nf4-compile
	if $(BIN)/python -c "import sys, torch; sys.exit(torch.cuda.mem_get_info()[1] < 32 * 2**30)"; then \
	    $(BIN)/glm4v-edge bench-serve $(BENCH) --precision bf16 --out $(OUT)/serve-bf16; fi

clean:
	rm -rf $(VENV) build *.egg-info
