"""The decode runtime: models opened as backends, the trained gate, held-out prompts, EOS ids.

infer.py and bench/decode.py get everything model-related from here, so a new runtime (a llama.cpp or an
ONNX backend) is one class with the Backend members (gate/decode/backend.py) plus one entry in `BACKENDS`.
Only baselines that are transformers features by definition (HF generate, assisted generation, prompt-lookup
decoding) reach the transformers model, through `Runtime.hf_model`, which says so when the backend is not HF.

    rt = open_models("smollm2-135m", ["self:15"], "float32")       # big + predictors, same tokenizer checked
    rt.big, rt.predictor("self:15"), rt.tokenizer, rt.eos_ids
    rt.load_gate(path)                                              # the trained drafter, loaded once per path
    rt.check_fits(len(prompt_ids), max_new)                         # prompt + new tokens within the context
    held_out_prompts(corpus, tokenizer, n, n_tokens)                # prompts from the held-out books
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from corpus_tools.errors import ProjectError
from gate.decode.backend import Backend, HFBackend, early_exit_view


class UsageError(ValueError, ProjectError):
    """A user error (bad option value, missing file): the CLI prints it as one line and exits 2."""


def llamacpp_backend(model, name: str = "", hidden_layer: int | None = None) -> Backend:
    """llama.cpp runs the GGUF that `name` names (a packaged alias or a .gguf file); `model` is not used
    (open_models opens llama.cpp models without transformers: open_gguf_models)."""
    from corpus_tools.llamacpp import LlamaCppBackend

    refuse_early_exit(name)
    return LlamaCppBackend(name, name=name, hidden_layer=hidden_layer)


def refuse_early_exit(name: str) -> None:
    if name.startswith("self:"):
        raise UsageError(f"{name!r}: an early-exit predictor needs the 'hf' backend (llama.cpp runs whole models)")


BACKENDS: dict[str, Callable[..., Backend]] = {   # kind -> (model, name=..., hidden_layer=...) -> a Backend
    "hf": HFBackend,
    "llama.cpp": llamacpp_backend,   # corpus_tools/llamacpp.py: needs llama-cpp-python
}


def make_backend(model_or_loaded, kind: str = "hf", **kw) -> Backend:
    """A backend of `kind` over a model (or a corpus_tools.models.LoadedModel); kw: name, hidden_layer."""
    from corpus_tools.models import LoadedModel

    if kind not in BACKENDS:
        raise UsageError(f"unknown backend {kind!r}; choose from {', '.join(BACKENDS)}")
    model = model_or_loaded.model if isinstance(model_or_loaded, LoadedModel) else model_or_loaded
    return BACKENDS[kind](model, **kw)


@dataclass
class Runtime:
    tokenizer: object
    big: Backend
    big_info: object                                 # corpus_tools.models.ModelInfo
    predictors: dict[str, Backend] = field(default_factory=dict)
    eos_ids: tuple = ()
    gates: dict = field(default_factory=dict)        # path -> loaded drafter
    infos: dict = field(default_factory=dict)        # predictor name -> its ModelInfo

    def predictor(self, name: str) -> Backend:
        if name not in self.predictors:
            raise UsageError(f"model {name!r} was not opened (opened: {', '.join(self.predictors) or 'none'})")
        return self.predictors[name]

    def load_gate(self, path: str):
        """The drafter at `path`, loaded once; a router artifact runs over its small model, opened by name."""
        if path not in self.gates:
            meta = router_meta(path)
            if meta is None:
                self.gates[path] = load_gate(path, self.big_info)
            else:
                self.gates[path] = load_router(path, meta, self)
        return self.gates[path]

    def check_fits(self, n_prompt: int, max_new: int, what: str = "prompt", budget: str = "-m") -> None:
        """Refuse (ContextLengthError, with the numbers) a generation of `max_new` tokens after an `n_prompt`-token
        prompt that would hold more tokens than a model reads at once: past its context a model returns garbage,
        not an error. Every path that feeds the decoder calls this first (one prompt, the demo, batch lines,
        bench/decode.py). `what` names the prompt, `budget` the option that set max_new."""
        from corpus_tools.models import check_context

        label = f"{what} ({n_prompt:,} tokens) + {budget} {max_new}"
        for info in (self.big_info, *self.infos.values()):   # self:K predictors read the big model's context
            check_context(n_prompt + max_new, info, label)

    def hf_model(self, name: str | None = None):
        """The transformers model under the big backend (or predictor `name`): for HF-only baselines."""
        backend = self.big if name is None else self.predictor(name)
        if not isinstance(backend, HFBackend):
            raise UsageError(f"{backend.name}: a transformers baseline needs the 'hf' backend")
        return backend.model


def add_runtime_args(g, dtype_help: str = "model dtype (default: %(default)s)", auto: bool = True) -> None:
    """The runtime's options (infer.py and bench/decode.py): big model, dtype, backend, threads."""
    g.add_argument("--model", default="smollm2-135m", help="the big model (default: %(default)s)")
    g.add_argument("--dtype", default="float32", help=dtype_help)
    g.add_argument("--backend", default="auto" if auto else "hf", choices=(["auto"] if auto else []) + list(BACKENDS),
                   help="model runtime (default: %(default)s); llama.cpp runs GGUF models (a packaged alias or a "
                   ".gguf file) several times faster than transformers on a CPU and gives the last layer's hidden "
                   "state only; auto picks llama.cpp wherever it can serve every model and layer the run needs")
    g.add_argument("--threads", type=int, help="torch's and llama.cpp's threads (default: one per core, the fastest "
                   "on an idle machine; on a machine busy with other jobs fewer threads and OMP_WAIT_POLICY=PASSIVE "
                   "avoid stalls: docs/speed.md)")


