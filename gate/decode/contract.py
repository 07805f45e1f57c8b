"""The policy contract: what a decode policy is given (DecodeState), returns (Draft) and declares (Policy, Arg).

A policy class subclasses `Policy`, declares its name, --help summary, options (`Arg`s), the models it needs
and how it is built from options and a runtime, and is registered by name with `@register` into POLICIES
(infer.py and bench/decode.py read that table through gate/decode/registry.py). An instance proposes Drafts
from a read-only DecodeState and never touches a cache: the loop (gate/decode/loop.py) owns them. The
sampling helpers are the one way a policy or the loop draws a token. The option checkers raise ValueError,
which the CLI prints as one line.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, ClassVar, Sequence

import torch

from gate.decode.cost import Acceptance
from runtimes.backend import LM

if TYPE_CHECKING:   # annotations only
    from runtimes.open import Runtime


POLICIES: dict[str, type] = {}   # name -> Policy subclass, in registration order


def register(cls):
    """Class decorator: make a Policy subclass available to infer.py and bench/decode.py by its name."""
    if cls.name in POLICIES and POLICIES[cls.name] is not cls:
        raise ValueError(f"two policies named {cls.name!r}: {POLICIES[cls.name].__name__} and {cls.__name__}")
    POLICIES[cls.name] = cls
    return cls


@dataclass(frozen=True)
class Arg:
    """One command-line option: argparse's add_argument(*flags, help=help, **kwargs)."""
    flags: tuple[str, ...]
    help: str
    kwargs: dict = field(default_factory=dict)

    @property
    def dest(self) -> str:
        long = next((f for f in self.flags if f.startswith("--")), self.flags[0])
        return self.kwargs.get("dest", long.lstrip("-").replace("-", "_"))


def arg(*flags: str, help: str, **kwargs) -> Arg:
    return Arg(tuple(flags), help, kwargs)


# -- option values, checked where a policy is built (the CLI prints a ValueError as one line) --------------
def unit_interval(flag: str, value: float | None) -> float | None:
    """value unless it is outside [0, 1] or not a number (None passes: the option was not given)."""
    if value is not None and not 0 <= value <= 1:   # also refuses nan
        raise ValueError(f"{flag} must be a number in [0, 1], got {value:g}")
    return value


def number(flag: str, value: float | None) -> float | None:
    """value unless it is nan (infinities are meaningful: always / never)."""
    if value is not None and math.isnan(value):
        raise ValueError(f"{flag} must be a number, got nan")
    return value


def at_least(flag: str, value: int | None, low: int) -> int | None:
    if value is not None and value < low:
        raise ValueError(f"{flag} must be >= {low}, got {value}")
    return value


BIG_SOURCES = ("big", "scaffold")   # tokens the big model generated; every other source is a skip


@dataclass
class Draft:
    token: int
    source: str                         # "small", "skip", "mid1", ...: how the streamer colors it
    score: float = 1.0                  # the predictor's confidence; verify_below compares it
    probs: torch.Tensor | None = None   # draft distribution when sampled; None = a deterministic proposal


def sample_token(logits: torch.Tensor, temperature: float, gen: torch.Generator | None) -> int:
    """The next token from logits: argmax at temperature 0, else a sample from softmax(logits / T)."""
    if temperature <= 0:
        return int(logits.argmax())
    return sample_from(torch.softmax(logits / temperature, dim=-1), gen)


def sample_from(weights: torch.Tensor, gen: torch.Generator | None) -> int:
    """A sample of a 1-d distribution (weights >= 0, any positive sum) by inverting its cumulative sum: one random
    number; 0.2 ms with the softmax over 49k tokens, where torch.multinomial took 1.5 ms (a sixth of a step)."""
    cdf = torch.cumsum(weights.float(), 0)
    u = float(torch.rand((), generator=gen)) * float(cdf[-1])
    i = int(torch.searchsorted(cdf, torch.tensor([u]), right=True))
    i = min(i, len(weights) - 1)
    while weights[i] <= 0:                 # u at a boundary of zero-weight tokens: the last one with weight
        i -= 1
    return i


