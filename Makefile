# Two commands on a fresh machine:  `make serve`  and  `make test`  (`make lint` runs ruff, as CI does).
# Both create ./.venv on first use: torch first (TORCH_SPEC; a CPU wheel here, the CUDA build on a GPU box from
# PyPI), then this project with its test extras. Override e.g. `make serve TORCH_SPEC=torch ARGS="--model ..."`.

PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.13.0
ARGS       ?=
BIN         = $(VENV)/bin

.PHONY: install serve test lint format demo-model gpu-bench gpu-wheels gpu-check clean

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

# Retrain the shipped demo model (glm4v/demo_model, docs/DEMO.md): ~27 min on a 2-core CPU, seeded.
demo-model: install
	$(BIN)/python tools/train_demo.py --out glm4v/demo_model $(ARGS)

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

# The GPU box (docs/GPU.md) has torch, transformers and the rest, but not these: their wheels travel with the tree.
# One version each, the ones this project is tested with (bitsandbytes' wheel carries CUDA 13 kernels for torch 2.11);
# cp312 manylinux x86_64, nothing pulled in implicitly. Prints the total, which must stay <= 60 MiB.
WHEELS     ?= .whl
GPU_WHEELS  = bitsandbytes==0.50.2 fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0 pydantic==2.14.4 \
              pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 opentelemetry-api==1.45.2 \
              typing-extensions==4.16.0
WHEEL_TAGS  = --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
              --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
              --platform manylinux2014_x86_64 --platform manylinux1_x86_64
gpu-wheels:
	rm -rf $(WHEELS) && mkdir -p $(WHEELS)
	$(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: $(WHEEL_TAGS) -d $(WHEELS) $(GPU_WHEELS)
	@$(PYTHON) -c "import collections, pathlib, sys; ws = sorted(pathlib.Path('$(WHEELS)').glob('*.whl')); \
	names = collections.Counter(w.name.split('-')[0].lower() for w in ws); total = sum(w.stat().st_size for w in ws); \
	[print(f'{w.stat().st_size / 2**20:8.2f} MiB  {w.name}') for w in ws]; \
	print(f'{total / 2**20:8.2f} MiB  total, {len(ws)} wheels (limit 60 MiB)'); \
	sys.exit('two versions of ' + ', '.join(n for n, c in names.items() if c > 1) if max(names.values()) > 1 \
	else 'over 60 MiB' if total > 60 * 2**20 else 0)"

# The check itself, under the interpreter that will run it (the box's python3; here any with torch): installs the
# wheels into a scratch folder if it needs them, then measures within --budget-s (default 480 s). E.g. on a CPU:
# make gpu-check GPU_PYTHON=.venv/bin/python ARGS="--device cpu --synthetic tiny"
GPU_PYTHON ?= python3
gpu-check:
	$(GPU_PYTHON) -m glm4v_edge gpu-check --wheels $(WHEELS) --out $(OUT)/gpu-check $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
