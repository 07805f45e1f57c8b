"""LlamaCppBackend: the llama.cpp runtime for GGUF models on CPU, with the members of the decoder's Backend
protocol (gate/decode/backend.py); `train.py record --backend llama.cpp` runs it too (GGUFModel), so a
drafter can be fitted on the very features it reads when decoding on llama.cpp. It lives here, beside the
transformers loader (corpus_tools/models.py), because recording comes before decoding in the pipeline.

Why: users decode GGUF models with llama.cpp, which runs SmolLM2-135M several times faster than transformers
on these CPUs. A gate speed-up measured over the slower transformers loop means little to them.

Design. The backend drives llama.cpp's C API directly (llama_decode on a llama_batch), not the binding's
high-level `Llama` object, because the decode loop needs exactly the protocol's semantics:
  - positions are explicit: forward(tokens) puts token i at position n_cached + i of sequence 0, batch 1;
  - logits only for the rows asked for: the batch's per-token `logits` flags are set on the last `keep` rows,
    so a lossy catch-up pays the output layer once (llama.cpp stores flagged rows contiguously, in batch order).
    With hidden states on, llama.cpp computes every row's output (embeddings mode overrides the flags), so the
    backend flags them all and returns the last `keep`;
  - crop(n) is llama_memory_seq_rm(memory, 0, n, -1); reset() is llama_memory_clear;
  - hidden states: a context with embeddings on and pooling NONE returns, per flagged row, the last layer's
    state after the final norm, i.e. HF's last `hidden_states` entry (hidden_layer == n_layers). No other layer
    is reachable without an eval callback, so any other hidden_layer raises LayerUnavailable (a ValueError). With hidden_layer None
    the embeddings output is switched off (llama_set_embeddings), so a plain `big` run pays nothing for it;
  - logits and hidden rows are read as numpy views of llama.cpp's output buffers and copied once into torch,
    or not at all with forward(copy=False) (the decode loop's big passes: it clones the one row it keeps). A
    per-row Python list costs 2-4 ms per 49k-vocabulary row (measured below), a large share of a 135M step;
  - the batch's token/pos/logits arrays are numpy views too, filled with slice assignments; seq ids are set
    once when the batch is allocated;
  - batch invariance: the lossless --verify checks drafts with rows of a catch-up pass, where a big-only run
    computes the same rows one token at a time; both must give the same logits. Two settings make them
    bit-identical here (SmolLM2 Q4_1, any pass length): flash attention on (not llama.cpp's "auto"; without
    it batched and one-token logits differed by up to 0.6, and the binding's own Llama() defaults to off), and
    n_ubatch = 32: llama.cpp switches to another matmul kernel for chunks of 64 tokens or more (passes of up
    to 63 tokens matched exactly, 64 and 100 differed by up to 1.3 in a logit), so passes are computed in
    chunks of 32. Cost: a 256-token prompt pass took 2.16 s instead of 1.85 s (1 thread, busy machine);
  - n_ctx is checked before every forward: feeding past it raises ContextLengthError (corpus_tools.models);
  - threads: n_threads (default torch's thread count), set_threads(n). llama.cpp's CPU code here uses OpenMP
    and shares torch's libgomp.so.1 (same soname, loaded with torch), whose wait policy is read once, when
    torch loads: so OMP_WAIT_POLICY=PASSIVE is set by the entry points (infer.py, bench/*.py) before torch is
    imported, not here. With the default spin-wait, `big` with 2 threads on 2 busy cores ran at 14.7 tok/s,
    passive 33.2 (infer.py, 32 tokens, load 7).

Binding: llama-cpp-python 0.3.36 (pinned in requirements.txt, built from source by `make venv`), chosen by
measurement on this machine (2 shared cores under load 5-7, SmolLM2-135M Q4_1, 2 threads, 64 one-token decodes,
two back-to-back rounds per binding; each bundles its own llama.cpp version):
    reading one 49,152-wide logits row into numpy/torch: llama-cpp-python 0.18-0.19 ms (a zero-copy ctypes
    view, one copy), cyllama 0.2.18 2.1-4.2 ms (it returns a Python list); decode steps 18-32 ms for both.
The list read is paid per kept row, so a verify pass of 10 rows would pay 20-40 ms in it, more than the pass.
cyllama also needs a workaround to run at all here: its wheels for Python >= 3.12 do not install on 3.11, and
its last 3.11 wheel (0.2.18) raises in get_logits* unless `LlamaModel` is subclassed with an `n_vocab` property.
llama-cpp-python's cost is the source build: 24.8 min measured here (nice'd, load 6-7 on 2 cores; ~10 min on
2 idle cores), after which pip serves the cached wheel (a fresh venv installs it in 10 s). End to end,
bench/results/llamacpp*.md (3 passes over 4 prompts x 64 tokens, load 5-6): `big` on this backend reaches
0.88x (2 threads) and 0.94x (1 thread) of the binding's own greedy generate's tokens/s in the same run, and
2.5x / 3.4x the transformers backend's `big` on this busy machine (the issue's idle-machine numbers were ~6x).

    from corpus_tools.llamacpp import LlamaCppBackend
    big = LlamaCppBackend("model.gguf", hidden_layer=None, n_threads=2)
    logits, hidden = big.forward([1, 2, 3], keep=1)
"""
from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from corpus_tools.errors import ProjectError

