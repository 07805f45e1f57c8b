"""Opening models as backends: the BACKENDS table (kind -> class), `open_models` -> Runtime, `open_backend`.

    rt = open_models("smollm2-135m", ["self:15"], "float32", kind="hf")   # big + predictors, one tokenizer
    rt.big, rt.predictor("self:15"), rt.tokenizer, rt.eos_ids, rt.check_fits(n_prompt, max_new)
    m = open_backend("smollm2-135m", "llama.cpp")   # one model: m.backend, m.tokenizer, m.info, m.eos_ids

Every `--backend` option offers `BACKENDS` (plus "auto" where `auto_backend` picks). A new runtime is one
class with the Backend members (runtimes/backend.py) and one entry in BACKENDS. A predictor `self:K` is the
big model's first K blocks (transformers only). On llama.cpp no transformers weights are loaded.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from common.errors import UsageError
from runtimes.backend import Backend, HiddenLayer
from runtimes.hf import HFBackend, early_exit_view
from runtimes.info import ModelInfo, check_context, check_same_tokenizer
from runtimes.llamacpp import LAYER_INP_ARCHS, eos_ids, open_gguf
from runtimes.loading import load
from runtimes.sources import ALIASES, gguf_path


@dataclass
class Opened:
    """One model opened as a backend, with what every caller needs beside it."""
    backend: Backend
    tokenizer: object
    info: ModelInfo
    eos_ids: tuple


def hf_backend(name: str, dtype: str = "float32", device: str = "cpu", hidden_layer: HiddenLayer = None) -> Opened:
    """A model loaded with transformers."""
    lm = load(name, dtype, device=device)
    return Opened(HFBackend(lm.model, name=name, hidden_layer=hidden_layer), lm.tokenizer, lm.info, eos_ids_of(lm))


def llamacpp_backend(name: str, dtype: str = "float32", device: str = "cpu", hidden_layer: HiddenLayer = None
                     ) -> Opened:
    """A GGUF (packaged alias or .gguf file) in llama.cpp."""
    refuse_early_exit(name)
    if dtype != "float32":
        raise UsageError(f"--dtype {dtype}: llama.cpp runs the GGUF's own quantisation (use --backend hf)")
    if device != "cpu":
        raise UsageError(f"--device {device}: this llama.cpp backend runs on the CPU (use --backend hf)")
    backend, tok, info = open_gguf(name, hidden_layer=hidden_layer)
    return Opened(backend, tok, info, eos_ids(backend, tok))


BACKENDS = {   # kind -> opener(name, dtype, device, hidden_layer) -> Opened
    "hf": hf_backend,
    "llama.cpp": llamacpp_backend,   # needs llama-cpp-python
}


def open_backend(name: str, kind: str = "hf", dtype: str = "float32", device: str = "cpu",
                 hidden_layer: HiddenLayer = None) -> Opened:
    """One model as a backend of `kind`, with its tokenizer, ModelInfo and EOS ids."""
    if kind not in BACKENDS:
        raise UsageError(f"unknown backend {kind!r}; choose from {', '.join(BACKENDS)}")
    return BACKENDS[kind](name, dtype, device, hidden_layer)


@dataclass
class Runtime:
    """The models of one run: the big backend, the predictors by name, one tokenizer, EOS ids."""
    tokenizer: object
    big: Backend
    big_info: ModelInfo
    predictors: dict[str, Backend] = field(default_factory=dict)
    eos_ids: tuple = ()
    infos: dict = field(default_factory=dict)        # predictor name -> its ModelInfo
    loaded: dict = field(default_factory=dict)       # what callers load over these models, by key (gates)

    def predictor(self, name: str) -> Backend:
        if name not in self.predictors:
            raise UsageError(f"model {name!r} was not opened (opened: {', '.join(self.predictors) or 'none'})")
        return self.predictors[name]

    def check_fits(self, n_prompt: int, max_new: int, what: str = "prompt", budget: str = "-m") -> None:
        """Refuse (ContextLengthError, with the numbers) a generation of `max_new` tokens after an `n_prompt`-token
        prompt that would hold more tokens than a model reads at once: past its context a model returns garbage,
        not an error. Every path that feeds the decoder calls this first. `what` names the prompt, `budget` the
        option that set max_new."""
        label = f"{what} ({n_prompt:,} tokens) + {budget} {max_new}"
        for info in (self.big_info, *self.infos.values()):   # self:K predictors read the big model's context
            check_context(n_prompt + max_new, info, label)

    def hf_model(self, name: str | None = None):
        """The transformers model under the big backend (or predictor `name`): for HF-only baselines."""
        backend = self.big if name is None else self.predictor(name)
        if not isinstance(backend, HFBackend):
            raise UsageError(f"{backend.name}: a transformers baseline needs the 'hf' backend")
        return backend.model


def refuse_early_exit(name: str) -> None:
    if name.startswith("self:"):
        raise UsageError(f"{name!r}: an early-exit predictor needs the 'hf' backend (llama.cpp runs whole models)")


def gguf_arch(name: str) -> str | None:
    """general.architecture of a GGUF model (an alias or a file), None where it cannot be read."""
    try:
        from gguf import GGUFReader

        field = GGUFReader(str(gguf_path(name))).fields.get("general.architecture")
        return bytes(field.parts[field.data[0]]).decode() if field is not None else None
    except Exception:  # noqa: BLE001 - a model auto cannot inspect falls back to transformers, with the reason
        return None


def auto_backend(big: str, smalls: list[str], dtype: str = "float32", layer=None) -> tuple[str, str]:
    """(kind, why) for --backend auto: llama.cpp when every model is a GGUF (a packaged alias or a .gguf file),
    none is an early exit (self:K), the dtype is the default and the run reads the big model's last hidden layer,
    none, or inner layers of an architecture llama.cpp gives them on (`layer`: None, "last", a layer number or a
    tuple); else hf."""
    def gguf(name: str) -> bool:
        return name in ALIASES or (name.endswith(".gguf") and Path(name).is_file())

    early = next((n for n in smalls if n.startswith("self:")), None)
    if early:
        return "hf", f"the early-exit predictor {early} runs in transformers"
    other = next((n for n in (big, *smalls) if not gguf(n)), None)
    if other:
        return "hf", f"{other} is not a GGUF"
    if dtype != "float32":
        return "hf", f"--dtype {dtype}"
    if layer is not None and layer != "last" and (arch := gguf_arch(big)) not in LAYER_INP_ARCHS:
        return "hf", f"the gate reads hidden layer {layer}, which llama.cpp gives on {', '.join(sorted(LAYER_INP_ARCHS))} " \
                     f"models, not {arch or 'this one'}"
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return "hf", "llama-cpp-python is not installed"
    return "llama.cpp", "every model is a GGUF"


def open_models(big_name: str, small_names: list[str], dtype: str, kind: str = "hf", layer=None,
                log=None) -> Runtime:
    """Load the big model and the predictors; refuse models whose tokenizers differ. kind "auto" asks
    auto_backend (`layer`: the big hidden layer the run reads) and logs its choice."""
    if kind == "auto":
        kind, why = auto_backend(big_name, small_names, dtype, layer)
        if log:
            log(f"backend: {kind} ({why}; --backend to choose)")
    if kind not in BACKENDS:
        raise UsageError(f"unknown backend {kind!r}; choose from {', '.join(BACKENDS)}")
    if kind != "hf":
        for name in (big_name, *small_names):
            refuse_early_exit(name)
    opened = open_backend(big_name, kind, dtype)
    big, info = opened.backend, opened.info
    rt = Runtime(opened.tokenizer, big, info, eos_ids=opened.eos_ids)
    fps = {big_name: info.fingerprint}
    for name in dict.fromkeys(small_names):
        if name.startswith("self:"):
            rt.predictors[name] = HFBackend(early_exit(big, info, name), name=name)
            continue
        if name == big_name and kind == "hf":   # the same weights, a cache of its own
            rt.predictors[name], rt.infos[name] = HFBackend(big.model, name=name), info
            continue
        small = open_backend(name, kind, dtype)
        rt.predictors[name], rt.infos[name] = small.backend, small.info
        fps[name] = rt.infos[name].fingerprint
    check_same_tokenizer(fps)
    return rt


def early_exit(big: HFBackend, info: ModelInfo, name: str):
    try:
        return early_exit_view(big.model, int(name[5:]))
    except ValueError as e:
        raise UsageError(f"{name!r}: self:K needs a layer count K in 1..{info.n_layers} ({e})") from None


def eos_ids_of(lm) -> tuple:
    """End-of-sequence ids of a transformers model: its generation config's and its tokenizer's."""
    ids = set()
    gc = getattr(lm.model, "generation_config", None)
    e = getattr(gc, "eos_token_id", None) if gc is not None else None
    ids.update(e if isinstance(e, (list, tuple)) else ([e] if e is not None else []))
    if lm.tokenizer.eos_token_id is not None:
        ids.add(lm.tokenizer.eos_token_id)
    return tuple(sorted(ids))