def draft_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor | None:
    return torch.softmax(logits / temperature, dim=-1) if temperature > 0 else None


@dataclass(frozen=True)
class DecodeState:
    """What a policy may read at one step: a snapshot, so a policy cannot change the run through it."""
    ids: tuple[int, ...]                # prompt + generated text so far
    n_new: int                          # generated tokens so far
    big_cached: int                     # positions the big model has computed (its cache length)
    big_hidden: torch.Tensor | None     # its hidden state at position big_cached - 1 (policy.hidden_layer)
    big_hiddens: torch.Tensor | None    # [big_cached, d]: every position's, when the policy needs_all_hidden
    temperature: float
    sample: Callable[[torch.Tensor], int]   # sample_token at the run's temperature and generator
    eos: frozenset[int]
    max_new: int

    @property
    def since_big(self) -> int:
        """Tokens in ids after the last position the big model has computed (the gate's distance)."""
        return len(self.ids) - self.big_cached


class Policy:
    """Decides, position by position, whether a predictor or the big model produces the next token.

    A policy class is registered by name (gate/decode/registry.py) and declares what the CLI and the
    benchmark need to offer it: `summary` (its --help line), `args` (the options it reads), `model_names`
    (which models to load), `from_args` (how it is built from parsed options and the runtime) and
    `needs_big_hidden` (the loop then asks the big backend for hidden states at `hidden_layer`).
    An instance lists its predictor views in `lms`; it never feeds or crops a cache itself.
    """
    name: ClassVar[str] = "policy"
    summary: ClassVar[str] = ""
    args: ClassVar[tuple[Arg, ...]] = ()
    examples: ClassVar[tuple[str, ...]] = ()    # infer.py arguments, shown in --help
    needs_big_hidden: ClassVar[bool] = False
    needs_all_hidden = False                    # also every earlier position's (DecodeState.big_hiddens)
    source = "small"                            # the source of its drafts
    free: ClassVar[bool] = False                # its proposals cost next to nothing (the copy rule): the planner
                                                # asks it at every chain start, never only at probes
    hidden_layer: int | None = None             # read when needs_big_hidden
    threshold: float | None = None              # the score a draft must reach, if the policy has one (the gate's)
    live_threshold: float | None = None         # the audit's raised one in this text (gate/decode/audit.py)
    job_audit = None                            # --audit-scope job: the Audit carried from prompt to prompt

    def __init__(self, lms: Sequence[LM] = ()) -> None:
        self.lms = tuple(lms)   # predictor views: reset, cropped and counted by the loop
        self.calls = 0          # predictor invocations (forward calls or drafter proposals)

    @property
    def draft_steps(self) -> int:
        """Steps of a drafter's own network (the feature head's entries), for the ledger; 0 if none."""
        return 0

    def start(self) -> None:
        """A new text begins: reset per-text state."""

    def propose(self, state: DecodeState) -> list[Draft]:
        """Drafts for positions len(state.ids), ...; [] hands the next position to the big model."""
        return []

    def propose_free(self, state: DecodeState) -> list[Draft]:
        """Drafts from the policy's sources that cost nothing (the copy rule inside a gate), asked where the
        planner holds its costly proposals back; [] by default. Not counted in `calls` (the drafter's cost)."""
        return []

    def big_source(self, state: DecodeState) -> str:
        return "big"

    def acceptance(self) -> Acceptance:
        """How the draft planner reads this policy's draft scores: by default each estimates P(accepted)."""
        return Acceptance()

    @classmethod
    def model_names(cls, args) -> tuple[str, list[str]]:
        """(big model, predictor models) to load for this policy: --small, if the policy reads it and no
        --gate replaces it."""
        reads = {a.dest for a in cls.args}
        small = vars(args).get("small") if "small" in reads else None
        if "gate" in reads and vars(args).get("gate"):
            small = None
        return args.model, [small] if small else []

    @classmethod
    def from_args(cls, args, rt: "Runtime") -> "Policy":
        """The policy for parsed options; a ValueError is a user error (printed as one line)."""
        return cls()
