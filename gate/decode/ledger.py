"""The cost ledger of one decode run: its keys are the fields of `Ledger`, spelled here and nowhere else.

The loop fills a Ledger, `Result.ledger` carries it as a plain dict (what `--json` writes and tests index),
and every reader (the CLI table, `sum_ledgers`, bench/decode.py) goes back through `Ledger.from_dict` and reads
attributes, so a renamed or missing key fails loudly in one place instead of printing a wrong table.
Fields marked `total` are counts that add up over runs; `sum_ledgers` sums exactly those, and the dicts `check`,
`plan` and `audit` (gate/decode/audit.py) by their own rules.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from gate.decode.audit import sum_audits


def _total(default=0):
    return field(default=default, metadata={"total": True})


@dataclass
class Ledger:
    policy: str
    verify: bool
    verify_below: float | None          # None: every draft is checked (when verify)
    temperature: float
    seed: int
    prompt_tokens: int
    new_tokens: int = _total()
    by_source: dict = field(default_factory=dict)   # source -> generated tokens
    big_emitted: int = _total()         # tokens the big model generated ("big", "scaffold")
    skipped: int = _total()             # every other token: no big pass when it was emitted
    big_calls: int = _total()
    big_tokens_fed: int = _total()      # catch-up and rolled-back tokens included
    big_tokens_cropped: int = _total()
    big_calls_per_token: float = 0.0
    predictor_calls: int = _total()     # small-model forward calls or drafter proposals
    predictor_tokens_fed: int = _total()
    policy_s: float = _total(0.0)       # wall time inside the policy: predictors, drafter steps, gate
    draft_steps: int = _total()         # the feature head's layer steps (entries computed), else 0
    drafted: int = _total()             # drafts emitted (kept or rolled back later)
    verified: int = _total()
    rollbacks: int = _total()
    rolled_back_tokens: int = _total()
    stopped: str = "max_new_tokens"     # "eos", "max_new_tokens", or "N runs" for a sum
    wall_s: float = _total(0.0)
    tokens_per_s: float = 0.0
    models: dict = field(default_factory=dict)      # backend name -> role, calls, tokens fed/cropped, n_cached
    check: dict | None = None           # check_output()'s dict, when asked for (--check, the demo)
    plan: dict | None = None            # the draft planner's counts in this run (chains, drafts kept, ...)
    audit: dict | None = None           # --audit: skips audited, mismatches, error and bound, the threshold's path

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for k in ("check", "plan", "audit"):
            if d[k] is None:
                del d[k]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Ledger":
        return cls(**d)


TOTALS = tuple(f.name for f in dataclasses.fields(Ledger) if f.metadata.get("total"))
PLAN_COUNTS = ("chains", "kept", "cut_to_zero", "skipped_starts", "free_drafts")   # the planner's counts that add up


def sum_ledgers(ledgers: list[Ledger]) -> Ledger:
    """Totals over runs (the first run's settings), with rates and the output check recomputed."""
    out = dataclasses.replace(ledgers[0], **{k: sum(getattr(x, k) for x in ledgers) for k in TOTALS})
    out.by_source = {}
    for x in ledgers:
        for s, n in x.by_source.items():
            out.by_source[s] = out.by_source.get(s, 0) + n
    n = out.new_tokens
    out.big_calls_per_token = out.big_calls / n if n else 0.0
    out.tokens_per_s = n / out.wall_s if out.wall_s else 0.0
    out.stopped = f"{len(ledgers)} runs"
    plans = [x.plan for x in ledgers if x.plan]
    if plans:
        out.plan = {**plans[0], **{k: sum(p.get(k, 0) for p in plans) for k in PLAN_COUNTS}}
    checks = [x.check for x in ledgers]
    out.check = sum_checks(checks) if all(c is not None for c in checks) else None
    audits = [x.audit for x in ledgers if x.audit]
    out.audit = sum_audits(audits) if audits else None
    return out


def sum_checks(checks: list[dict]) -> dict:
    mism, checked = sum(c["mismatches"] for c in checks), sum(c["checked"] for c in checks)
    return dict(on_policy_error=mism / checked if checked else 0.0, mismatches=mism, checked=checked,
                beyond_ties=sum(c["beyond_ties"] for c in checks),
                nll=sum(c["nll"] * c["checked"] for c in checks) / max(checked, 1))


def _check_cell(led: Ledger) -> str:
    c = led.check
    if c is None:
        return "-"
    return f"{100 * c['on_policy_error']:.1f}% ({c['mismatches']}/{c['checked']}, {c['beyond_ties']} beyond ties)"


def _audit_cell(led: Ledger) -> str:
    a = led.audit
    if a is None:
        return "-"
    cell = (f"{a['mismatches']}/{a['audited']} wrong ({100 * a['error']:.1f}%, <= {100 * a['bound']:.1f}% at "
            f"{100 * a['confidence']:.0f}%; target {100 * a['target']:.2g}%)")
    if "runs_raised" in a:
        return cell + f", raised in {a['runs_raised']} of {a['runs']} runs"
    path = a["threshold_path"]
    return cell + (f", threshold {_bar(a['threshold'])} -> {_bar(a['final_threshold'])} ({len(path)} moves)"
                   if path else "")


def _bar(t: float | None) -> str:
    return "-" if t is None else ("never" if t > 1 else f"{t:.6g}")


ROWS = [  # (label, the cell of one ledger)
    ("new tokens", lambda l: f"{l.new_tokens} ({l.stopped})"),
    ("by source", lambda l: " ".join(f"{k}={v}" for k, v in sorted(l.by_source.items()))),
    ("big calls", lambda l: f"{l.big_calls} ({l.big_calls_per_token:.2f}/token)"),
    ("big tokens fed", lambda l: f"{l.big_tokens_fed} (cropped {l.big_tokens_cropped})"),
    ("predictor calls", lambda l: f"{l.predictor_calls} (fed {l.predictor_tokens_fed})"),
    ("skipped", lambda l: f"{l.skipped} of {l.drafted} drafted"),
    ("verified", lambda l: f"{l.verified} ({l.rollbacks} rollbacks, -{l.rolled_back_tokens} tok)"),
    ("wall time", lambda l: f"{l.wall_s:.2f} s (policy {l.policy_s:.2f} s"
                            + (f", {l.draft_steps} draft steps)" if l.draft_steps else ")")),
    ("draft plan", lambda l: f"{l.plan['kept']} drafts in {l.plan['chains'] - l.plan['cut_to_zero']} of "
                             f"{l.plan['chains']} chains" + (f", {l.plan['skipped_starts']} held back ("
                             f"{l.plan.get('free_drafts', 0)} copy drafts meanwhile)" if l.plan['skipped_starts']
                             else "") if l.plan else "-"),
    ("tokens/s", lambda l: f"{l.tokens_per_s:.1f}"),
    ("on-policy error", _check_cell),
    ("NLL (nats/token)", lambda l: f"{l.check['nll']:.3f}" if l.check is not None else "-"),
    ("audit", _audit_cell),
]


def policy_label(led: Ledger) -> str:
    if not led.verify:
        return led.policy
    return f"{led.policy}+verify" + (f"<{led.verify_below:g}" if led.verify_below is not None else "")


def format_ledgers(columns: dict[str, Ledger]) -> str:
    """Ledgers side by side: one row per quantity, one column per run (the audit's row only if one was audited)."""
    heads = list(columns)
    rows = [(label, cell) for label, cell in ROWS if label != "audit" or any(columns[h].audit for h in heads)]
    big = next((columns[h] for h in heads if h == "big"), None)
    if big is not None and big.tokens_per_s > 0:      # every speed as a ratio to the plain run beside it
        i = next(i for i, (label, _) in enumerate(rows) if label == "tokens/s") + 1
        rows.insert(i, ("x big", lambda l: f"{l.tokens_per_s / big.tokens_per_s:.2f}x"))
    table = [["ledger"] + heads] + [[label] + [cell(columns[h]) for h in heads] for label, cell in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
