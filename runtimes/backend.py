"""The Backend protocol: one model with the KV cache of one sequence, so no caller touches a cache itself.

    logits, hidden = backend.forward(tokens, keep=None)   # append to the cache; outputs for the last `keep`
    backend.forward(tokens, keep, copy=False)             # outputs may be views valid until the next forward
    backend.crop(n); backend.reset()                      # keep positions 0..n-1 (rollback); empty cache
    logits, hiddens = backend.score_windows(x, keep, layers)   # recording: a fresh pass over each row of x
    backend.greedy(prompts, new_tokens, eos_ids)          # greedy continuations, cut before the first EOS
    backend.n_cached, vocab_size, hidden_layer, hidden_all, name, calls, tokens_fed, tokens_cropped

Positions are explicit: fed tokens occupy n_cached .. n_cached+n-1; the cache always holds a prefix of the text.
`logits`: float32 [keep, V]; `hidden`: float32 [keep, d] at `hidden_layer` (HF numbering: l is the input of
decoder layer l, n_layers the final post-norm state) or None; a tuple of layers gives each row the concatenation
of those layers' states in that order, [keep, len(layers) * d] (an EAGLE-3 drafter reads three); `hidden_all`:
a row per fed token. `LM`: a policy's view of a predictor; `catch_up` feeds what its cache lacks. docs/runtimes.md.
"""
from __future__ import annotations

import operator
from typing import Protocol, Sequence, Union

import torch

HiddenLayer = Union[int, tuple[int, ...], None]   # one layer, several (rows concatenated in order), or none


def eagle3_layers(n_layers: int) -> tuple[int, int, int]:
    """EAGLE-3's low, middle and high layers of a model with n_layers blocks: the inputs of blocks 2, n/2 and n-3 (HF
    numbering; llama.cpp's converter and vLLM pick the same)."""
    return (min(2, n_layers), n_layers // 2, max(n_layers - 3, 0))


def hidden_layers(layer: HiddenLayer, n_layers: int, name: str = "") -> tuple[int, ...]:
    """The layers a hidden_layer setting asks for, each checked to lie in 0..n_layers: () for None."""
    layers = () if layer is None else tuple(map(operator.index, layer if isinstance(layer, (tuple, list))
                                                else (layer,)))
    if layer is not None and not layers:
        raise ValueError(f"hidden_layer {layer!r}: name at least one layer (or None for none)")
    for lay in layers:
        if not 0 <= lay <= n_layers:
            raise ValueError(f"hidden_layer {lay} outside 0..{n_layers} for {name}")
    return layers


def concat_layers(states: Sequence[torch.Tensor]) -> torch.Tensor:
    """Hidden rows of several layers side by side, [rows, len(states) * d]; one layer's rows as they are."""
    return states[0] if len(states) == 1 else torch.cat(list(states), dim=-1)


class Backend(Protocol):
    name: str
    vocab_size: int
    hidden_layer: HiddenLayer
    hidden_all: bool
    n_cached: int
    calls: int
    tokens_fed: int
    tokens_cropped: int

    def forward(self, tokens: Sequence[int], keep: int | None = None, copy: bool = True
                ) -> tuple[torch.Tensor, torch.Tensor | None]: ...

    def crop(self, n: int) -> None: ...

    def reset(self) -> None: ...

    def score_windows(self, x: torch.Tensor, keep: int, layers: Sequence[int]
                      ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]: ...

    def greedy(self, prompts: Sequence[Sequence[int]], new_tokens: int, eos_ids) -> list[list[int]]: ...


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


class LM:
    """A predictor backend as a policy sees it: `lm(ids)` -> logits [V] for position len(ids).

    The view remembers which tokens its backend's cache holds. A call keeps the longest common prefix of
    those and `ids` and feeds the rest in one pass (catch-up), so it is correct for any ids (a lookahead, a
    text after a rollback). The decode loop calls `keep` after every step, so the cache never holds text
    the run dropped, and `reset` when a run starts.
    """

    def __init__(self, backend: Backend, hidden_layer: HiddenLayer = None):
        self.backend = backend
        self.hidden_layer = hidden_layer   # the layer(s) this view asks its backend for (set on every reset)
        self.hidden: torch.Tensor | None = None   # hidden state [d] (layers: [k * d]) behind the last logits
        self.tokens: list[int] = []     # what the cache holds

    @property
    def name(self) -> str:
        return self.backend.name

    def __call__(self, ids: Sequence[int]) -> torch.Tensor:
        self.keep(ids)
        logits, hidden = catch_up(self.backend, ids)
        self.hidden = None if hidden is None else hidden[-1]
        self.tokens = list(ids)
        return logits[-1]

    def keep(self, text: Sequence[int]) -> None:
        """Crop the cache to its longest common prefix with `text`."""
        if len(self.tokens) != self.backend.n_cached:   # used behind this view's back: content unknown
            self.backend.crop(0)
            self.tokens = []
        n = min(len(self.tokens), len(text))
        if self.tokens[:n] != list(text[:n]):
            n = next(i for i, (a, b) in enumerate(zip(self.tokens, text)) if a != b)
        self.crop(n)

    def crop(self, n: int) -> None:
        if n < len(self.tokens):
            self.backend.crop(n)
            del self.tokens[n:]

    def reset(self) -> None:
        """A run starts: empty cache; the backend computes this view's hidden layer (views of one backend in
        different policies may want different layers: the last reset wins, and one run uses one policy)."""
        self.backend.hidden_layer = self.hidden_layer
        self.backend.reset()
        self.tokens = []
        self.hidden = None
