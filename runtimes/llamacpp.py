"""LlamaCppBackend: a GGUF model in llama.cpp behind the Backend protocol (runtimes/backend.py), on CPU.

It drives llama.cpp's C API (llama_decode on a llama_batch) through llama-cpp-python's ctypes layer, not the
binding's `Llama` object, to get the protocol's semantics: explicit positions (sequence 0), logits only for
the kept rows, crop = llama_memory_seq_rm, zero-copy numpy views of the output buffers. Flash attention on and
n_ubatch = 32 make a batched pass give the same logits as one-token steps (the lossless --verify needs it) on
most weight types; `exact_pass` (probed, cached) says how long a pass stays exact on this one (K-quants: 3).
Hidden states: any layer in HF numbering, or a tuple of layers (rows concatenated): the last (n_layers) is
llama.cpp's post-norm embeddings output, layer l < n_layers the input of block l (llama_set_embeddings_layer_inp,
on the architectures in LAYER_INP_ARCHS; elsewhere LayerUnavailable). Feeding past n_ctx raises
ContextLengthError. Design notes and measurements: docs/runtimes.md.

    big = LlamaCppBackend("model.gguf", hidden_layer=None, n_threads=2)
    logits, hidden = big.forward([1, 2, 3], keep=1)
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import os
import platform
import sys
from typing import Sequence

import numpy as np
import torch

from common.errors import ProjectError
from common.files import write_json
from runtimes.backend import HiddenLayer, concat_layers, hidden_layers
from runtimes.info import ModelInfo, ModelSourceError, check_context, tokenizer_fingerprint
from runtimes.loading import load_tokenizer
from runtimes.sources import cache_dir, gguf_path

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


class LayerUnavailable(ValueError, ProjectError):
    """A hidden layer llama.cpp cannot give for this model (a project error: one CLI error line)."""


# The input of block l (HF's hidden_states[l], l < n_layers) comes from libllama's staging API (the vendored
# src/llama-ext.h): declared C++, so exported under Itanium-mangled names. Enabling layer l makes the graph mark
# res->t_layer_inp[l] as an output; llama.cpp copies it for every batch token (whatever the logits flags say),
# in batch order, into a buffer of n_batch rows that the getter returns whole.
LAYER_INP_SET = ("llama_set_embeddings_layer_inp", "_Z30llama_set_embeddings_layer_inpP13llama_contextjb")
LAYER_INP_GET = ("llama_get_embeddings_layer_inp", "_Z30llama_get_embeddings_layer_inpP13llama_contextj")
# GGUF architectures whose graph in this llama.cpp sets t_layer_inp[l] = the block's input for every l
# (src/models/<arch>.cpp). On any other one llama.cpp aborts the process (GGML_ASSERT) at the next decode.
LAYER_INP_ARCHS = frozenset({"llama", "qwen3", "qwen3moe"})


def _ext_function(lib, names: tuple[str, str], argtypes: list, restype):
    """A libllama function of the staging API by its C name or, as built here, its mangled C++ name; None if
    the library has neither."""
    cdll = lib.llama_cpp._lib
    for symbol in names:
        try:
            fn = getattr(cdll, symbol)
        except AttributeError:
            continue
        fn.argtypes, fn.restype = argtypes, restype
        return fn
    return None


class LlamaCppBackend:
    """A GGUF model in llama.cpp with the KV cache of one sequence; see the module docstring."""

    def __init__(self, model: str | os.PathLike, name: str = "", hidden_layer: HiddenLayer = None,
                 n_ctx: int | None = None, n_threads: int | None = None, n_ubatch: int = UBATCH,
                 weights_of: "LlamaCppBackend | None" = None):
        self.lib = import_binding()
        self.path = gguf_path(model)
        self.name = name or str(model)
        self._model = self._ctx = None
        self._weights_of = weights_of    # another backend of this file: share its loaded weights (a new context)
        if weights_of is not None and weights_of.path.resolve() == self.path.resolve() and weights_of._model:
            self._model = weights_of._model
        else:
            self._weights_of = None
            self._load_model()
        self.n_layers = self.lib.llama_model_n_layer(self._model)
        self.hidden_size = self.lib.llama_model_n_embd(self._model)
        self.vocab_size = self.lib.llama_vocab_n_tokens(self.lib.llama_model_get_vocab(self._model))
        self.n_ctx_train = self.lib.llama_model_n_ctx_train(self._model)
        self.n_params = int(self.lib.llama_model_n_params(self._model))
        self.arch = self._meta("general.architecture")
        self._inp_set = _ext_function(self.lib, LAYER_INP_SET, [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_bool],
                                      None)
        self._inp_get = _ext_function(self.lib, LAYER_INP_GET, [ctypes.c_void_p, ctypes.c_uint32], ctypes.c_void_p)
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
            raise ModelSourceError(f"llama.cpp could not load {self.path}")

    def _meta(self, key: str) -> str:
        buf = ctypes.create_string_buffer(256)
        n = self.lib.llama_model_meta_val_str(self._model, key.encode(), buf, len(buf))
        return buf.value.decode() if n >= 0 else ""

    def _make_context(self, n_ctx: int, n_ubatch: int) -> None:
        p = self.lib.llama_context_default_params()
        p.n_ctx = n_ctx
        p.n_batch = n_ctx                  # one forward may hold the whole context; n_ubatch splits it
        p.n_ubatch = min(n_ubatch, n_ctx)  # batch invariance: see the module docstring
        self.n_ubatch = p.n_ubatch
        p.n_seq_max = self.n_seq         # runtimes/batched.py: one KV stream per sequence (kv_unified off)
        p.kv_unified = self.kv_unified
        p.n_threads = p.n_threads_batch = self.n_threads
        p.embeddings = False               # switched on by the hidden_layer setter (as are layer inputs)
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
    def hidden_layer(self) -> HiddenLayer:
        return self._hidden_layer

    @hidden_layer.setter
    def hidden_layer(self, layer: HiddenLayer) -> None:
        layers = hidden_layers(layer, self.n_layers, self.name)
        inputs = {i for i in layers if i < self.n_layers}
        if inputs and not self.layer_inputs:
            raise LayerUnavailable(
                f"hidden_layer {layer}: llama.cpp gives {self.name} ({self.arch or 'unknown'} architecture) the "
                f"last layer only (hidden_layer={self.n_layers}, the post-norm state) or none (None); inner layers "
                f"on {', '.join(sorted(LAYER_INP_ARCHS))} models")
        for i in sorted(inputs ^ self._inputs_on):   # each switch makes llama.cpp re-plan its graph once
            self._inp_set(self._ctx, i, i in inputs)
        self._inputs_on = frozenset(inputs)
        self._layers = layers
        self._hidden_layer = layers if isinstance(layer, (tuple, list)) else layer
        self.lib.llama_set_embeddings(self._ctx, self._post_norm)

    @property
    def layer_inputs(self) -> bool:
        """Can this model give layers other than the last (the library exports them, the graph marks them)?"""
        return self._inp_set is not None and self._inp_get is not None and self.arch in LAYER_INP_ARCHS

    @property
    def _post_norm(self) -> bool:
        # the last layer is llama.cpp's embeddings output, which makes it output every row (flags or not)
        return self.n_layers in self._layers

    def is_eog(self, token: int) -> bool:
        """Does llama.cpp end generation at this token (EOS, EOT, ...)?"""
        return 0 <= token < self.vocab_size and bool(
            self.lib.llama_vocab_is_eog(self.lib.llama_model_get_vocab(self._model), token))

    hidden_all = False     # True: hidden rows for every fed token, not only the last `keep` (see Backend)
    _inputs_on = frozenset()   # layers whose input llama.cpp's context extracts now
    n_seq = 1              # sequences in the context (LlamaCppSlots: more)
    kv_unified = False
    device = torch.device("cpu")
    _exact = False         # exact_pass not probed yet

    @property
    def exact_pass(self) -> int | None:
        """The longest pass (tokens) whose logits equal one-token steps bit for bit, None for any length. Not
        every weight type gives that: llama.cpp's CPU kernels for K-quants (Q4_K, Q6_K) switch to other
        summation orders for passes of 4 or more tokens. The lossless --verify caps its passes at this. Probed
        once per model file, threads and CPU (about 100 one-token steps), cached; the cache is reset after."""
        if self._exact is False:
            key = dict(file=str(self.path.resolve()), size=self.path.stat().st_size, ubatch=self.n_ubatch,
                       mtime_ns=self.path.stat().st_mtime_ns, threads=self.n_threads, cpu=platform.processor()
                       or platform.machine(), cores=os.cpu_count(), binding=self.lib.__version__)
            digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
            cache = cache_dir() / "exact_pass" / f"{digest}.json"
            try:
                self._exact = json.loads(cache.read_text())["exact_pass"]
            except (OSError, ValueError, KeyError):
                self._exact = probe_exact_pass(self)
                write_json(cache, dict(key=key, exact_pass=self._exact))
        return self._exact

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
        if self._layers:
            rows = n if self.hidden_all else keep
            hidden = self._hidden_rows(n - rows, rows, copy)
        return logits, hidden

    def crop(self, n: int) -> None:
        if not 0 <= n <= self.n_cached:
            raise ValueError(f"crop({n}) outside 0..{self.n_cached}")
        if n < self.n_cached:
            if not self.lib.llama_memory_seq_rm(self._memory, 0, n, -1):
                raise RuntimeError(f"{self.name}: llama_memory_seq_rm could not crop to {n}")
            self.tokens_cropped += self.n_cached - n
            self.n_cached = n

    def score_windows(self, x: torch.Tensor, keep: int, layers: Sequence[int]):
        """Recording: one fresh pass (cache reset) over each row of x [B, L]; logits [B, keep, V] and
        {layer: hidden [B, L, d]} for `layers` (HF numbering; inner ones where `layer_inputs`)."""
        layers = tuple(layers)
        saved, self.hidden_layer = self.hidden_layer, layers or None
        hidden_all, self.hidden_all = self.hidden_all, True
        logits, hidden = [], []
        try:
            for row in x.tolist():
                self.reset()
                lg, h = self.forward(row, keep=keep)
                logits.append(lg)
                hidden.append(h)
        finally:
            self.hidden_all = hidden_all
            self.hidden_layer = saved
        if not layers:
            return torch.stack(logits), {}
        h = torch.stack(hidden).unflatten(-1, (len(layers), self.hidden_size))   # [B, L, layers, d]
        return torch.stack(logits), {layer: h[:, :, i].contiguous() for i, layer in enumerate(layers)}

    def greedy(self, prompts: Sequence[Sequence[int]], new_tokens: int, eos_ids) -> list[list[int]]:
        """Greedy continuations, one prompt at a time, cut before the first EOS."""
        self.hidden_layer = None
        outs = []
        for prompt in prompts:
            self.reset()
            logits, _ = self.forward(list(prompt), keep=1)
            out: list[int] = []
            while len(out) < new_tokens:
                tok = int(logits[-1].argmax())
                if tok in eos_ids:
                    break
                out.append(tok)
                if len(out) < new_tokens:
                    logits, _ = self.forward([tok], keep=1)
            outs.append(out)
        return outs

    # -- helpers -----------------------------------------------------------------------------------------------
    def _check_room(self, n: int) -> None:
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
        first = 0 if self._post_norm else n - keep
        self._flags[:first] = 0
        self._flags[first:n] = 1
        self._batch.n_tokens = n

    def _hidden_rows(self, first: int, rows: int, copy: bool) -> torch.Tensor:
        """Hidden rows of the last pass's batch tokens first..first+rows-1, the layers asked for side by side."""
        parts = []
        for layer in self._layers:
            if layer == self.n_layers:   # llama.cpp's embeddings output: every row was flagged, so row i = token i
                ptr = self.lib.llama_get_embeddings_ith(self._ctx, first)
            else:                        # a block's input: a row per batch token, the whole buffer
                base = self._inp_get(self._ctx, layer)
                ptr = base and base + first * self.hidden_size * ctypes.sizeof(ctypes.c_float)
            parts.append(self._rows(ptr, rows, self.hidden_size, copy and len(self._layers) == 1))
        return concat_layers(parts)

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
        if self._model and self._weights_of is None:
            self.lib.llama_model_free(self._model)
        self._model = self._weights_of = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


