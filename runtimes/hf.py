"""HFBackend: a transformers causal LM with a DynamicCache, behind the Backend protocol (runtimes/backend.py).

Tuned for batch 1 on CPU: weights made contiguous, `logits_to_keep` so a catch-up pays the output layer only
for the rows kept. Any hidden layer is available, or a tuple of them (rows concatenated). `early_exit_view`
gives the first k blocks of a model as a "small model" sharing its weights (transformers'
`assistant_early_exit`). Recording calls `score_windows` (batched, any layers), selfgen `greedy` (batched,
left-padded).
"""
from __future__ import annotations

import copy
from typing import Sequence

import torch

from runtimes.backend import HiddenLayer, concat_layers, hidden_layers


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

    def __init__(self, model, name: str = "", hidden_layer: HiddenLayer = None):
        self.model = model.eval()
        self.device = next(model.parameters()).device
        make_contiguous(self.model)
        cfg = text_config(self.model)
        self.n_layers = cfg.num_hidden_layers
        self.name = name or getattr(cfg, "_name_or_path", "") or type(model).__name__
        self.vocab_size = self.model.get_output_embeddings().weight.shape[0]
        self.hidden_size = cfg.hidden_size
        self.hidden_layer = hidden_layer
        self.reset()

    @property
    def hidden_layer(self) -> HiddenLayer:
        return self._hidden_layer

    @hidden_layer.setter
    def hidden_layer(self, layer: HiddenLayer) -> None:
        self._layers = hidden_layers(layer, self.n_layers, self.name)
        self._hidden_layer = tuple(self._layers) if isinstance(layer, (tuple, list)) else layer

    def reset(self) -> None:
        from transformers import DynamicCache  # here: importing transformers takes seconds

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
        want_hidden = bool(self._layers)
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
        hidden = None
        if want_hidden:
            hidden = concat_layers([out.hidden_states[i][0, -rows:] for i in self._layers]).float()
        return logits, hidden

    def crop(self, n: int) -> None:
        if not 0 <= n <= self.n_cached:
            raise ValueError(f"crop({n}) outside 0..{self.n_cached}")
        if n < self.n_cached:
            self.cache.crop(n - self.n_cached)   # transformers 5: a negative count removes from the end
            self.tokens_cropped += self.n_cached - n
            self.n_cached = n

    @torch.inference_mode()
    def score_windows(self, x: torch.Tensor, keep: int, layers: Sequence[int]):
        """One fresh pass (no cache) over each row of x [B, L]: logits [B, keep, V] of the last `keep` positions
        and {layer: hidden [B, L, d]} for `layers` (in the model's dtype, on its device)."""
        out = self.model(x.to(self.device), logits_to_keep=keep, output_hidden_states=bool(layers))
        self.calls += 1
        self.tokens_fed += x.numel()
        return out.logits, {layer: out.hidden_states[layer] for layer in layers}

    @torch.inference_mode()
    def greedy(self, prompts: Sequence[Sequence[int]], new_tokens: int, eos_ids) -> list[list[int]]:
        """Greedy continuations of prompts in one batch (shorter ones left-padded and masked), cut before the
        first EOS. The cache is not used."""
        n = max(map(len, prompts))
        pad = eos_ids[0] if eos_ids else 0
        x = torch.tensor([[pad] * (n - len(p)) + list(p) for p in prompts], device=self.device)
        mask = torch.tensor([[0] * (n - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        out = self.model.generate(x, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                                  pad_token_id=pad if eos_ids else None)[:, n:]
        return [row[:next((i for i, t in enumerate(row) if t in eos_ids), len(row))] for row in out.tolist()]

