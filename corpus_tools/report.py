"""`python train.py report --records DIR [--out DIR]`: what the records say about word completion (where the model is sure, and what those tokens are).

Writes report.md, report.json and PNG plots answering, with numbers measured on the records:
  1. how sure is the model (distribution of the max probability);
  2. how often it is >= 95 / 99 / 99.9% sure, and how often it is right there (argmax == the text's next token);
  3. what those positions are (punctuation / word continuation / word start / other, and the top tokens);
  4. how many big-model passes a perfect "skip when sure" rule would save;
  5. whether the current sentence is enough: the model is re-run on a sample of positions with only the last
     --short-context tokens and compared with the recorded full-context outputs. This runs here, not in `record`:
     records stay a plain store of what the model did with full context, and the experiment can be repeated with
     another context length without re-recording.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from common.errors import ProjectError, one_line
from common.files import check_output_dir
from corpus_tools.records import RecordsError, open_records
from corpus_tools.tokens import CLASSES, token_class_from_tokenizer
from runtimes.info import TokenizerMismatch
from runtimes.loading import load

THRESHOLDS = (0.95, 0.99, 0.999)


def load_positions(rec, model: str, splits: list[str]) -> dict[str, np.ndarray]:
    """The few per-position fields the report needs, all splits concatenated (book ids made unique)."""
    parts = []
    for i, split in enumerate(splits):
        a = rec.load(split, fields=["token", "target", "book", "pos", "argmax", "p_max"], models=[model])
        parts.append({"token": a["token"], "target": a["target"], "pos": a["pos"],
                      "book": a["book"].astype(np.int64) + (i << 16), "argmax": a[f"{model}/argmax"],
                      "p_max": a[f"{model}/p_max"]})
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def skipped_with_limit(sure: np.ndarray, book: np.ndarray, max_skip: int) -> int:
    """Passes saved when at most `max_skip` positions in a row may be skipped: a run of r consecutive sure
    positions (within one book) saves r - r // (max_skip + 1)."""
    starts = sure & np.r_[True, ~sure[:-1] | (book[1:] != book[:-1])]
    lengths = np.bincount(np.cumsum(starts)[sure])[1:]
    return int((lengths - lengths // (max_skip + 1)).sum())


def sure_table(a: dict, thresholds) -> list[dict]:
    correct = a["argmax"] == a["target"]
    rows = []
    for t in thresholds:
        sure = a["p_max"] >= t
        n = int(sure.sum())
        rows.append({"threshold": t, "positions": n, "share": n / len(sure),
                     "accuracy": float(correct[sure].mean()) if n else float("nan"),
                     "saved_share_max_skip_1": skipped_with_limit(sure, a["book"], 1) / len(sure)})
    return rows


def class_tables(classes: np.ndarray, a: dict, thresholds) -> dict:
    """Composition of the sure positions by class, and how often each class is sure."""
    out = {"all": {c: float((classes == c).mean()) for c in CLASSES}}
    for t in thresholds:
        sure = a["p_max"] >= t
        out[f">={t}"] = {c: float((classes[sure] == c).mean()) if sure.any() else 0.0 for c in CLASSES}
    coverage = {c: {f">={t}": float((a["p_max"][classes == c] >= t).mean()) if (classes == c).any() else 0.0
                    for t in thresholds} for c in CLASSES}
    saved = {c: {f">={t}": float(((a["p_max"] >= t) & (classes == c)).mean()) for t in thresholds} for c in CLASSES}
    return {"composition": out, "sure_within_class": coverage, "saved_by_class_only_rule": saved}


def top_tokens(tok, a: dict, classes: np.ndarray, threshold: float, n: int = 20) -> list[dict]:
    sure = np.flatnonzero(a["p_max"] >= threshold)
    rows = []
    for token_id, count in Counter(a["argmax"][sure].tolist()).most_common(n):
        at = sure[a["argmax"][sure] == token_id]
        rows.append({"id": token_id, "text": tok.decode([token_id]), "class": str(classes[at[0]]), "count": count,
                     "share": count / len(sure), "accuracy": float((a["target"][at] == token_id).mean())})
    return rows


def sample_positions(a: dict, k: int, n: int, sure_at: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Up to n positions with >= k tokens in their book: up to half where the full context is >= sure_at sure, the
    rest elsewhere (sure positions are rare, and they are what the question is about). Returns indices and the
    weights (stratum size / sample size) that turn sample means back into means over all positions."""
    rng = np.random.default_rng(seed)
    eligible = a["pos"] >= k - 1
    idx, weight = [], []
    for stratum, quota in ((eligible & (a["p_max"] >= sure_at), n // 2), (eligible & (a["p_max"] < sure_at), None)):
        pool = np.flatnonzero(stratum)
        take = rng.choice(pool, min(n - len(idx[0]) if quota is None else quota, len(pool)), replace=False)
        idx.append(take)
        weight.append(np.full(len(take), len(pool) / max(len(take), 1)))
    idx, weight = np.concatenate(idx), np.concatenate(weight)
    order = np.argsort(idx)
    return idx[order], weight[order]


@torch.inference_mode()
def short_context(lm, a: dict, idx: np.ndarray, k: int, batch_size: int = 64) -> dict[str, np.ndarray]:
    """Re-run the model at positions idx with only the last k tokens (the position's own token included)."""
    windows = idx[:, None] + np.arange(-k + 1, 1)[None]  # a book's positions are contiguous in the records
    assert (a["book"][windows] == a["book"][idx, None]).all() and (a["pos"][idx] >= k - 1).all()
    probs = []
    for lo in tqdm(range(0, len(idx), batch_size), desc=f"short context ({k} tokens)", unit="batch"):
        x = torch.from_numpy(a["token"][windows[lo:lo + batch_size]].astype(np.int64)).to(lm.model.device)
        probs.append(torch.softmax(lm.model(x, logits_to_keep=1).logits[:, -1].float(), -1).cpu())
    p = torch.cat(probs)
    return {"argmax": p.argmax(-1).numpy(), "p_max": p.max(-1).values.numpy()}


def _wmean(x: np.ndarray, w: np.ndarray) -> float:
    return float((x * w).sum() / w.sum()) if w.sum() > 0 else float("nan")


def short_table(a: dict, s: dict, thresholds) -> dict:
    """Short vs full context on the sample; every share is weighted back to all positions."""
    i, w = s["index"], s["weight"]
    full_arg, full_p, target = a["argmax"][i], a["p_max"][i], a["target"][i]
    same = s["argmax"] == full_arg
    rows = []
    for t in thresholds:
        fs, ss = full_p >= t, s["p_max"] >= t
        rows.append({
            "threshold": t, "full_sure": _wmean(fs, w), "short_sure": _wmean(ss, w),
            "short_sure_and_same": _wmean(ss & same, w),  # passes a short-context rule would save losslessly
            "short_precision_vs_full": _wmean(same, w * ss),
            "short_accuracy_vs_text": _wmean(s["argmax"] == target, w * ss),
            "full_sure_recalled": _wmean(ss & same, w * fs), "full_sure_same_argmax": _wmean(same, w * fs)})
    return {"n": len(i), "n_sure": int((full_p >= s["sure_at"]).sum()), "sure_at": s["sure_at"],
            "argmax_agreement": _wmean(same, w), "accuracy_full": _wmean(full_arg == target, w),
            "accuracy_short": _wmean(s["argmax"] == target, w), "rows": rows}


def plots(out: Path, a: dict, classes: np.ndarray, s: dict | None, k: int, thresholds, title: str) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    fig, ax = plt.subplots(figsize=(7, 4))
    bins = np.linspace(0, 1, 51)
    ax.hist(a["p_max"], bins=bins, density=True, alpha=0.6, label=f"full context (all {len(a['p_max'])} positions)")
    if s is not None:
        ax.hist(s["p_max"], bins=bins, weights=s["weight"], density=True, histtype="step", lw=2,
                label=f"last {k} tokens only ({len(s['p_max'])} sampled positions, weighted)")
    for t in thresholds:
        ax.axvline(t, color="k", ls=":", lw=0.8)
    ax.set(yscale="log", xlabel="max probability of the next token", ylabel="density", title=title)
    ax.legend(fontsize=8)
    files.append(_save(plt, fig, out / "pmax_hist.png"))

    fig, ax = plt.subplots(figsize=(7, 4))
    grid = 1 - np.logspace(-4, np.log10(0.5), 60)
    correct = a["argmax"] == a["target"]
    share = [(a["p_max"] >= t).mean() for t in grid]
    acc = [correct[a["p_max"] >= t].mean() if (a["p_max"] >= t).any() else np.nan for t in grid]
    ax.plot(1 - grid, share, label="share of positions >= threshold (full context)")
    ax.plot(1 - grid, acc, label="accuracy vs text there (full context)")
    if s is not None:
        same = s["argmax"] == a["argmax"][s["index"]]
        ss = [_wmean(s["p_max"] >= t, s["weight"]) for t in grid]
        prec = [_wmean(same, s["weight"] * (s["p_max"] >= t)) for t in grid]
        ax.plot(1 - grid, ss, "--", label=f"share >= threshold (last {k} tokens)")
        ax.plot(1 - grid, prec, "--", label=f"agreement with full-context argmax there (last {k} tokens)")
    ax.set(xscale="log", yscale="log", ylim=(1e-3, 1.2), xlabel="1 - threshold", ylabel="fraction",
           title="coverage and accuracy by threshold")
    ax.invert_xaxis()
    ax.legend(fontsize=7)
    files.append(_save(plt, fig, out / "coverage.png"))

    fig, ax = plt.subplots(figsize=(7, 4))
    groups = ["all"] + [f">={t}" for t in thresholds]
    masks = [np.ones(len(classes), bool)] + [a["p_max"] >= t for t in thresholds]
    bottom = np.zeros(len(groups))
    for c in CLASSES:
        frac = np.array([(classes[m] == c).mean() if m.any() else 0 for m in masks])
        ax.bar(groups, frac, bottom=bottom, label=c)
        bottom += frac
    ax.set(ylabel="share of positions", title="predicted-token class, all vs sure positions")
    ax.legend(fontsize=8)
    files.append(_save(plt, fig, out / "classes.png"))
    return files


def _save(plt, fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def _pct(x: float) -> str:
    return "n/a" if x != x else f"{100 * x:.1f}%"


def _md_text(s: str) -> str:
    return "`" + json.dumps(s, ensure_ascii=False)[1:-1].replace("|", "\\|").replace("`", "'") + "`"


def markdown(r: dict) -> str:
    th = r["thresholds"]
    cl = r["classes"]
    L = [f"# Where is {r['model']} sure? (word completion)", "",
         f"Records `{r['records']}`, splits {', '.join(r['splits'])}: {r['positions']} positions, each predicted with "
         f">= {r['min_context']} tokens of context except at the start of a book (windows of {r['context']}, stride "
         f"{r['stride']}). Generated by `{r['command']}` in {r['seconds']:.0f} s.", "",
         "## Answers", ""] + [f"- {line}" for line in r["answers"]] + [
         "", "## How sure is the model?", "",
         f"Accuracy vs the text at all positions: {_pct(r['accuracy'])}. Quantiles of the max probability: "
         + ", ".join(f"{q}: {v:.3f}" for q, v in r["p_max_quantiles"].items()) + ".", "",
         "![max-probability histogram](pmax_hist.png)", "",
         "## Sure positions and what a perfect \"skip when sure\" rule saves", "",
         "A perfect rule skips the big model exactly where it is at least this sure and emits its argmax; each "
         "skipped position is one big-model pass saved. If at most one position in a row may be skipped (the big "
         "model runs after every skip), fewer are saved.", "",
         "| threshold | positions | share = passes saved | accuracy vs text there | saved with <= 1 skip in a row |",
         "|---|---|---|---|---|"]
    L += [f"| {t['threshold']} | {t['positions']} | {_pct(t['share'])} | {_pct(t['accuracy'])} | "
          f"{_pct(t['saved_share_max_skip_1'])} |" for t in r["sure"]]
    L += ["", "![coverage and accuracy](coverage.png)", "", "## What the sure positions are", "",
          "Class of the predicted token (punct: only punctuation; continuation: glued to the previous word; "
          "word_start: a new word; other: whitespace such as newlines, symbols, special tokens).", "",
          "| positions | " + " | ".join(CLASSES) + " |", "|---|" + "---|" * len(CLASSES)]
    L += [f"| {g} | " + " | ".join(_pct(v[c]) for c in CLASSES) + " |" for g, v in cl["composition"].items()]
    L += ["", "How often each class is predicted with this certainty, and the passes a rule that skips only that "
          "class would save:", "",
          "| class | " + " | ".join(f"sure >= {t}" for t in th) + " | " + " | ".join(f"saved >= {t}" for t in th)
          + " |", "|---|" + "---|" * 2 * len(th)]
    L += [f"| {c} | " + " | ".join(_pct(v) for v in cl["sure_within_class"][c].values()) + " | "
          + " | ".join(_pct(v) for v in cl["saved_by_class_only_rule"][c].values()) + " |" for c in CLASSES]
    L += ["", "![classes](classes.png)", "",
          f"Most frequent predicted tokens at >= {r['top_threshold']} positions:", "",
          "| token | class | count | share of sure positions | accuracy vs text |", "|---|---|---|---|---|"]
    L += [f"| {_md_text(t['text'])} | {t['class']} | {t['count']} | {_pct(t['share'])} | {_pct(t['accuracy'])} |"
          for t in r["top_tokens"]]
    s = r.get("short")
    if s:
        k = r["short_context"]
        L += ["", f"## Is the current sentence enough? (last {k} tokens vs full context)", "",
              f"The model was re-run on {s['n']} positions with only their last {k} tokens: {s['n_sure']} where the "
              f"full context is >= {s['sure_at']} sure and {s['n'] - s['n_sure']} elsewhere (stratified sample, seed "
              f"{r['seed']}; every share below is weighted back to all positions). Argmax agreement with the full "
              f"context: {_pct(s['argmax_agreement'])}; accuracy vs text {_pct(s['accuracy_short'])} (full context: "
              f"{_pct(s['accuracy_full'])}).", "",
              "| threshold | full context sure | short sure | short sure and same argmax (saved losslessly) | "
              "short sure: same argmax as full | short sure: accuracy vs text | full context sure: short context "
              "sure with the same argmax | full context sure: short argmax the same (any certainty) |",
              "|---|---|---|---|---|---|---|---|"]
        L += [f"| {x['threshold']} | {_pct(x['full_sure'])} | {_pct(x['short_sure'])} | "
              f"{_pct(x['short_sure_and_same'])} | {_pct(x['short_precision_vs_full'])} | "
              f"{_pct(x['short_accuracy_vs_text'])} | {_pct(x['full_sure_recalled'])} | "
              f"{_pct(x['full_sure_same_argmax'])} |" for x in s["rows"]]
    return "\n".join(L) + "\n"


def answers(r: dict) -> list[str]:
    """The seed's questions, answered in one line each from the measured numbers."""
    mid = r["thresholds"][len(r["thresholds"]) // 2]
    cl = r["classes"]
    comp = cl["composition"][f">={mid}"]
    top = ", ".join(f"{_md_text(t['text'])} {_pct(t['share'])}" for t in r["top_tokens"][:4])
    out = ["How often is it sure, and is it right there? " + "; ".join(
               f">= {t['threshold']}: {_pct(t['share'])} of positions, {_pct(t['accuracy'])} right"
               for t in r["sure"]) + ". A perfect \"skip when sure\" rule saves exactly these shares of big-model "
           f"passes ({_pct(r['sure'][len(r['sure']) // 2]['saved_share_max_skip_1'])} at {mid} with at most one "
           "skip in a row).",
           f"What are the sure positions (>= {mid})? " + ", ".join(f"{c} {_pct(comp[c])}" for c in CLASSES)
           + " (all positions: " + ", ".join(f"{c} {_pct(cl['composition']['all'][c])}" for c in CLASSES)
           + f"). Top tokens: {top}.",
           f"Punctuation only: punctuation is predicted with >= {mid} certainty at "
           f"{_pct(cl['sure_within_class']['punct'][f'>={mid}'])} of the positions where it is predicted; a "
           f"punctuation-only skipper would save {_pct(cl['saved_by_class_only_rule']['punct'][f'>={mid}'])} of "
           f"passes (word continuations only: {_pct(cl['saved_by_class_only_rule']['continuation'][f'>={mid}'])})."]
    s = r.get("short")
    if s:
        row = next(x for x in s["rows"] if x["threshold"] == mid)
        enough = row["full_sure_recalled"] >= 0.8 and row["short_precision_vs_full"] >= 0.99
        out.append(f"Is the sentence enough? With only the last {r['short_context']} tokens the model is >= {mid} "
                   f"sure at {_pct(row['short_sure'])} of positions (full context: {_pct(row['full_sure'])}), agrees "
                   f"with the full-context argmax at {_pct(row['short_precision_vs_full'])} of those, and is as sure "
                   f"(with the same token) at {_pct(row['full_sure_recalled'])} of the full-context sure "
                   f"positions, although its argmax is the same at {_pct(row['full_sure_same_argmax'])} of them: "
                   + ("the sentence carries most of the signal." if enough else
                      "the sentence alone does not make the model sure; a suffix classifier needs more "
                      "context (or the big model's hidden state) to skip safely."))
    return out


def report(records: str | Path, out: str | Path | None = None, model: str | None = None, splits=None,
           thresholds=THRESHOLDS, k: int = 16, n_sample: int = 1000, seed: int = 0, command: str = "") -> dict:
    t0 = time.time()
    rec = open_records(records)
    model = model or rec.models[0]
    if model not in rec.models:
        raise RecordsError(f"{records}: no model {model!r} recorded (models: {', '.join(rec.models)})")
    splits = list(splits or rec.splits)
    out = Path(check_output_dir(out if out else Path(records).resolve().parent / "report", "--out"))
    out.mkdir(parents=True, exist_ok=True)
    entry = next(m for m in rec.meta["models"] if m["name"] == model)
    lm = load(model, entry["dtype"])
    if lm.info.fingerprint != rec.fingerprint:
        raise TokenizerMismatch(f"{model} now has tokenizer {lm.info.fingerprint}, records were made with "
                                f"{rec.fingerprint}")
    a = load_positions(rec, model, splits)
    if len(a["token"]) == 0:
        raise RecordsError(f"{records}: no positions in splits {', '.join(splits)}")
    classes = token_class_from_tokenizer(lm.tokenizer, a["argmax"], prev_ids=a["token"])
    s = None
    if n_sample > 0:
        idx, weight = sample_positions(a, k, n_sample, min(thresholds), seed)
        s = {"index": idx, "weight": weight, "sure_at": min(thresholds), **short_context(lm, a, idx, k)}
    mid = thresholds[len(thresholds) // 2]
    r = {"records": str(records), "model": model, "splits": splits, "positions": int(len(a["token"])),
         "context": rec.meta["context"], "stride": rec.meta["stride"],
         "min_context": rec.meta["context"] - rec.meta["stride"], "thresholds": list(thresholds),
         "accuracy": float((a["argmax"] == a["target"]).mean()),
         "p_max_quantiles": {q: float(np.quantile(a["p_max"], q)) for q in (0.1, 0.25, 0.5, 0.75, 0.9)},
         "sure": sure_table(a, thresholds), "classes": class_tables(classes, a, thresholds),
         "top_threshold": mid, "top_tokens": top_tokens(lm.tokenizer, a, classes, mid),
         "short_context": k, "seed": seed, "short": short_table(a, s, thresholds) if s else None,
         "command": command or f"python train.py report --records {records}"}
    r["answers"] = answers(r)
    r["plots"] = plots(out, a, classes, s, k, thresholds, f"{model}: max probability of the next token")
    r["seconds"] = time.time() - t0
    (out / "report.json").write_text(json.dumps(r, indent=1, ensure_ascii=False) + "\n")
    (out / "report.md").write_text(markdown(r), encoding="utf-8")
    return r


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="train.py report", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--records", required=True, help="records folder (train.py record)")
    ap.add_argument("--out", help="output folder; default: report/ beside the records folder")
    ap.add_argument("--model", help="recorded model to report on; default: the first one")
    ap.add_argument("--splits", nargs="+", help="default: all recorded splits, combined")
    ap.add_argument("--thresholds", nargs="+", type=float, default=list(THRESHOLDS))
    ap.add_argument("--short-context", type=int, default=16, help="tokens of context for the short-context run")
    ap.add_argument("--short-sample", type=int, default=1000,
                    help="positions re-run with the short context, half of them sure ones (0: skip)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        r = report(args.records, args.out, args.model, args.splits, tuple(sorted(args.thresholds)),
                   args.short_context, args.short_sample, args.seed,
                   command="python train.py report " + " ".join(argv if argv is not None else sys.argv[1:]))
    except (ProjectError, KeyError) as e:
        print(f"train.py report: error: {one_line(e)}", file=sys.stderr)
        return 2
    print("\n".join(r["answers"]))
    return 0
