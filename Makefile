# Two commands on a fresh machine with Python 3.11 and pip:  make demo  |  make test
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU build of torch; on GPU clusters see README "GPUs" for the CUDA wheel.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
# every process (tests' subprocesses, Ray workers) finds this environment's tools first, e.g. the
# ninja DeepSpeed builds its CPU op with (a second, system ninja would make it rebuild)
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: demo test install bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) -m jobs.demo

test: $(VENV)/.installed
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf demo_out bench_out .pytest_cache
