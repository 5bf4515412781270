# Two entry points for a fresh machine: `make demo` and `make test`; `make mutate` (not CI) runs
# mutation testing on the modules of [tool.fcn-deploy.mutation.modules] (docs/testing.md).
# Each sets up .venv from nothing (re-installing only when pyproject.toml changes), then runs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# cpu or gpu (one onnxruntime distribution), never both; ray: infer/evaluate --ray; serve: fcn-deploy serve
EXTRAS ?= cpu,test,rtx,ray,serve

.PHONY: demo test mutate venv clean

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

# MUTATE=tiling (or several, space-separated) limits the run to those modules; JOBS mutants run at
# a time: 2 fills an otherwise idle 2-core machine; JOBS=1 on a machine shared with other work
# (the whole scope took 31 min with one worker on a loaded 2-core machine: docs/testing.md).
# Results and work folders go to mutants/.
MUTATE ?=
JOBS   ?= 2
mutate: venv
	$(BIN)/python -c "import mutmut" 2>/dev/null || $(BIN)/pip install -q -e '.[$(EXTRAS),mutation]'
	$(BIN)/python mutation/run.py --jobs $(JOBS) $(MUTATE)

clean:
	rm -rf $(VENV) demo-work build mutants *.egg-info