def auto_backend(big: str, smalls: list[str], dtype: str = "float32", gate: str | None = None) -> tuple[str, str]:
    """(kind, why) for --backend auto: llama.cpp when every model is a GGUF (a packaged alias or a .gguf file),
    none is an early exit (self:K), the dtype is the default and the gate reads the last layer or none; else hf."""
    from corpus_tools.models import ALIASES

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
    layer = gate_layer(gate) if gate else None
    if layer is not None and layer != "last":
        return "hf", f"the gate reads hidden layer {layer}"
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return "hf", "llama-cpp-python is not installed"
    return "llama.cpp", "every model is a GGUF"


def gate_layer(path: str):
    """'last', None (reads no big hidden state) or the layer number a gate artifact reads, from drafter.json."""
    from gate.model.drafter import ArtifactError, read_meta

    try:
        meta = read_meta(path)
    except (ArtifactError, OSError):
        return None                     # load_gate reports it
    layer, feats = meta.get("hidden_layer"), meta.get("features")
    if layer is None or (isinstance(feats, dict) and not feats.get("big_hidden", True)):
        return None
    n = meta.get("big_model", {}).get("n_layers")
    return "last" if layer == n else layer


def open_models(big_name: str, small_names: list[str], dtype: str, kind: str = "hf", gate: str | None = None,
                log=None) -> Runtime:
    """Load the big model and the predictors; refuse models whose tokenizers differ.

    A predictor name `self:K` is the big model's first K layers + final norm + output layer (no copy).
    On llama.cpp no transformers model is loaded (open_gguf_models)."""
    from corpus_tools.models import check_same_tokenizer, load

    if kind == "auto":
        kind, why = auto_backend(big_name, small_names, dtype, gate)
        if log:
            log(f"backend: {kind} ({why}; --backend to choose)")
    if kind == "llama.cpp":
        return open_gguf_models(big_name, small_names)
    big = load(big_name, dtype)
    fps = {big_name: big.info.fingerprint}
    rt = Runtime(big.tokenizer, make_backend(big, kind, name=big_name), big.info, eos_ids=eos_ids_of(big))
    loaded = {big_name: big}
    for name in small_names:
        if name in rt.predictors:
            continue
        if name.startswith("self:"):
            rt.predictors[name] = make_backend(early_exit(big, name), kind, name=name)
            continue
        lm = loaded.get(name) or load(name, dtype)
        loaded[name] = lm
        fps[name] = lm.info.fingerprint
        rt.infos[name] = lm.info
        rt.predictors[name] = make_backend(lm, kind, name=name)
    check_same_tokenizer(fps)
    return rt


