# `make test` and `make demo` set up .venv on first use (pinned by constraints.txt), then run.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The suite runs in this many processes; tests that share an expensive fixture stay in one.
TEST_PROCESSES ?= 2

.PHONY: test demo install clean

$(BIN)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	# timm and pytorch-grad-cam, references the tests compare our ResNets and Grad-CAM with: without their
	# dependencies, as they include torchvision (none for this CPU torch); the rest comes with '.[dev]'.
	# ExecuTorch and torchao likewise, without the tools of other backends they list (pyproject.toml).
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps -c constraints.txt timm grad-cam ttach \
		executorch torchao
	touch $@

install: $(BIN)/.installed

test: $(BIN)/.installed
	$(BIN)/python -m pytest -n $(TEST_PROCESSES) --dist loadgroup

demo: $(BIN)/.installed
	$(BIN)/residual demo

clean:
	rm -rf $(VENV) runs .pytest_cache src/*.egg-info
