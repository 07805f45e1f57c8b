"""What a model is, as every artifact records it: ModelInfo, the tokenizer fingerprint, the context-length check.

Every artifact built from a model stores `ModelInfo.fingerprint` (a hash of the tokenizer's vocabulary and
merges); loading a gate for a model with another fingerprint is refused (TokenizerMismatch). A model fed more
tokens than its context does not fail, it returns garbage: `check_context` is the one check every path that
feeds a model calls. Errors: ModelSourceError, TokenizerMismatch, ContextLengthError, each naming the model.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

from common.errors import ProjectError


class ModelSourceError(RuntimeError, ProjectError):
    """A model name that cannot be resolved or loaded; the message says which and why."""


class TokenizerMismatch(ValueError, ProjectError):
    """Two models (or a model and an artifact) do not share a tokenizer."""


class ContextLengthError(ValueError, ProjectError):
    """More tokens than a model reads at once; the message gives both numbers."""


@dataclass(frozen=True)
class ModelInfo:
    name: str            # what the user asked for
    path: str            # the HF directory actually loaded
    dtype: str
    n_params: int
    vocab_size: int      # rows of the output layer
    n_layers: int
    hidden_size: int
    fingerprint: str     # tokenizer fingerprint, see tokenizer_fingerprint()
    context_length: int | None = None   # max_position_embeddings: the most tokens it reads at once (None: unknown)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class LoadedModel:
    model: object                 # a transformers causal LM
    tokenizer: object
    info: ModelInfo


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 over the vocabulary (token -> id), the BPE merges and the added tokens.

    Two tokenizers with the same fingerprint turn every text into the same ids, which is what a gate
    or a record set relies on. Names, chat templates and other cosmetics are left out on purpose.
    """
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        model = spec.get("model", {})
        vocab = model.get("vocab", {})
        # Unigram vocabularies are lists of [piece, score]; BPE/WordPiece are dicts.
        h.update(json.dumps(sorted(vocab.items()) if isinstance(vocab, dict) else vocab,
                            ensure_ascii=False).encode())
        h.update(json.dumps(model.get("merges", []), ensure_ascii=False).encode())
        h.update(json.dumps(sorted((t["id"], t["content"]) for t in spec.get("added_tokens", [])),
                            ensure_ascii=False).encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False).encode())
    return h.hexdigest()[:16]


def context_length_of(model) -> int | None:
    """The context length of a ModelInfo, a LoadedModel, a dict (ModelInfo.to_dict() or an HF config dict), an
    HF config or an HF model; None when it does not say."""
    if isinstance(model, LoadedModel):
        model = model.info
    if isinstance(model, ModelInfo):
        return model.context_length
    if isinstance(model, dict):
        n = model.get("context_length") or model.get("max_position_embeddings")
        return int(n) if n else None
    cfg = getattr(model, "config", model)  # an HF model, or already its config
    if hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    n = getattr(cfg, "max_position_embeddings", None)
    return int(n) if n else None


def check_context(n_tokens: int, model, what: str) -> None:
    """Raise ContextLengthError when `n_tokens` tokens (what one forward pass or one generation will hold) exceed
    the model's context length. `model`: anything context_length_of() reads; `what` says where the number comes
    from, e.g. "--context 9000" or "prompt (8,619 tokens) + -m 64". A model that does not state its context
    length is not checked."""
    limit = context_length_of(model)
    if limit is not None and n_tokens > limit:
        name = getattr(model, "name", None) or (model.get("name") if isinstance(model, dict) else None)
        if isinstance(model, LoadedModel):
            name = model.info.name
        raise ContextLengthError(
            f"{what}: {n_tokens:,} tokens, more than the {limit:,} tokens {repr(name) if name else 'the model'} "
            "reads at once (its context length); beyond it the model gives garbage")


def check_same_tokenizer(named_fingerprints: dict[str, str]) -> str:
    """Raise TokenizerMismatch unless all fingerprints agree; return the common one."""
    distinct = set(named_fingerprints.values())
    if len(distinct) > 1:
        listing = ", ".join(f"{n} -> {f}" for n, f in named_fingerprints.items())
        raise TokenizerMismatch(
            f"models do not share a tokenizer ({listing}); they cannot be recorded, gated or "
            "decoded together because the same text gives different token ids")
    return distinct.pop()


def describe(model, tok, name: str, path: str = "", dtype: str = "") -> ModelInfo:
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return ModelInfo(
        name=name, path=path, dtype=dtype or str(next(model.parameters()).dtype).replace("torch.", ""),
        n_params=sum(p.numel() for p in model.parameters()),
        vocab_size=model.get_output_embeddings().weight.shape[0],
        n_layers=cfg.num_hidden_layers, hidden_size=cfg.hidden_size,
        fingerprint=tokenizer_fingerprint(tok), context_length=context_length_of(cfg))


