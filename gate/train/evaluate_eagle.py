"""`train.py evaluate` for the feature head (EAGLE-3 layout): the head beside the copy rule and the oracle,
teacher-forced on a records split, on all, copy and non-copy positions.

    m = eagle_metrics(drafter, split_data, label)   # agreement, coverage at 99%, tau(k) for head / copy / oracle

Non-copy positions: the 4 tokens before are nowhere earlier in the text. tau(k): mean tokens per verify pass
when every pass drafts a chain of up to k (the copy rule only where it has a match), from the same teacher-forced
pairs (a chain's later drafts see the true tokens, which are the drafts while they are right). bench/eagle.py adds
step timings and the speed-ups cost curves predict. docs/bench.md.
"""
from __future__ import annotations

import time
from types import SimpleNamespace

import numpy as np

from gate.model.copyrule import COPY_SPAN
from gate.train.calibration import coverage_at_precision
from gate.train.fit_eagle import drafts_on, score_pairs

LEVEL = 0.99


def cover(score, ok) -> float:
    return coverage_at_precision(score, ok, (LEVEL,))[LEVEL] if len(score) else 0.0


def runs_from(ok_by_depth: list[np.ndarray], anchors: np.ndarray, k: int) -> np.ndarray:
    """Accepted drafts of a chain of up to k from each anchor row A: the longest m <= k with ok_by_depth[s-1][A+s-1]
    for s = 1..m (rows past the end count as wrong)."""
    n = len(ok_by_depth[0])
    run = np.zeros(len(anchors), dtype=np.int64)
    alive = np.ones(len(anchors), dtype=bool)
    for s in range(1, k + 1):
        r = anchors + s - 1
        ok = np.zeros(len(anchors), dtype=bool)
        inside = r < n
        ok[inside] = ok_by_depth[min(s, len(ok_by_depth)) - 1][r[inside]]
        alive &= ok
        run += alive
    return run


def chains(o: dict, argmax: np.ndarray, depth: int, rows: np.ndarray) -> dict:
    """tau(k) for the head, the copy rule and the oracle of both, from the anchors among `rows` (a mask over the
    split's rows); copy_drafting_share: the anchors where the copy rule has a candidate."""
    n = len(argmax)
    head_ok = [np.zeros(n, dtype=bool) for _ in range(depth)]
    copy_ok, copy_has, has_pair = np.zeros(n, dtype=bool), np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
    for s in range(1, depth + 1):
        m = o["s"] == s
        t = o["t"][m]
        head_ok[s - 1][t] = o["head_token"][m] == argmax[t]
        if s == 1:
            has_pair[t] = True
            copy_has[t] = o["copy_tok"][m] >= 0
            copy_ok[t] = (o["copy_tok"][m] == argmax[t]) & copy_has[t]
    anchors = np.flatnonzero(has_pair & rows)
    either = [h | copy_ok for h in head_ok]
    by_k = {}
    for k in range(1, depth + 1):
        by_k[k] = {"head_tau": 1 + float(runs_from(head_ok, anchors, k).mean()) if len(anchors) else None,
                   "copy_tau": 1 + float(runs_from([copy_ok] * depth, anchors, k).mean()) if len(anchors) else None,
                   "oracle_tau": 1 + float(runs_from(either, anchors, k).mean()) if len(anchors) else None,
                   "copy_drafting_share": float(copy_has[anchors].mean()) if len(anchors) else None}
    return {"anchors": int(len(anchors)), "by_k": by_k}


def table(o: dict, sel: dict, argmax: np.ndarray, m: np.ndarray, threshold: float) -> dict:
    """The head's numbers on the pairs selected by m (argmax: the big model's greedy token of each pair)."""
    s, right = o["s"], o["head_token"] == argmax
    copy_ok = (o["copy_tok"] == argmax) & (o["copy_tok"] >= 0)
    m1 = m & (s == 1)
    deployed = m & (sel["score"] >= threshold)
    return {
        "pairs": int(m.sum()),
        "first_token_agreement": float(right[m1].mean()) if m1.any() else None,
        "copy_first_token_right": float(copy_ok[m1].mean()) if m1.any() else None,
        "agreement_by_depth": {int(k): float(right[m & (s == k)].mean()) for k in np.unique(s[m])},
        "gate_coverage_at_99": cover(sel["score"][m], sel["correct"][m]),
        "copy_coverage_at_99": cover(o["copy_len_ext"][m].astype(float), copy_ok[m]),
        "oracle": float((right[m] | copy_ok[m]).mean()) if m.any() else None,
        "deployed_coverage": float(deployed.sum() / max(1, m.sum())),
        "deployed_precision": float(sel["correct"][deployed].mean()) if deployed.any() else None,
    }


