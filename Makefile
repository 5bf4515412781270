# Two entry points for a fresh machine: `make demo` and `make test`.
# Each sets up .venv from nothing (re-installing only when pyproject.toml changes), then runs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
EXTRAS ?= cpu,test,rtx,ray   # cpu or gpu (one onnxruntime distribution), never both; ray: infer/evaluate --ray

.PHONY: demo test venv clean

$(VENV)/.stamp: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[$(EXTRAS)]'
	touch $@

venv: $(VENV)/.stamp

demo: venv
	$(BIN)/fcn-deploy demo --workdir demo-work

test: venv
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) demo-work build *.egg-info