if TYPE_CHECKING:
    from corpus_tools.models import ModelInfo

DEFAULT_MAX_CTX = 8192   # default n_ctx = min(the model's training context, this): bounds the KV cache memory
UBATCH = 32              # llama.cpp computes a pass in chunks of this many tokens: see the module docstring


def import_binding():
    """The llama_cpp module, or ImportError with the install command."""
    try:
        import llama_cpp
    except ImportError as e:
        raise ImportError(
            "the llama.cpp backend needs llama-cpp-python: `make venv` builds it, or "
            "pip install llama-cpp-python==0.3.36 (a source build of about 10 minutes)") from e
    global _LOG_CALLBACK
    if _LOG_CALLBACK is None:
        _LOG_CALLBACK = llama_cpp.llama_log_callback(_log_errors_only)
        llama_cpp.llama_log_set(_LOG_CALLBACK, ctypes.c_void_p(0))
    return llama_cpp


GGML_LOG_LEVEL_ERROR = 4   # ggml.h: NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5
_LOG_CALLBACK = None       # the ctypes callback must outlive every llama.cpp call


def _log_errors_only(level: int, text: bytes, user_data) -> None:
    # The binding's own callback maps levels by an older enum and prints WARN lines (e.g. about the pooling
    # type this backend sets on purpose) on every context; llama.cpp's errors still reach stderr.
    if level == GGML_LOG_LEVEL_ERROR:
        sys.stderr.write(text.decode("utf-8", "replace"))


def gguf_path(model: str | os.PathLike) -> Path:
    """A .gguf path, or a packaged alias (corpus_tools.models.ALIASES) resolved to its one GGUF file."""
    from corpus_tools.models import ALIASES, ModelSourceError, check_gguf, joined_gguf, packaged_gguf

    if str(model) in ALIASES:
        path = joined_gguf(packaged_gguf(str(model)), str(model))   # parts are joined once into the cache
    else:
        path = Path(model)
        if not path.is_file():
            raise ModelSourceError(f"{model}: the llama.cpp backend needs a GGUF model, a packaged alias "
                                   f"({', '.join(ALIASES)}) or a .gguf file")
    check_gguf(path)
    return path


class LayerUnavailable(ValueError, ProjectError):
    """A hidden layer other than the last: llama.cpp gives no other (a project error: one CLI error line)."""


