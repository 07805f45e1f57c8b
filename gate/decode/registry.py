"""The policy registry: a decode policy is one class, and the CLI and the benchmark are generated from it.

A policy class (gate/decode/loop.py::Policy) declares its `name`, a `summary` for --help, the options it
reads as `Arg`s, example command lines, whether it needs the big model's hidden states, which models it
needs (`model_names`) and how it is built (`from_args(args, runtime)`). `@register` puts it in `POLICIES`;
`infer.py` (its --policy choices, option list and epilog) and `bench/decode.py` (its method list) read that
dict, so adding a policy touches no other file. Both also take a `policies` mapping argument, which is how a
test adds a policy of its own without changing the global registry.

Options shared by several policies (--small, --tau, --threshold, ...) are one `Arg` object each, used by
every policy that reads them; the parser adds each once and names its users in the help text.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from typing import Mapping

POLICIES: dict[str, type] = {}   # name -> Policy subclass, in registration order


def register(cls):
    """Class decorator: make a Policy subclass available to infer.py and bench/decode.py by its name."""
    if cls.name in POLICIES and POLICIES[cls.name] is not cls:
        raise ValueError(f"two policies named {cls.name!r}: {POLICIES[cls.name].__name__} and {cls.__name__}")
    POLICIES[cls.name] = cls
    return cls


def registered() -> dict[str, type]:
    """The registered policies (importing the modules that define them)."""
    from gate.decode import policies  # the built-in policies register themselves on import
    del policies
    return dict(POLICIES)


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


def add_policy_args(group, policies: Mapping[str, type]) -> None:
    """Add every option the policies read, once each, with the names of the policies that read it."""
    users: dict[str, tuple[Arg, list[str]]] = {}
    for name, cls in policies.items():
        for a in cls.args:
            if a.dest in users and users[a.dest][0] != a:
                raise ValueError(f"option {a.dest}: {name} declares it differently from "
                                 f"{', '.join(users[a.dest][1])}; share one Arg")
            users.setdefault(a.dest, (a, []))[1].append(name)
    for a, names in users.values():
        group.add_argument(*a.flags, help=f"{a.help} [{', '.join(names)}]", **a.kwargs)


def policies_help(policies: Mapping[str, type]) -> str:
    """The 'policies:' section of --help: one entry per policy, from its summary."""
    width = max(len(n) for n in policies)
    lines = ["policies:"]
    for name, cls in policies.items():
        text = cls.summary.strip().splitlines() or [""]
        if cls.needs_big_hidden:
            text.append("(reads the big model's hidden states)")
        lines.append(f"  {name:<{width}}  {text[0]}")
        lines += [f"  {'':<{width}}  {t.strip()}" for t in text[1:]]
    return "\n".join(lines)


def policy_examples(policies: Mapping[str, type], prog: str = "python infer.py") -> list[str]:
    return [f"  {prog} {e}" for cls in policies.values() for e in cls.examples]


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


def unread_options(args: argparse.Namespace, policies: Mapping[str, type]) -> None:
    """Refuse a policy option that was given but that the chosen policy does not read (`--chain-cut` with
    `--policy copy` was silently ignored): a UsageError naming it and the policies that read it."""
    from gate.decode.runtime import UsageError

    cls = policies.get(args.policy)
    mine = {a.dest for a in getattr(cls, "args", ())}
    for name, other in policies.items():
        for a in other.args:
            default = a.kwargs.get("default", False if a.kwargs.get("action") == "store_true" else None)
            if a.dest not in mine and getattr(args, a.dest, default) != default:
                users = [n for n, c in policies.items() if a.dest in {b.dest for b in c.args}]
                raise UsageError(f"{a.flags[-1]} is read by --policy {' / '.join(users)}, not by --policy "
                                 f"{args.policy}: drop it, or choose a policy that reads it")


def namespace(args: argparse.Namespace, **changes) -> argparse.Namespace:
    """A copy of parsed options with some values changed (the benchmark's variants of one policy)."""
    return argparse.Namespace(**{**vars(args), **changes})
