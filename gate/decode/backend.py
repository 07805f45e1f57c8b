"""Backends: one small interface over model runtimes, so the decode loop never touches a KV cache itself.

A backend holds one model and the KV cache of one sequence (batch 1). Positions are explicit: the tokens
fed by `forward` occupy positions n_cached .. n_cached+n-1, and the cache always holds a prefix of the text.

    logits, hidden = backend.forward(tokens, keep=None)   # append to the cache; outputs for the last `keep`
    backend.forward(tokens, keep, copy=False)             # outputs may be views valid until the next forward
    backend.crop(n)                                       # keep positions 0..n-1 (rollback)
    backend.reset()                                       # empty cache, zero counters
    backend.n_cached, backend.vocab_size, backend.hidden_layer, backend.name
    backend.calls, backend.tokens_fed, backend.tokens_cropped          # the cost ledger reads these

`logits` is float32 [keep, V]; `hidden` is float32 [keep, d] at `hidden_layer` (HF numbering: 0 = embeddings,
L = output of block L, n_layers = the last entry), or None when hidden_layer is None. With `hidden_all` set,
`hidden` has a row for every fed token ([n, d]): a drafter that reads every position (the feature head) needs
them, and both runtimes compute them anyway.

HFBackend wraps a transformers causal LM with a DynamicCache. Backends are made by
gate/decode/runtime.py::make_backend from its BACKENDS table (kind -> class): a new backend is one class with
these members plus one entry there. LlamaCppBackend (corpus_tools/llamacpp.py, kind "llama.cpp") is the other one:
llama_decode with logits for the kept rows, llama_memory_seq_rm for crop, the last layer's hidden state only.
"""
from __future__ import annotations

import copy
from typing import Protocol, Sequence

import torch


class Backend(Protocol):
    name: str
    vocab_size: int
    hidden_layer: int | None
    hidden_all: bool
    n_cached: int
    calls: int
    tokens_fed: int
    tokens_cropped: int

    def forward(self, tokens: Sequence[int], keep: int | None = None, copy: bool = True
                ) -> tuple[torch.Tensor, torch.Tensor | None]: ...

    def crop(self, n: int) -> None: ...

    def reset(self) -> None: ...


def text_config(model):
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def make_contiguous(model: torch.nn.Module) -> None:
    # De-quantized GGUF weights can be strided views; a strided weight makes every matmul copy it first.
    for p in model.parameters():
        if not p.is_contiguous():
            p.data = p.data.contiguous()


def early_exit_view(model, k: int):
    """The first k decoder blocks + final norm + lm_head of `model`, sharing its weights (no copy).

    An honest "small model" for a big model that has no smaller sibling with its tokenizer: the same as
    transformers' `assistant_early_exit=k`. Not trained for early exit, so its predictions are weak.
    """
    prefix = model.base_model_prefix
    base = getattr(model, prefix)
    n = len(base.layers)
    if not 1 <= k <= n:
        raise ValueError(f"early exit after {k} layers: the model has {n}")
    cfg = copy.deepcopy(model.config)
    cfg.num_hidden_layers = k
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = cfg.layer_types[:k]
    small_base = copy.copy(base)
    small_base._modules = dict(base._modules)   # a shallow copy shares the module dict: split it
    small_base.layers = torch.nn.ModuleList(list(base.layers[:k]))
    small_base.config = cfg
    view = copy.copy(model)
    view._modules = dict(model._modules)
    setattr(view, prefix, small_base)
    view.config = cfg
    return view


class HFBackend:
    """A transformers causal LM with a DynamicCache, tuned for batch 1 on CPU."""
    hidden_all = False

    def __init__(self, model, name: str = "", hidden_layer: int | None = None):
        self.model = model.eval()
        make_contiguous(self.model)
        cfg = text_config(self.model)
        self.n_layers = cfg.num_hidden_layers
        self.name = name or getattr(cfg, "_name_or_path", "") or type(model).__name__
        self.vocab_size = self.model.get_output_embeddings().weight.shape[0]
        self.hidden_size = cfg.hidden_size
        self.hidden_layer = hidden_layer
        self.reset()

    @property
    def hidden_layer(self) -> int | None:
        return self._hidden_layer

    @hidden_layer.setter
    def hidden_layer(self, layer: int | None) -> None:
        if layer is not None and not 0 <= layer <= self.n_layers:
            raise ValueError(f"hidden_layer {layer} outside 0..{self.n_layers} for {self.name}")
        self._hidden_layer = layer

    def reset(self) -> None:
        from transformers import DynamicCache

        self.cache = DynamicCache(config=self.model.config)
        self.n_cached = 0
        self.calls = self.tokens_fed = self.tokens_cropped = 0

    @torch.inference_mode()
    def forward(self, tokens: Sequence[int], keep: int | None = None, copy: bool = True):
        n = len(tokens)   # the outputs are fresh tensors either way
        if n == 0:
            raise ValueError("forward() needs at least one token")
        keep = n if keep is None else max(1, min(keep, n))
        ids = torch.tensor([list(tokens)], dtype=torch.long)
        pos = torch.arange(self.n_cached, self.n_cached + n).unsqueeze(0)
        want_hidden = self._hidden_layer is not None
        # logits_to_keep: the output layer is a big share of a small model's cost; a lossy catch-up needs
        # the last row only.
        out = self.model(input_ids=ids, position_ids=pos, past_key_values=self.cache, use_cache=True,
                         logits_to_keep=keep, output_hidden_states=want_hidden)
        self.cache = out.past_key_values
        self.n_cached += n
        self.calls += 1
        self.tokens_fed += n
        logits = out.logits[0, -keep:].float()
        rows = n if self.hidden_all else keep
        hidden = out.hidden_states[self._hidden_layer][0, -rows:].float() if want_hidden else None
        return logits, hidden

    def crop(self, n: int) -> None:
        if not 0 <= n <= self.n_cached:
            raise ValueError(f"crop({n}) outside 0..{self.n_cached}")
        if n < self.n_cached:
            self.cache.crop(n - self.n_cached)   # transformers 5: a negative count removes from the end
            self.tokens_cropped += self.n_cached - n
            self.n_cached = n


def catch_up(backend: Backend, ids: Sequence[int], keep: int = 1):
    """Feed backend every token of `ids` it has not seen; return (logits, hidden) of the last `keep` rows.

    When the cache already holds all of ids, the last token is fed again (crop + forward) so there is a row
    for the next position; the loop avoids that case, this only keeps the helper total.
    """
    if backend.n_cached > len(ids):
        raise ValueError(f"{backend.name}: cache ({backend.n_cached}) is longer than the text ({len(ids)})")
    if backend.n_cached == len(ids):
        backend.crop(len(ids) - 1)
    return backend.forward(ids[backend.n_cached:], keep=keep)