def open_gguf_models(big_name: str, small_names: list[str]) -> Runtime:
    """The runtime on llama.cpp: each model a LlamaCppBackend, its tokenizer read from the GGUF (cached) and its
    ModelInfo from llama.cpp; the transformers weights are never loaded (a 1.5B model would take 11 GB)."""
    from corpus_tools.llamacpp import eos_ids, open_gguf
    from corpus_tools.models import check_same_tokenizer

    for name in (big_name, *small_names):
        refuse_early_exit(name)
    big, tok, info = open_gguf(big_name)
    rt = Runtime(tok, big, info, eos_ids=eos_ids(big, tok))
    fps = {big_name: info.fingerprint}
    for name in dict.fromkeys(small_names):
        backend, _, rt.infos[name] = open_gguf(name)
        rt.predictors[name] = backend
        fps[name] = rt.infos[name].fingerprint
    check_same_tokenizer(fps)
    return rt


def early_exit(big, name: str):
    try:
        return early_exit_view(big.model, int(name[5:]))
    except ValueError as e:
        raise UsageError(f"{name!r}: self:K needs a layer count K in 1..{big.info.n_layers} ({e})") from None


def eos_ids_of(lm) -> tuple:
    ids = set()
    gc = getattr(lm.model, "generation_config", None)
    e = getattr(gc, "eos_token_id", None) if gc is not None else None
    ids.update(e if isinstance(e, (list, tuple)) else ([e] if e is not None else []))
    if lm.tokenizer.eos_token_id is not None:
        ids.add(lm.tokenizer.eos_token_id)
    return tuple(sorted(ids))


def load_gate(path: str, big_info):
    from gate.model.drafter import ArtifactError, load_drafter

    if not Path(path).exists():
        raise UsageError(f"--gate {path}: no such folder (train a gate with `python train.py fit`)")
    try:
        return load_drafter(path, big_info)   # TokenizerMismatch passes through: the CLI reports it
    except ArtifactError as e:
        raise UsageError(str(e)) from e


def router_meta(path: str) -> dict | None:
    """drafter.json of a router artifact (a big/small pair), or None for any other drafter (or no folder:
    load_gate reports that)."""
    from gate.model.drafter import ArtifactError, read_meta
    from gate.model.router import ROUTER_FORMAT

    if not Path(path, "drafter.json").is_file():
        return None
    try:
        meta = read_meta(path)
    except ArtifactError as e:
        raise UsageError(str(e)) from e
    return meta if meta["format"] == ROUTER_FORMAT else None


def load_router(path: str, meta: dict, rt: Runtime):
    """A router artifact over the small model the runtime opened for it (the policy's model_names asks for the
    artifact's small model unless --small names another, which the identity check then refuses)."""
    from gate.decode.drafters import RouterDrafter
    from gate.model.drafter import ArtifactError, check_big_model, check_files

    wanted = meta["small_model"]["name"]
    small = wanted if wanted in rt.infos else next((n for n in rt.infos if n != rt.big_info.name), None)
    if small is None:
        raise UsageError(f"--gate {path}: a router needs its small model ({meta['small_model']['name']}): "
                         "pass --small NAME")
    try:
        check_big_model(meta, rt.big_info, path)
        check_files(Path(path), meta)
        return RouterDrafter.load(path, meta, rt.predictor(small), rt.infos[small])
    except (ArtifactError, ValueError) as e:
        raise UsageError(str(e)) from e


def held_out_prompts(corpus: str, tokenizer, n: int, n_tokens: int, split: str = "test") -> list[list[int]]:
    """n prompts of n_tokens tokens: the openings of long paragraphs spread over the held-out books."""
    from corpus_tools.selfgen import split_prompts

    if not Path(corpus, "manifest.jsonl").exists():
        raise UsageError(f"{corpus}: not a corpus folder (no manifest.jsonl; build it with train.py corpus)")
    try:
        return split_prompts(corpus, tokenizer, n, n_tokens, split)
    except ValueError as e:
        raise UsageError(str(e)) from None
