"""`python train.py evaluate --records DIR --gate DIR [--out DIR]`: the gate on the held-out test books.

The heads drafter beside the untrained rules (entropy, max-probability, the copy rule), a smaller recorded model
and the oracle, on all, copy and non-copy positions and per token class; a teacher-forced simulation of the
decode policy; linear probes of the recorded layers. The feature head (EAGLE-3 layout) beside the copy rule and
the oracle, with tokens per verify pass (gate/train/evaluate_eagle.py).

    evaluate(records, gate, out=None, split="test", ...) -> metrics

Outputs in --out (default GATE/eval): report.md, metrics.json, curves.png, curves_by_class.png, runlengths.png,
probes.png. docs/training.md defines every number (position, coverage, precision, methods, policy, run length).
"""
from __future__ import annotations

import argparse
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.files import write_json, write_text
from corpus_tools.inventory import CLASSES
from gate.model.copyrule import is_copy_position
from gate.model.features import SOURCES
from gate.model.heads import context_copy_stats, pair_index
from gate.model.load import kind_of, load_drafter, read_meta
from gate.train.calibration import calibrated_on, calibration_overlap, coverage_at_precision, precision_curve
from gate.train.data import (
    FitError,
    SplitData,
    apply_scoring,
    find_split,
    load_fields,
    load_split,
    open_records_checked,
    predict_pairs,
    select_part,
    split_books,
)
from gate.train.evaluate_eagle import eagle_metrics, pct
from gate.train.evaluate_eagle import report as eagle_report
from gate.train.probes import plot_probes, run_probes
from runtimes.info import TokenizerMismatch

TARGETS = (0.95, 0.98, 0.99, 0.995)


def check_records_vs_gate(rec, rec_path, meta, gate_path) -> str:
    big = meta["big_model"]
    if rec.fingerprint != big["fingerprint"]:
        raise TokenizerMismatch(
            f"records {rec_path} were made with tokenizer {rec.fingerprint} ({', '.join(rec.models)}) but the gate "
            f"{gate_path} was trained for {big['name']!r} with tokenizer {big['fingerprint']}")
    if big["name"] not in rec.models:
        raise FitError(f"records {rec_path} hold no records of {big['name']!r} (the gate's big model); "
                       f"they hold {', '.join(rec.models)}")
    entry = next(m for m in rec.meta["models"] if m["name"] == big["name"])
    lay = meta["hidden_layer"]
    missing = [int(x) for x in (lay if isinstance(lay, list) else [lay]) if int(x) not in
               [int(y) for y in entry.get("layers", [])]]
    if missing:
        raise FitError(f"records {rec_path}: hidden layer(s) {', '.join(map(str, missing))} (read by the gate) not "
                       f"recorded (recorded: {entry.get('layers')})")
    return big["name"]


def simulate_policy(scores_by_pair: dict, argmax: np.ndarray, cand_by_pair: dict, run_start: np.ndarray,
                    threshold: float, max_skip: int) -> dict:
    """Teacher-forced policy walk; scores_by_pair[(s)] are arrays over t (nan where the pair is invalid)."""
    n = len(argmax)
    skipped = np.zeros(n, dtype=bool)
    right = np.zeros(n, dtype=bool)
    runs = []                          # skipped positions right after each big pass
    p, cur = None, 0
    for t in range(n):
        s = None if p is None or run_start[t] == t else t - p
        if s is not None and s < max_skip and scores_by_pair[s][t] >= threshold:
            skipped[t] = True
            right[t] = cand_by_pair[s][t] == argmax[t]
            cur += 1
            continue
        if p is not None:              # a big pass here (or a new stretch): close the previous run
            runs.append(cur)
        p, cur = t, 0
    if p is not None:
        runs.append(cur)
    n_pos = n - len(np.unique(run_start))            # the first position of each stretch is never a choice
    k = int(skipped.sum())
    return {"positions": int(n_pos), "skipped": k, "coverage": k / max(n_pos, 1),
            "precision": float(right[skipped].mean()) if k else None,
            "errors": int(k - right[skipped].sum()),
            "big_passes_per_1000_tokens": 1000 * (n_pos - k) / max(n_pos, 1),
            "skip_run_hist": np.bincount(np.array(runs, dtype=np.int64), minlength=max_skip).tolist()}


def safe_run_lengths(correct_by_s: dict, run_start: np.ndarray, max_s: int) -> list[int]:
    """Histogram over p of the number of consecutive s = 1.. whose pair (p+s, s) is correct."""
    n = len(run_start)
    L = np.zeros(n, dtype=np.int64)
    alive = np.ones(n, dtype=bool)
    for s in range(1, max_s + 1):
        t = np.arange(n) + s
        ok = np.zeros(n, dtype=bool)
        inb = t < n
        ok[inb] = correct_by_s[s][t[inb]] & (run_start[t[inb]] == run_start[np.arange(n)[inb]])
        alive &= ok
        L += alive
    has_next = np.zeros(n, dtype=bool)
    has_next[:-1] = run_start[1:] == run_start[:-1]
    return np.bincount(L[has_next], minlength=max_s + 1).tolist()


def _by_pair(n: int, t: np.ndarray, s: np.ndarray, v: np.ndarray, max_s: int, fill) -> dict:
    out = {}
    for j in range(1, max_s + 1):
        a = np.full(n, fill, dtype=np.asarray(v).dtype if fill is not np.nan else np.float64)
        m = s == j
        a[t[m]] = v[m]
        out[j] = a
    return out


