"""The policy registry: a decode policy is one class, and the CLI and the benchmark are generated from it.

A policy class (gate/decode/contract.py::Policy) is registered with `@register` into POLICIES; `infer.py`
(its --policy choices, option list and epilog) and `bench/decode.py` (its method list) read `registered()`,
so adding a policy touches no other file. Both also take a `policies` mapping, which is how a test adds a
policy of its own without changing the global table. Options shared by several policies are one `Arg` each:
the parser adds each once and names its users in the help text.
"""
from __future__ import annotations

import argparse
from typing import Mapping

import gate.decode.policies  # noqa: F401  (the built-in policies register themselves on import)
from common.errors import UsageError
from gate.decode.contract import POLICIES, Arg


def registered() -> dict[str, type]:
    """The registered policies: the built-in ones and any a caller registered."""
    return dict(POLICIES)


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


def unread_options(args: argparse.Namespace, policies: Mapping[str, type]) -> None:
    """Refuse a policy option that was given but that the chosen policy does not read (`--chain-cut` with
    `--policy copy` was silently ignored): a UsageError naming it and the policies that read it."""
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