def eagle_metrics(dr, te, label: str = "pairs", max_positions: int | None = None) -> dict:
    """The feature-head drafter `dr` (its decode path: the int8 copy where there is one) on split data `te`."""
    t0 = time.time()
    rows = None if max_positions is None or len(te) <= max_positions else [np.arange(max_positions)]
    o = drafts_on(dr.fast or dr.head, [te], rows, SimpleNamespace(eagle_depth=dr.depth), dr.tables, label)
    sel = score_pairs(dr.gate, o, dr.scoring)
    am = te.argmax[o["t"]]
    copy = o["copy_len"] >= COPY_SPAN
    res = {"positions": int(len(te) if rows is None else max_positions), "pairs": int(len(o["t"])),
           "copy_share": float(copy.mean())}
    copy_rows = np.zeros(len(te), dtype=bool)
    copy_rows[o["t"]] = copy
    for name, m, r in (("all", np.ones(len(copy), bool), np.ones(len(te), bool)), ("non_copy", ~copy, ~copy_rows),
                       ("copy_positions", copy, copy_rows)):
        res[name] = {**table(o, sel, am, m, dr.threshold), "chains": chains(o, te.argmax, dr.depth, r)}
    res["seconds"] = round(time.time() - t0, 1)
    return res


def pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def report(results: dict, depth: int) -> list[str]:
    """Markdown tables of eagle_metrics results {label: metrics}."""
    hdr = ("| data | positions | copy share | first token: head / copy rule | non-copy: head / copy rule "
           "| @99%: gate / copy / oracle | non-copy @99%: gate / copy / oracle | deployed: coverage / precision |")
    lines = [hdr, "|---" * (hdr.count("|") - 1) + "|"]
    for label, r in results.items():
        a, n = r["all"], r["non_copy"]
        lines.append(
            f"| {label} | {r['positions']:,} | {pct(r['copy_share'])} | {pct(a['first_token_agreement'])} / "
            f"{pct(a['copy_first_token_right'])} | {pct(n['first_token_agreement'])} / "
            f"{pct(n['copy_first_token_right'])} | {pct(a['gate_coverage_at_99'])} / {pct(a['copy_coverage_at_99'])}"
            f" / {pct(a['oracle'])} | {pct(n['gate_coverage_at_99'])} / {pct(n['copy_coverage_at_99'])} / "
            f"{pct(n['oracle'])} | {pct(a['deployed_coverage'])} / {pct(a['deployed_precision'])} |")
    ks = list(range(1, depth + 1))
    f2 = lambda x: "-" if x is None else f"{x:.2f}"     # noqa: E731
    lines += ["", "tau(k), tokens per verify pass drafting chains of up to k: head / copy rule / oracle of both, "
              "from all anchors | from non-copy anchors", "", "| data | " + " | ".join(f"k={k}" for k in ks) + " |",
              "|---|" + "---|" * len(ks)]
    for label, r in results.items():
        cells = []
        for k in ks:
            a, n = r["all"]["chains"]["by_k"][k], r["non_copy"]["chains"]["by_k"][k]
            cells.append(f"{f2(a['head_tau'])} / {f2(a['copy_tau'])} / {f2(a['oracle_tau'])} \\| "
                         f"{f2(n['head_tau'])} / {f2(n['copy_tau'])} / {f2(n['oracle_tau'])}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "Agreement with the big model's greedy token by chain depth (all positions)", "",
              "| data | " + " | ".join(f"s={k}" for k in ks) + " |", "|---|" + "---|" * len(ks)]
    for label, r in results.items():
        e = r["all"]["agreement_by_depth"]
        lines.append(f"| {label} | " + " | ".join(pct(e.get(k)) for k in ks) + " |")
    return lines


__all__ = ["eagle_metrics", "report", "chains", "runs_from", "table"]