def _plot_curves(curves: dict, oracle_cov: float, path: Path, title: str, head_oracle: float | None = None) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    real = {k: v for k, v in curves.items() if not k.startswith("oracle")}
    hi = [float(cov[prec >= 0.95].max()) for cov, prec in real.values() if (prec >= 0.95).any()]
    zoom = max(0.05, 1.5 * max(hi, default=0.0))
    for ax, ylo, xhi in zip(axes, (0.5, 0.95), (1.0, zoom)):
        for name, (cov, prec) in real.items():
            ax.plot(cov, prec, label=name, lw=1.5)
        ax.plot([0, oracle_cov], [1, 1], "k--", lw=1.5, label=f"oracle ({oracle_cov:.1%})")
        if head_oracle is not None:
            ax.plot([0, head_oracle], [0.999, 0.999], ":", color="grey", lw=1.5,
                    label=f"oracle, head top-1 ({head_oracle:.1%})")
        for t in TARGETS:
            ax.axhline(t, color="grey", lw=0.5, ls=":")
        ax.set_ylim(ylo, 1.002)
        ax.set_xlim(0, xhi)
        ax.set_xlabel("coverage (share of positions skipped)")
        ax.set_ylabel("precision (skipped tokens = big argmax)")
        ax.grid(alpha=0.3)
    axes[0].legend(loc="lower left", fontsize=8)
    axes[1].set_title("zoom: precision >= 95%", fontsize=9)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_by_class(res: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    classes = [c for c in CLASSES if c in res]
    fig, axes = plt.subplots(1, len(classes), figsize=(4 * len(classes), 3.6), squeeze=False)
    for ax, c in zip(axes[0], classes):
        for name, (cov, prec) in res[c]["curves"].items():
            if not name.startswith("oracle"):
                ax.plot(cov, prec, label=name, lw=1.2)
        ax.plot([0, res[c]["oracle"]], [1, 1], "k--", lw=1.2, label="oracle")
        ax.set_ylim(0.9, 1.002)
        ax.set_title(f"{c} ({res[c]['share']:.0%} of pairs)")
        ax.set_xlabel("coverage within class")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("precision")
    axes[0][0].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_runs(hists: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    w = 0.8 / max(1, len(hists))
    for i, (name, h) in enumerate(hists.items()):
        h = np.asarray(h, dtype=float)
        ax.bar(np.arange(len(h)) + i * w - 0.4 + w / 2, h / max(h.sum(), 1), width=w, label=name)
    ax.set_xticks(range(max(len(np.asarray(h)) for h in hists.values())))
    ax.set_xlabel("consecutive positions skipped (or skippable) after one big pass")
    ax.set_ylabel("share of big passes")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _thin(cov, prec, n=400):
    if len(cov) <= n:
        return cov, prec
    idx = np.unique(np.r_[np.linspace(0, len(cov) - 1, n).astype(int), len(cov) - 1])
    return cov[idx], prec[idx]


@dataclass
class EvalInputs:
    """The records, the gate and the split being evaluated, checked against each other."""
    rec: object
    records: object                      # the records' path (for messages and the report)
    gate: Path
    meta: dict
    entry: dict                          # the records' entry of the gate's big model
    dr: object                           # the Drafter
    split: str
    te: SplitData

    @property
    def name(self) -> str:
        return self.entry["name"]


def open_inputs(records, gate, split: str, part: str | None = None) -> EvalInputs:
    gate = Path(gate)
    meta = read_meta(gate)
    if "predictor" not in meta and "head" not in meta:
        raise FitError(f"{gate}: {kind_of(meta)}; this reads the heads drafter and the feature head (a router's "
                       "side-by-side evaluation with the copy rule and the oracle is bench/pair.py coverage)")
    rec = records if hasattr(records, "load") else open_records_checked(records)
    records = Path(getattr(rec, "path", records)) if not hasattr(records, "load") else getattr(rec, "path", "<records>")
    name = check_records_vs_gate(rec, records, meta, gate)
    entry = next(m for m in rec.meta["models"] if m["name"] == name)
    dr = load_drafter(gate, {"name": name, "fingerprint": rec.fingerprint, "hidden_size": entry["hidden_size"],
                             "vocab_size": entry["vocab_size"], "n_layers": entry["n_layers"]})
    split = find_split(rec, records, split) if split in ("test", "validation") else split
    if split not in rec.splits:
        raise FitError(f"{records}: no split {split!r} (splits: {', '.join(rec.splits)})")
    data = select_part(load_split(rec, records, split, name, dr.hidden_layer), part, records)
    return EvalInputs(rec, records, gate, meta, entry, dr, split, data)


def test_pairs(inp: EvalInputs, max_pairs: int, log) -> tuple[np.ndarray, np.ndarray, int]:
    """(t, s) pairs of the split and the number of positions they cover (whole positions only, so the policy
    walk sees every pair it needs, up to --max-pairs)."""
    te = inp.te
    t, s = pair_index(te.run_start, np.arange(len(te)), inp.dr.predictor.max_s)
    if len(t) == 0:
        raise FitError(f"{inp.records}: split {inp.split!r} has no position with an earlier one in the same book")
    n_used = len(te)
    if len(t) > max_pairs:
        n_used = int(t[max_pairs])
        keep = t < n_used
        t, s = t[keep], s[keep]
        log(f"[evaluate] evaluating the first {n_used:,} of {len(te):,} positions ({len(t):,} pairs, --max-pairs)")
    return t, s, n_used


def score_methods(o: dict, primary: str, small: dict | None = None) -> dict:
    """Each method: (score, correct, class of its candidate, its candidate) per pair."""
    cp = o["copy"]
    head = (o["head1_correct"], o["cls"][:, 0], o["cands"][:, 0])
    # the oracle skips where some proposal is right, with the right one (the copy rule's if only it is)
    any_right = o["correct"].any(1) | cp["correct"]
    first = np.where(o["correct"].any(1), o["correct"].argmax(1), 0)
    idx = np.arange(len(first))
    oracle_tok = np.where(o["correct"].any(1), o["cands"][idx, first], cp["token"])
    oracle_cls = np.where(o["correct"].any(1), o["cls"][idx, first], cp["cls"])
    return {**{f"gate:{n}": (v["score"], v["correct"], v["cls"], v["token"]) for n, v in o["sel"].items()},
            "copy": (cp["len"].astype(np.float64), cp["correct"], cp["cls"], cp["token"]),
            "max_prob": (o["head_p"], *head), "entropy": (1.0 - o["head_entropy"], *head),
            **(small or {}),
            "oracle": (any_right.astype(np.float64), any_right, oracle_cls, oracle_tok),
            "oracle:head": (o["head1_correct"].astype(np.float64), *head)}


def small_model_methods(inp: EvalInputs, t: np.ndarray, o: dict) -> dict:
    """The baselines a user with a smaller model of the same tokenizer tries first: its own token, skipped
    where its max-probability (BiLD's fallback rule) or 1 - its normalised entropy (entropy-gated switching)
    is high. Only for models recorded beside the big one (train.py record --model BIG --model SMALL)."""
    out = {}
    big_am = inp.te.argmax[t]
    for m in inp.rec.meta.get("models", []):
        if m["name"] == inp.name:
            continue
        a = load_fields(inp.rec, inp.records, inp.split, m["name"], ("argmax", "p_max", "entropy_norm"))
        pre = m["name"] + "/"
        if pre + "argmax" not in a or pre + "p_max" not in a:
            continue
        rows = inp.te.split_rows(t)
        tok = np.asarray(a[pre + "argmax"])[rows]
        ok, cls = tok == big_am, o["cls"][:, 0]
        out[f"{m['name']}:max_prob"] = (np.asarray(a[pre + "p_max"])[rows].astype(np.float64), ok, cls, tok)
        if pre + "entropy_norm" in a:
            out[f"{m['name']}:entropy"] = (1.0 - np.asarray(a[pre + "entropy_norm"])[rows].astype(np.float64), ok,
                                           cls, tok)
    return out


def copy_split(methods: dict, is_copy: np.ndarray, o: dict, primary: str) -> dict:
    """Every method's coverage at each precision on the copy positions and on the non-copy ones, with each
    subset's share of pairs and the accuracies of the drafter's candidate and the head's top-1 there."""
    out = {}
    for key, m in (("copy_positions", is_copy), ("non_copy", ~is_copy)):
        out[key] = {"share": float(m.mean()), "pairs": int(m.sum()),
                    "drafter_accuracy": float(o["sel"][primary]["correct"][m].mean()) if m.any() else None,
                    "head_accuracy": float(o["head1_correct"][m].mean()) if m.any() else None,
                    "coverage_at_precision": _on_subset(methods, m) if m.any() else
                    {k: {t: 0.0 for t in TARGETS} for k in methods}}
    return out


def by_class(methods: dict, prim: dict) -> dict:
    """Coverage at precision within each candidate class (threshold chosen within the class)."""
    res = {}
    correct = prim["correct"]
    for ci, c in enumerate(CLASSES):
        sub = {k: (v[0][v[2] == ci], v[1][v[2] == ci]) for k, v in methods.items()}
        m = prim["cls"] == ci
        if m.sum() < 50:
            continue
        res[c] = {"share": float(m.mean()), "pairs": int(m.sum()), "oracle": float(correct[m].mean()),
                  "coverage_at_precision": {k: coverage_at_precision(sc, ok, TARGETS) if len(sc) else
                                            {t_: 0.0 for t_ in TARGETS} for k, (sc, ok) in sub.items()},
                  "curves": {k: _thin(*precision_curve(sc, ok)[1:], n=200) for k, (sc, ok) in sub.items()}}
    return res


def _on_subset(methods: dict, m: np.ndarray) -> dict:
    return {k: coverage_at_precision(v[0][m], v[1][m], TARGETS) for k, v in methods.items()}


def by_since_big(methods: dict, correct: np.ndarray, s: np.ndarray, max_s: int) -> dict:
    return {int(j): {"pairs": int((s == j).sum()), "oracle": float(correct[s == j].mean()),
                     "coverage_at_precision": _on_subset(methods, s == j)}
            for j in range(1, max_s + 1) if (s == j).any()}


def decode_like(te: SplitData, t: np.ndarray, s: np.ndarray, methods: dict, correct: np.ndarray,
                max_s: int) -> dict | None:
    """The pairs whose text from p+1 to t is what greedy decoding would have produced (each token is the big
    model's argmax at the position before it): in decoding the drafter's context always looks like this."""
    agree = np.r_[te.tokens[1:] == te.argmax[:-1], False]
    consistent = np.ones(len(t), dtype=bool)
    for j in range(1, max_s + 1):
        m = s >= j
        consistent[m] &= agree[(t - j)[m]]
    if consistent.sum() < 50:
        return None
    return {"share": float(consistent.mean()), "pairs": int(consistent.sum()),
            "oracle": float(correct[consistent].mean()) if consistent.any() else None,
            "coverage_at_precision": _on_subset(methods, consistent)}


def _calibrated_scores(meta: dict, methods: dict):
    """(name, fit's calibration, method key) for each calibrated score the evaluation also computed."""
    for n, c in meta.get("calibration", {}).items():
        key = f"gate:{n}" if f"gate:{n}" in methods else n
        if key in methods:
            yield n, c, key


def calibrated_on_test(meta: dict, methods: dict) -> dict:
    """The calibrated thresholds (from fit, on validation) applied to the test pairs."""
    calib = {}
    for n, c, key in _calibrated_scores(meta, methods):
        m = methods[key][0] >= c["threshold"]
        ok = methods[key][1]
        calib[n] = {"threshold": c["threshold"], "val_coverage": c["coverage"], "val_precision": c["precision"],
                    "test_coverage": float(m.mean()), "test_precision": float(ok[m].mean()) if m.any() else None,
                    "certified": c["certified"]}
    return calib


def policy_and_runs(inp: EvalInputs, methods: dict, o: dict, t, s, n: int) -> tuple[dict, dict]:
    """The decode-policy simulation with each calibrated score, and the run-length histograms."""
    dr, te = inp.dr, inp.te
    max_s = dr.predictor.max_s
    policy = {}
    for name, c, key in _calibrated_scores(inp.meta, methods):
        sc_by = _by_pair(n, t, s, methods[key][0].astype(np.float64), max_s, np.nan)
        cand_by = _by_pair(n, t, s, methods[key][3], max_s, -1)
        policy[name] = simulate_policy(sc_by, te.argmax[:n], cand_by, te.run_start[:n], c["threshold"], dr.max_skip)
    correct = o["sel"][dr.primary]["correct"]
    runs = {"future heads alone (perfect gate)": safe_run_lengths(
        _by_pair(n, t, s, o["head1_correct_future"], max_s, False), te.run_start[:n], max_s),
        "drafter candidate (perfect gate)": safe_run_lengths(_by_pair(n, t, s, correct, max_s, False),
                                                             te.run_start[:n], max_s)}
    if dr.primary in policy:
        runs[f"calibrated {dr.primary} gate (policy)"] = policy[dr.primary]["skip_run_hist"]
    return policy, runs


def probe_layers(inp: EvalInputs, probe_k: int, log, path: Path) -> dict:
    """Linear probes from every recorded layer (gate/train/probes.py), trained on train, read on the split."""
    rec, records, name = inp.rec, inp.records, inp.name
    tr_split = find_split(rec, records, "train")
    base = ("token", "target", "argmax", "book", "pos")

    def view(split):
        a = load_fields(rec, records, split, name, base)
        return {"tokens": a["token"], "target": a["target"], "argmax": a[f"{name}/argmax"], "book": a["book"],
                "pos": a["pos"]}

    def hidden(which, layer, rows):
        sp = tr_split if which == "train" else inp.split
        h = load_fields(rec, records, sp, name, (f"hidden/{layer}",))[f"{name}/hidden/{layer}"]
        return np.asarray(h[rows], dtype=np.float32)
    t0 = time.time()
    layers = sorted(int(x) for x in inp.entry.get("layers", []))
    res = run_probes(view(tr_split), view(inp.split), hidden, layers, K=probe_k, log=log)
    res["seconds"] = round(time.time() - t0, 1)
    plot_probes(res, path)
    return res


def against_target(cap: dict, acc: float, primary: str) -> dict:
    """The learned gate's coverage at 99% precision against the oracle's and the entropy gate's."""
    best_gate = f"gate:{primary}"
    target = {"best_gate": best_gate, "gate_cov_99": cap[best_gate][0.99], "oracle_cov": acc,
              "entropy_cov_99": cap["entropy"][0.99], "max_prob_cov_99": cap["max_prob"][0.99]}
    target["ratio_to_oracle"] = target["gate_cov_99"] / max(acc, 1e-12)
    target["ratio_to_entropy"] = (target["gate_cov_99"] / target["entropy_cov_99"]
                                  if target["entropy_cov_99"] > 0 else None)
    target["copy_cov_99"] = cap["copy"][0.99]
    target["meets_copy_rule"] = target["gate_cov_99"] >= target["copy_cov_99"]
    target["meets_half_oracle"] = target["ratio_to_oracle"] >= 0.5
    target["meets_3x_entropy"] = (target["ratio_to_entropy"] is None and target["gate_cov_99"] > 0) or \
        (target["ratio_to_entropy"] is not None and target["ratio_to_entropy"] >= 3)
    return target


def check_calibration_overlap(inp: EvalInputs, part: str | None, force: bool, log) -> list[str]:
    """The evaluated books the gate's threshold was certified on: refused (FitError) unless force, then warned
    about and named in the report."""
    books = split_books(inp.te, part)
    overlap = calibration_overlap(inp.meta, inp.records, inp.split, books)
    if not overlap:
        return []
    cal = calibrated_on(inp.meta)
    what = (f"--split {inp.split}{f' --part {part}' if part else ''}: the gate was calibrated on {len(overlap)} of "
            f"these {len(books)} books ({', '.join(overlap[:3])}{', ...' if len(overlap) > 3 else ''}; by "
            f"{cal.get('by', 'its fit')} on {describe_calibration(cal)}), so its precision here is the calibration's "
            "own, not a test of it")
    if not force:
        raise FitError(f"{what} - evaluate on books it was not calibrated on (another --part or --split), or add "
                       "--force")
    log(f"[evaluate] warning (--force): {what}")
    return overlap


def describe_calibration(cal: dict | None) -> str:
    """'split S of RECORDS, part I/K' of calibrated_on, for messages and the report."""
    if not cal:
        return "unknown (the artifact does not say)"
    return f"split {cal.get('split')!r} of {cal.get('records')}" + (f", part {cal['part']}" if cal.get("part") else "")


def evaluate(records, gate, out=None, split: str = "test", max_pairs: int = 600000, probes: bool = True,
             probe_k: int = 512, log=print, command: str = "", part: str | None = None, force: bool = False) -> dict:
    """Score the gate on the split's pairs, write report.md, metrics.json and the figures; returns the metrics.
    Books the gate was calibrated on are refused unless `force` (check_calibration_overlap)."""
    t_start = time.time()
    inp = open_inputs(records, gate, split, part)
    overlap = check_calibration_overlap(inp, part, force, log)
    if "head" in inp.meta:
        return evaluate_feature_head(inp, out, max_pairs, log, command, overlap, t_start, probes, probe_k)
    dr, te, max_s = inp.dr, inp.te, inp.dr.predictor.max_s
    out = Path(out) if out else inp.gate / "eval"
    out.mkdir(parents=True, exist_ok=True)
    t, s, n_used = test_pairs(inp, max_pairs, log)
    o = predict_pairs(dr.predictor, te, t, s, gates=dr.gates, desc="test pairs", modes=("future",),
                      copy=context_copy_stats(te.tokens, te.run_start))
    o = apply_scoring(o, te, dr.scoring_by_gate, dr.predictor.tables)
    prim = o["sel"][dr.primary]
    acc = float(prim["correct"].mean())
    methods = score_methods(o, dr.primary, small_model_methods(inp, t, o))
    correct = methods["oracle"][1]          # some proposal right: what the oracle skips
    oracle_cov = float(correct.mean())
    is_copy = is_copy_position(te.copy_rule()[1][t])
    cap = {m: coverage_at_precision(v[0], v[1], TARGETS) for m, v in methods.items()}
    curves = {m: _thin(*precision_curve(v[0], v[1])[1:]) for m, v in methods.items()}
    _plot_curves(curves, oracle_cov, out / "curves.png",
                 f"{inp.name}: test pairs (s = 1..{max_s}); drafter candidate right {acc:.1%}, head top-1 "
                 f"{o['head1_correct'].mean():.1%}", head_oracle=float(o["head1_correct"].mean()))
    classes = by_class(methods, {"cls": prim["cls"], "correct": correct})
    _plot_by_class(classes, out / "curves_by_class.png")
    policy, runs = policy_and_runs(inp, methods, o, t, s, n_used)
    _plot_runs(runs, out / "runlengths.png")
    fut = o["head1_correct_future"]
    metrics = {"records": str(inp.records), "gate": str(inp.gate), "split": inp.split,
               "books": split_books(te, part), "calibrated_on": calibrated_on(inp.meta),
               "calibration_overlap": overlap,
               "positions": n_used, "pairs": int(len(t)), "predictor": dr.predictor.mode,
               "predictor_accuracy": acc, "head_accuracy": float(o["head1_correct"].mean()),
               "any_candidate_right": float(o["correct"].any(1).mean()),
               "chosen_source": {**{src: float((prim["slot"] == i).mean()) for i, src in enumerate(SOURCES)},
                                 "copy rule": float((prim["slot"] == -1).mean())},
               "source_right": {src: float(o["correct"][:, i].mean()) for i, src in enumerate(SOURCES)},
               "future_heads_accuracy_by_s": {
                   int(j): float(fut[s == j].mean()) for j in range(1, max_s + 1) if (s == j).any()},
               "coverage_at_precision": cap, **copy_split(methods, is_copy, o, dr.primary),
               "copy_rule": {"in_drafter": dr.scoring is not None,
                             "scoring": "precision maps" if dr.maps else "trust table (an older artifact)"
                             if dr.copy_trust is not None else None,
                             "accuracy": float(o["copy"]["correct"].mean()),
                             "has_candidate": float((o["copy"]["len"] > 0).mean())},
               "part": part, "target_precision": inp.meta.get("target_precision"),
               "by_class": {c: {k: v for k, v in d.items() if k != "curves"} for c, d in classes.items()},
               "by_since_big": by_since_big(methods, correct, s, max_s),
               "decode_like": decode_like(te, t, s, methods, correct, max_s),
               "calibrated": calibrated_on_test(inp.meta, methods), "policy": policy, "run_lengths": runs,
               "target": against_target(cap, oracle_cov, dr.primary),
               "probes": probe_layers(inp, probe_k, log, out / "probes.png") if probes else None,
               "cost": inp.meta.get("cost"), "command": command, "seconds": round(time.time() - t_start, 1)}
    write_json(out / "metrics.json", _jsonable(metrics))
    md = report_markdown(metrics, inp.meta, dr)
    write_text(out / "report.md", md)
    log(md)
    log(f"[evaluate] wrote {out}/report.md, metrics.json and figures in {time.time() - t_start:.0f}s")
    return metrics


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    return x


def _pct(x, d=1):
    return "-" if x is None else f"{100 * x:.{d}f}%"


def report_markdown(m: dict, meta: dict, dr) -> str:
    """report.md: the metrics as tables, section by section."""
    L = (_md_intro(m, meta, dr) + _md_copy_split(m, dr) + _md_coverage(m, dr) + _md_target_and_policy(m, meta, dr)
         + _md_probes(m)
         + [f"Evaluation took {m['seconds']:.0f}s."])
    return "\n".join(L) + "\n"


def _md_intro(m: dict, meta: dict, dr) -> list[str]:
    big = meta["big_model"]
    cost = meta.get("cost", {})
    L = [f"# Gate evaluation: {big['name']} on held-out {m['split']} books", "",
         f"Command: `{m['command']}`" if m["command"] else "", "",
         f"Gate calibrated on: {describe_calibration(m['calibrated_on'])}"
         + (f" - **{len(m['calibration_overlap'])} of the books below are among them (--force): precision there is "
            "the calibration's own, not a test**" if m["calibration_overlap"] else "; none of the books below") + ".",
         "",
         f"Test books{' (part ' + m['part'] + ')' if m['part'] else ''}: {', '.join(map(str, m['books']))}; "
         f"{m['positions']:,} positions, {m['pairs']:,} pairs "
         f"(t, since_big s = 1..{dr.max_skip - 1}). Drafter reads big-model layer {dr.hidden_layer}; head mode "
         f"`{m['predictor']}`. The drafter's candidate (the best-scoring of: head top-1, head top-2, training-text "
         f"n-gram, in-context copy, or the copy rule's where its estimated precision is higher) equals the big "
         f"model's argmax on {_pct(m['predictor_accuracy'])} of pairs; the head's top-1 alone on {_pct(m['head_accuracy'])} (the "
         f"candidate of the max_prob / entropy baselines, oracle:head); some candidate is right on "
         f"{_pct(m['any_candidate_right'])}, some candidate or the copy rule's (the oracle's coverage) on "
         f"{_pct(m['coverage_at_precision']['oracle'][0.99])}."
         f" Chosen candidate by source: " + ", ".join(f"{k} {_pct(v)}" for k, v in m["chosen_source"].items()) +
         "; each source right: " + ", ".join(f"{k} {_pct(v)}" for k, v in m["source_right"].items()) +
         ". Definitions: see gate/train/evaluate.py (coverage = share of positions skipped; precision = share "
         "of skipped positions whose token equals the big model's argmax).", ""]
    if cost:
        L += [f"Drafter cost: word head {cost['word_head_params'] / 1e6:.2f}M params, "
              f"{cost['word_head_flops_per_token'] / 1e6:.2f} MFLOP/token; future heads "
              f"{cost['future_heads_params'] / 1e6:.2f}M params, {cost['future_head_flops_per_token'] / 1e6:.2f} "
              f"MFLOP/token; together {cost['drafter_flops_per_token'] / 1e6:.2f} MFLOP/token = "
              f"{_pct(cost.get('drafter_flops_vs_big'), 2)} of the big model's "
              f"{cost.get('big_flops_per_token', 0) / 1e6:.0f} MFLOP/token (2 x params).", ""]
    return L


def _md_cap_table(rows: dict) -> list[str]:
    """A table of coverage at each target precision, one row per method."""
    L = ["| method | " + " | ".join(f"@{_pct(t, 1)}" for t in TARGETS) + " |", "|---" * (len(TARGETS) + 1) + "|"]
    for meth, row in rows.items():
        L.append(f"| {meth} | " + " | ".join(_pct(row[t]) for t in TARGETS) + " |")
    return L


def _md_coverage(m: dict, dr) -> list[str]:
    L = ["## Coverage at precision (test pairs, threshold chosen per method on the test pairs)", "",
         f"1% coverage = {m['pairs'] / 100:,.0f} pairs; at this size a coverage at 99% precision rests on a handful "
         "of errors - compare methods on the whole curve.", ""] + _md_cap_table(m["coverage_at_precision"])
    L += ["", "![curves](curves.png)", "", "### By candidate class (threshold chosen within the class)", "",
          "| class | share of pairs | oracle | " + " | ".join(
              f"{k} @99%" for k in m["coverage_at_precision"] if k != "oracle") + " |",
          "|---" * (2 + len(m["coverage_at_precision"])) + "|"]
    for c, d in m["by_class"].items():
        L.append(f"| {c} | {_pct(d['share'])} | {_pct(d['oracle'])} | " + " | ".join(
            _pct(d["coverage_at_precision"][k][0.99]) for k in m["coverage_at_precision"] if k != "oracle") + " |")
    L += ["", "Per class, coverage at each precision for the primary gate:", "",
          "| class | " + " | ".join(f"@{_pct(t, 1)}" for t in TARGETS) + " |", "|---" * (len(TARGETS) + 1) + "|"]
    g = f"gate:{dr.primary}"
    for c, d in m["by_class"].items():
        L.append(f"| {c} | " + " | ".join(_pct(d["coverage_at_precision"][g][t]) for t in TARGETS) + " |")
    L += ["", "![by class](curves_by_class.png)", "", "### By since_big", "",
          "| s | pairs | oracle | " + " | ".join(f"{k} @99%" for k in m["coverage_at_precision"] if k != "oracle")
          + " |", "|---" * (3 + len(m["coverage_at_precision"]) - 1) + "|"]
    for j, d in m["by_since_big"].items():
        L.append(f"| {j} | {d['pairs']:,} | {_pct(d['oracle'])} | " + " | ".join(
            _pct(d["coverage_at_precision"][k][0.99]) for k in m["coverage_at_precision"] if k != "oracle") + " |")
    dl = m.get("decode_like")
    if dl:
        L += ["", f"### Decode-like pairs ({dl['pairs']:,} = {_pct(dl['share'])} of pairs: the text from the big "
              "model's last pass to t is its own greedy continuation, as the drafter's context always is in "
              f"decoding; oracle {_pct(dl['oracle'])})", ""] + _md_cap_table(dl["coverage_at_precision"])
    return L


def _md_copy_split(m: dict, dr) -> list[str]:
    """Gate vs copy rule vs oracle on all, copy and non-copy positions, at 99% precision."""
    g = f"gate:{dr.primary}"
    keys = [g, "copy", "max_prob", "entropy"] + [k for k in m["coverage_at_precision"] if ":" in k and
                                                  not k.startswith(("gate:", "oracle"))] + ["oracle"]
    rows = [("all positions", 1.0, m["coverage_at_precision"], m["head_accuracy"])]
    rows += [(name, m[key]["share"], m[key]["coverage_at_precision"], m[key]["head_accuracy"])
             for name, key in (("copy positions", "copy_positions"), ("non-copy positions", "non_copy"))]
    L = ["", "## What the gate learns beyond copying (coverage at 99% precision)", "",
         "Copy positions: the 4 tokens before the position occurred earlier in its context (prompt lookup could "
         "continue them). The copy rule (`copy`) needs no training; the learned gate must match it on copy "
         "positions and add to it on the others.", "",
         "| positions | share | head top-1 right | " + " | ".join(keys) + " |", "|---" * (3 + len(keys)) + "|"]
    for name, share, cap, head in rows:
        L.append(f"| {name} | {_pct(share)} | {_pct(head)} | " + " | ".join(_pct(cap[k][0.99]) for k in keys) + " |")
    return L


def _md_target_and_policy(m: dict, meta: dict, dr) -> list[str]:
    tg = m["target"]
    L = ["", "## Against the target (coverage at 99% precision)", "",
          f"- learned gate ({tg['best_gate']}, the drafter's): {_pct(tg['gate_cov_99'])}; oracle "
          f"{_pct(tg['oracle_cov'])} -> "
          f"{tg['ratio_to_oracle']:.2f} of the oracle (target >= 0.50: "
          f"{'met' if tg['meets_half_oracle'] else 'NOT met'})",
          f"- entropy gate: {_pct(tg['entropy_cov_99'])} -> learned/entropy = "
          + (f"{tg['ratio_to_entropy']:.1f}x" if tg["ratio_to_entropy"] is not None else "inf (entropy covers 0)")
          + f" (target >= 3x: {'met' if tg['meets_3x_entropy'] else 'NOT met'}); max-prob gate "
          f"{_pct(tg['max_prob_cov_99'])}",
          f"- copy rule: {_pct(tg['copy_cov_99'])} -> the learned gate is "
          f"{'at least as good' if tg['meets_copy_rule'] else 'WORSE'}", ""]
    tp = meta.get("target_precision", 0.99)
    recal = meta.get("recalibrated") or {}
    on = f"{recal['split']} of {recal['records']} (train.py calibrate)" if recal.get("split") else "validation"
    L += [f"## Calibrated thresholds (Learn-then-Test on {on}: precision >= {_pct(tp)} with probability >= "
          f"{_pct(1 - meta.get('delta', 0.1), 0)})", "",
          "| score | threshold | val coverage | val precision | test coverage | test precision |", "|---|---|---|---|---|---|"]
    for n, c in m["calibrated"].items():
        L.append(f"| {n}{' (primary)' if n == dr.primary else ''} | {c['threshold']:.4g} | {_pct(c['val_coverage'])} | "
                 f"{_pct(c['val_precision'], 2)} | {_pct(c['test_coverage'])} | {_pct(c['test_precision'], 2)} |")
    L += ["", "## Decode-policy simulation (teacher-forced; skip while score >= threshold and since_big < "
          f"{dr.max_skip})", "",
          "| score | positions | skipped (big passes saved) | precision of skipped | big passes / 1000 tokens |",
          "|---|---|---|---|---|"]
    for n, p in m["policy"].items():
        L.append(f"| {n} | {p['positions']:,} | {p['skipped']:,} ({_pct(p['coverage'])}) | "
                 f"{_pct(p['precision'], 2)} | {p['big_passes_per_1000_tokens']:.0f} |")
    L += ["", "## Run lengths", "", "Share of big passes after which k consecutive positions are skippable:", "",
          "| | " + " | ".join(f"k={k}" for k in range(dr.max_skip)) + " |", "|---" * (dr.max_skip + 1) + "|"]
    for n, h in m["run_lengths"].items():
        h = np.asarray(h, dtype=float)
        L.append(f"| {n} | " + " | ".join(_pct(x / max(h.sum(), 1)) for x in h[:dr.max_skip]) + " |")
    fa = m["future_heads_accuracy_by_s"]
    L += ["", "Future heads alone, accuracy by offset: " + ", ".join(f"t+{j + 1}: {_pct(a)}" for j, a in fa.items()),
          "", "![run lengths](runlengths.png)", ""]
    return L


def _md_probes(m: dict) -> list[str]:
    L = []
    pr = m.get("probes")
    if pr:
        L += ["## Linear probes (how far ahead the hidden state reads)", "",
              f"Linear probes ({pr.get('method', 'ridge')}, gate/train/probes.py) from each recorded layer's hidden state "
              f"at t to the token at t+k (train {pr['n_train']:,} / test {pr['n_test']:,} positions, top {pr['K']} "
              "tokens + other); accuracy on the test books. bigram: the most frequent token at t+k after the token "
              "at t; ceiling: share of test targets among the K classes (the most any probe over them can reach).",
              "",
              "| target | " + " | ".join(f"t+{k}" for k in pr["offsets"]) + " |", "|---" * (len(pr["offsets"]) + 1) + "|"]
        for kind in ("argmax", "text"):
            for l in pr["layers"]:
                L.append(f"| {kind}, layer {l} | " + " | ".join(_pct(pr["accuracy"][f"{kind}/{k}/{l}"])
                                                               for k in pr["offsets"]) + " |")
            for b in ("bigram", "unigram", "ceiling"):
                L.append(f"| {kind}, {b} | " + " | ".join(_pct(pr["baselines"][f"{kind}/{k}"][b])
                                                         for k in pr["offsets"]) + " |")
        L += ["", "![probes](probes.png)", ""]
    return L


def evaluate_feature_head(inp: EvalInputs, out, max_pairs: int, log, command: str, overlap: list[str],
                          t_start: float, probes: bool, probe_k: int) -> dict:
    """evaluate for the feature head (gate/train/evaluate_eagle.py): report.md and metrics.json (and the probes of
    every recorded layer)."""
    dr = inp.dr
    out = Path(out) if out else inp.gate / "eval"
    out.mkdir(parents=True, exist_ok=True)
    m = eagle_metrics(dr, inp.te, "test pairs", max_positions=max(1, max_pairs // dr.depth))
    a, n = m["all"], m["non_copy"]
    log(f"[evaluate] feature head on {m['positions']:,} positions of {inp.records} ({inp.split}): first-token "
        f"agreement {pct(a['first_token_agreement'])} (non-copy {pct(n['first_token_agreement'])}); coverage at 99%: "
        f"gate {pct(a['gate_coverage_at_99'])}, copy rule {pct(a['copy_coverage_at_99'])}, oracle {pct(a['oracle'])}")
    metrics = {"records": str(inp.records), "split": inp.split, "gate": str(inp.gate), "kind": "feature head",
               "calibrated_overlap": overlap, "threshold": dr.threshold, **m,
               "probes": probe_layers(inp, probe_k, log, out / "probes.png") if probes else None,
               "seconds": round(time.time() - t_start, 1)}
    lines = [f"# Feature head (EAGLE-3 layout) on {inp.records}, split {inp.split}", "", f"`{command}`", "",
             f"Gate {inp.gate}, threshold {dr.threshold:.4g}; the head drafts up to {dr.depth} tokens per big pass. "
             "Teacher-forced pairs (t, s = since_big); non-copy: the 4 tokens before are nowhere earlier. "
             "Coverage @99%: the largest share of pairs a threshold on the score skips with >= 99% right; the "
             "oracle: the head's or the copy rule's token is right." + (
                 f" Warning: the gate was calibrated on {len(overlap)} of these books (--force)." if overlap else ""),
             ""] + eagle_report({inp.split: m}, dr.depth) + [""] + _md_probes(metrics)
    write_json(out / "metrics.json", _jsonable(metrics))
    write_text(out / "report.md", "\n".join(lines) + "\n")
    log(f"[evaluate] wrote {out / 'report.md'} ({time.time() - t_start:.0f}s)")
    return metrics


def main(argv=None) -> int:
    """`python train.py evaluate`: coverage/precision of the gate on the held-out test books, with probes."""
    ap = argparse.ArgumentParser(prog="train.py evaluate", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--records", required=True)
    ap.add_argument("--gate", required=True, help="drafter folder written by `python train.py fit`")
    ap.add_argument("--out", default=None, help="report folder (default GATE/eval)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--part", metavar="I/K", help="only every K-th book of the split, from the I-th (e.g. evaluate "
                    "on 2/2 after `train.py calibrate --part 1/2`)")
    ap.add_argument("--max-pairs", type=int, default=600000)
    ap.add_argument("--no-probes", action="store_true")
    ap.add_argument("--probe-k", type=int, default=512, help="probe vocabulary: most frequent K tokens + other")
    ap.add_argument("--force", action="store_true", help="evaluate even on books the gate was calibrated on (the "
                    "report says so)")
    args = ap.parse_args(argv)
    cmd = "python train.py evaluate " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    evaluate(args.records, args.gate, args.out, args.split, args.max_pairs, not args.no_probes, args.probe_k,
             log=lambda x: print(x, file=sys.stderr, flush=True), command=cmd, part=args.part, force=args.force)
    return 0   # a mistake (FitError, ArtifactError, ...) is train.py's one error line