class LlamaCppBackend:
    """A GGUF model in llama.cpp with the KV cache of one sequence; see the module docstring."""

    def __init__(self, model: str | os.PathLike, name: str = "", hidden_layer: int | None = None,
                 n_ctx: int | None = None, n_threads: int | None = None, n_ubatch: int = UBATCH):
        self.lib = import_binding()
        self.path = gguf_path(model)
        self.name = name or str(model)
        self._model = self._ctx = None
        self._load_model()
        self.n_layers = self.lib.llama_model_n_layer(self._model)
        self.hidden_size = self.lib.llama_model_n_embd(self._model)
        self.vocab_size = self.lib.llama_vocab_n_tokens(self.lib.llama_model_get_vocab(self._model))
        self.n_ctx_train = self.lib.llama_model_n_ctx_train(self._model)
        self.n_params = int(self.lib.llama_model_n_params(self._model))
        self.n_threads = n_threads or torch.get_num_threads()
        self._make_context(n_ctx or min(self.n_ctx_train, DEFAULT_MAX_CTX), n_ubatch)
        self._make_batch()
        self.hidden_layer = hidden_layer
        self.reset()

    # -- set-up ------------------------------------------------------------------------------------------------
    def _load_model(self) -> None:
        params = self.lib.llama_model_default_params()
        self._model = self.lib.llama_model_load_from_file(str(self.path).encode(), params)
        if not self._model:
            from corpus_tools.models import ModelSourceError
            raise ModelSourceError(f"llama.cpp could not load {self.path}")

    def _make_context(self, n_ctx: int, n_ubatch: int) -> None:
        p = self.lib.llama_context_default_params()
        p.n_ctx = n_ctx
        p.n_batch = n_ctx                  # one forward may hold the whole context; n_ubatch splits it
        p.n_ubatch = min(n_ubatch, n_ctx)  # batch invariance: see the module docstring
        p.n_seq_max = 1
        p.n_threads = p.n_threads_batch = self.n_threads
        p.embeddings = False               # switched on by the hidden_layer setter
        p.pooling_type = self.lib.LLAMA_POOLING_TYPE_NONE
        p.flash_attn_type = self.lib.LLAMA_FLASH_ATTN_TYPE_ENABLED   # batch-invariant logits: see the docstring
        self._ctx = self.lib.llama_init_from_model(self._model, p)
        if not self._ctx:
            raise RuntimeError(f"llama.cpp could not create a context of {n_ctx} tokens for {self.path}")
        self.n_ctx = self.lib.llama_n_ctx(self._ctx)
        self._memory = self.lib.llama_get_memory(self._ctx)

    def _make_batch(self) -> None:
        self._batch = self.lib.llama_batch_init(self.n_ctx, 0, 1)
        b, n = self._batch, self.n_ctx
        self._tok = np.ctypeslib.as_array(b.token, shape=(n,))
        self._pos = np.ctypeslib.as_array(b.pos, shape=(n,))
        self._flags = np.ctypeslib.as_array(b.logits, shape=(n,))
        np.ctypeslib.as_array(b.n_seq_id, shape=(n,))[:] = 1
        for i in range(n):                 # one sequence (id 0) for every slot, set once
            b.seq_id[i][0] = 0

    # -- protocol ----------------------------------------------------------------------------------------------
    @property
    def hidden_layer(self) -> int | None:
        return self._hidden_layer

    @hidden_layer.setter
    def hidden_layer(self, layer: int | None) -> None:
        if layer is not None and layer != self.n_layers:
            raise LayerUnavailable(
                f"hidden_layer {layer}: the llama.cpp backend gives the last layer only "
                f"(hidden_layer={self.n_layers} for {self.name}, the post-norm state) or none (None)")
        self._hidden_layer = layer
        self.lib.llama_set_embeddings(self._ctx, layer is not None)

    def is_eog(self, token: int) -> bool:
        """Does llama.cpp end generation at this token (EOS, EOT, ...)?"""
        return 0 <= token < self.vocab_size and bool(
            self.lib.llama_vocab_is_eog(self.lib.llama_model_get_vocab(self._model), token))

    hidden_all = False     # True: hidden rows for every fed token, not only the last `keep` (see Backend)

    def set_threads(self, n: int) -> None:
        self.n_threads = n
        self.lib.llama_set_n_threads(self._ctx, n, n)

    def reset(self) -> None:
        self.lib.llama_memory_clear(self._memory, True)
        self.n_cached = 0
        self.calls = self.tokens_fed = self.tokens_cropped = 0

    def forward(self, tokens: Sequence[int], keep: int | None = None, copy: bool = True):
        """The Backend protocol's forward. copy=False returns zero-copy views of llama.cpp's output buffers,
        valid until this backend's next forward (the decode loop's verify passes need one argmax per row and
        clone the one row they keep)."""
        n = len(tokens)
        if n == 0:
            raise ValueError("forward() needs at least one token")
        keep = n if keep is None else max(1, min(keep, n))
        self._check_room(n)
        self._fill_batch(tokens, keep)
        rc = self.lib.llama_decode(self._ctx, self._batch)
        if rc != 0:
            raise RuntimeError(f"{self.name}: llama_decode failed (code {rc}) on {n} tokens at {self.n_cached}")
        self.n_cached += n
        self.calls += 1
        self.tokens_fed += n
        # The _ith getters map a batch index to its output row: row n - keep starts the kept rows whether
        # the batch flagged those only or every row.
        logits = self._rows(self.lib.llama_get_logits_ith(self._ctx, n - keep), keep, self.vocab_size, copy)
        hidden = None
        if self._hidden_layer is not None:
            rows = n if self.hidden_all else keep
            hidden = self._rows(self.lib.llama_get_embeddings_ith(self._ctx, n - rows), rows, self.hidden_size,
                                copy)
        return logits, hidden

    def crop(self, n: int) -> None:
        if not 0 <= n <= self.n_cached:
            raise ValueError(f"crop({n}) outside 0..{self.n_cached}")
        if n < self.n_cached:
            if not self.lib.llama_memory_seq_rm(self._memory, 0, n, -1):
                raise RuntimeError(f"{self.name}: llama_memory_seq_rm could not crop to {n}")
            self.tokens_cropped += self.n_cached - n
            self.n_cached = n

    # -- helpers -----------------------------------------------------------------------------------------------
    def _check_room(self, n: int) -> None:
        from corpus_tools.models import check_context

        check_context(self.n_cached + n, {"context_length": self.n_ctx, "name": self.name},
                      f"llama.cpp context: {self.n_cached:,} cached + {n:,} fed")

    def _fill_batch(self, tokens: Sequence[int], keep: int) -> None:
        n = len(tokens)
        ids = np.asarray(tokens, dtype=np.int64)
        if ids.min() < 0 or ids.max() >= self.vocab_size:
            raise ValueError(f"{self.name}: token ids must lie in 0..{self.vocab_size - 1}")
        self._tok[:n] = ids
        self._pos[:n] = np.arange(self.n_cached, self.n_cached + n)
        # With embeddings on, llama.cpp outputs every row whatever the flags say (and warns): flag them all.
        first = 0 if self._hidden_layer is not None else n - keep
        self._flags[:first] = 0
        self._flags[first:n] = 1
        self._batch.n_tokens = n

    @staticmethod
    def _rows(ptr, rows: int, width: int, copy: bool) -> torch.Tensor:
        # A view of llama.cpp's output buffer, which the next decode overwrites: copied unless asked not to.
        if not ptr:
            raise RuntimeError("llama.cpp returned no output buffer for this batch")
        view = np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(rows, width))
        return torch.from_numpy(view.copy() if copy else view)

    def close(self) -> None:
        if self._ctx:
            self.lib.llama_batch_free(self._batch)
            self.lib.llama_free(self._ctx)
            self._ctx = None
        if self._model:
            self.lib.llama_model_free(self._model)
            self._model = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def open_gguf(name: str, **kw) -> tuple[LlamaCppBackend, object, "ModelInfo"]:
    """(backend, tokenizer, ModelInfo) of a GGUF model (packaged alias or .gguf file) without transformers
    weights: the tokenizer from the GGUF (cached, corpus_tools.models.load_tokenizer), the sizes from llama.cpp.
    Layers, width, vocabulary and tokenizer fingerprint equal the transformers model's, so artifacts fitted on
    either runtime's records are checked alike."""
    from corpus_tools.models import ModelInfo, load_tokenizer, tokenizer_fingerprint

    backend = LlamaCppBackend(name, name=name, **kw)
    tok = load_tokenizer(name)
    info = ModelInfo(name=name, path=str(backend.path), dtype="gguf", n_params=backend.n_params,
                     vocab_size=backend.vocab_size, n_layers=backend.n_layers, hidden_size=backend.hidden_size,
                     fingerprint=tokenizer_fingerprint(tok), context_length=backend.n_ctx)
    return backend, tok, info


