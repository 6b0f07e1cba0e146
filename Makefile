# Two commands on a fresh machine:  `make serve`  and  `make test`.
# Both create ./.venv on first use: torch first (TORCH_SPEC; a CPU wheel here, the CUDA build on a GPU box from
# PyPI), then this project with its test extras. Override e.g. `make serve TORCH_SPEC=torch ARGS="--model ..."`.

PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.13.0
ARGS       ?=
BIN         = $(VENV)/bin

.PHONY: install serve test clean

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

clean:
	rm -rf $(VENV) build *.egg-info