EXACT_LADDER = (2, 3, 4, 5, 6, 8, 12, 16, 24, UBATCH)   # pass lengths probe_exact_pass tries, in order


def probe_exact_pass(backend: LlamaCppBackend, prefix: int = 8) -> int | None:
    """The longest pass in EXACT_LADDER whose logits equal one-token steps after the same prefix (random
    tokens, fixed seed), bit for bit; None when all do (a longer pass is computed in chunks of n_ubatch, each
    exact). Leaves the backend reset, its hidden-state setting as it was."""
    n = EXACT_LADDER[-1]
    ids = torch.randint(0, backend.vocab_size, (prefix + n,), generator=torch.Generator().manual_seed(0)).tolist()
    saved = backend.hidden_layer
    backend.hidden_layer = None
    try:
        backend.reset()
        backend.forward(ids[:prefix], keep=1)
        steps = torch.stack([backend.forward([t], keep=1)[0][0] for t in ids[prefix:]])
        exact = 1
        for k in EXACT_LADDER:
            backend.crop(prefix)
            if not torch.equal(backend.forward(ids[prefix:prefix + k], keep=k)[0], steps[:k]):
                return exact
            exact = k
        return None
    finally:
        backend.reset()
        backend.hidden_layer = saved


def open_gguf(name: str, **kw) -> tuple[LlamaCppBackend, object, ModelInfo]:
    """(backend, tokenizer, ModelInfo) of a GGUF model (packaged alias or .gguf file) without transformers
    weights: the tokenizer from the GGUF (cached, runtimes.loading.load_tokenizer), the sizes from llama.cpp.
    Layers, width, vocabulary and tokenizer fingerprint equal the transformers model's, so artifacts fitted on
    either runtime's records are checked alike."""
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