def eos_ids(backend: LlamaCppBackend, tokenizer) -> tuple:
    """End-of-generation ids as llama.cpp sees them (llama_vocab_is_eog over the special tokens), plus the
    tokenizer's eos token."""
    ids = {i for i in getattr(tokenizer, "all_special_ids", []) if backend.is_eog(i)}
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return tuple(sorted(ids))


class GGUFModel:
    """A llama.cpp model as corpus_tools uses a transformers causal LM. Recording calls it:
    model(x [B, L], logits_to_keep=k, output_hidden_states=bool) -> .logits [B, k, V] and .hidden_states, where
    only the last layer (index n_layers, post-norm) exists; each window is one fresh pass over its tokens.
    selfgen calls `greedy`."""
    device = torch.device("cpu")

    def __init__(self, backend: LlamaCppBackend):
        self.backend = backend

    def __call__(self, x: torch.Tensor, logits_to_keep: int, output_hidden_states: bool = False):
        from types import SimpleNamespace

        b = self.backend
        b.hidden_layer = b.n_layers if output_hidden_states else None
        b.hidden_all = True
        logits, hidden = [], []
        for row in x.tolist():
            b.reset()
            lg, h = b.forward(row, keep=logits_to_keep)
            logits.append(lg)
            hidden.append(h)
        states = {b.n_layers: torch.stack(hidden)} if output_hidden_states else None
        return SimpleNamespace(logits=torch.stack(logits), hidden_states=states)

    def greedy(self, prompt: list[int], new_tokens: int, eos_ids) -> list[int]:
        """The greedy continuation of one prompt, cut before the first EOS."""
        b = self.backend
        b.hidden_layer = None
        b.reset()
        logits, _ = b.forward(prompt, keep=1)
        out: list[int] = []
        while len(out) < new_tokens:
            tok = int(logits[-1].argmax())
            if tok in eos_ids:
                break
            out.append(tok)
            if len(out) < new_tokens:
                logits, _ = b.forward([tok], keep=1)
        return out
