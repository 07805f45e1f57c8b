#!/usr/bin/env python
"""Does a drafter fitted on transformers records keep its precision on llama.cpp's hidden states?

    python bench/llamacpp_features.py [--records runs/heads/selfgen_records] [--heads runs/heads/gate]
                                      [--runs 40] [--out bench/results/llamacpp_features]

(The feature head, EAGLE-3's layout, is evaluated on records made by llama.cpp itself: bench/eagle.py.)

The drafters are fitted on records made by transformers (float32, the GGUF's weights de-quantized); llama.cpp
runs the same GGUF with its quantized kernels, so its last-layer states differ a little. This re-computes the
big model's last-layer hidden state of every position of the first --runs runs of the records' test split on
the llama.cpp backend, swaps them in for the recorded ones, and scores both drafters on the same (t, s) pairs
with each set of states: how close the states are (cosine, relative L2), how often the drafter's pick is the
same, and its precision and coverage at its calibrated threshold (the Learn-then-Test promise) with each.
Writes OUT.json and OUT.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

from common.files import write_json, write_text  # noqa: E402
from gate.model.heads import context_copy_stats  # noqa: E402
from gate.train.data import apply_scoring, predict_pairs  # noqa: E402
from gate.train.evaluate import open_inputs  # noqa: E402
from runtimes.llamacpp import LlamaCppBackend  # noqa: E402
from runtimes.sources import packaged_gguf  # noqa: E402


def llamacpp_hidden(te, rows: np.ndarray, model: str, threads: int) -> np.ndarray:
    """The llama.cpp backend's last-layer state at every row of `rows` (whole runs), run by run."""
    big = LlamaCppBackend(str(packaged_gguf(model)[0]), name=model, n_ctx=4096, n_threads=threads)
    big.hidden_layer, big.hidden_all = big.n_layers, True
    out = np.zeros((len(rows), te.hidden.shape[1]), dtype=np.float32)
    try:
        starts = np.flatnonzero(te.run_start[rows] == rows)
        for a, b in zip(starts, np.r_[starts[1:], len(rows)]):
            big.reset()
            _, h = big.forward(te.tokens[rows[a:b]].tolist())
            out[a:b] = h.numpy()
    finally:
        big.close()
    return out


def heads_pairs(inp, t, s) -> dict:
    """The heads drafter on pairs (t, s): its pick's token, score and whether it is right."""
    dr = inp.dr
    o = predict_pairs(dr.predictor, inp.te, t, s, gates={dr.primary: dr.gates[dr.primary]}, desc="heads",
                      copy=context_copy_stats(inp.te.tokens, inp.te.run_start))
    sel = apply_scoring(o, inp.te, dr.scoring_by_gate, dr.predictor.tables)["sel"][dr.primary]
    return {"token": sel["token"], "score": sel["score"], "correct": sel["correct"]}


def pairs_of(te, depth: int) -> tuple[np.ndarray, np.ndarray]:
    """(t, s): drafting s = 1..depth steps from the big model's position t - s, inside one run."""
    t = np.arange(len(te))
    ok = [t - s >= te.run_start for s in range(1, depth + 1)]
    return (np.concatenate([t[m] for m in ok]),
            np.concatenate([np.full(int(m.sum()), s) for s, m in enumerate(ok, 1)]))


def pick_stats(pick_hf: dict, pick_lc: dict, threshold: float) -> dict:
    def at(p):
        m = p["score"] >= threshold
        return {"coverage": float(m.mean()), "precision": float(p["correct"][m].mean()) if m.any() else None,
                "accuracy": float(p["correct"].mean())}
    return {"same_token": float((pick_hf["token"] == pick_lc["token"]).mean()),
            "score_mean_abs_diff": float(np.abs(pick_hf["score"] - pick_lc["score"]).mean()),
            "transformers": at(pick_hf), "llama.cpp": at(pick_lc), "threshold": float(threshold)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", default="runs/heads/selfgen_records")
    ap.add_argument("--heads", default="runs/heads/gate")
    ap.add_argument("--runs", type=int, default=40, help="test-split runs to re-compute on llama.cpp")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench/results/llamacpp_features")
    args = ap.parse_args(argv)

    inp = open_inputs(args.records, args.heads, "test")
    full = inp.te
    starts = np.flatnonzero(full.run_start == np.arange(len(full)))[:args.runs]
    end = starts[-1] + np.argmax(np.r_[full.run_start[starts[-1]:] != starts[-1], True])
    rows = np.arange(int(end))
    te_hf = dataclasses.replace(full, tokens=full.tokens[rows], argmax=full.argmax[rows], target=full.target[rows],
                                book=full.book[rows], pos=full.pos[rows], hidden=np.asarray(full.hidden[rows]),
                                run_start=full.run_start[rows], rows=rows)
    h_lc = llamacpp_hidden(te_hf, rows, inp.name, args.threads)
    te_lc = dataclasses.replace(te_hf, hidden=h_lc.astype(np.float16))
    a, b = np.asarray(te_hf.hidden, np.float32), h_lc
    states = {"positions": int(len(rows)),
              "cosine_mean": float(((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))).mean()),
              "relative_l2_mean": float((np.linalg.norm(a - b, axis=1) / np.linalg.norm(a, axis=1)).mean())}
    t, s = pairs_of(te_hf, 3)
    h_hf = heads_pairs(dataclasses.replace(inp, te=te_hf), t, s)
    h_lc2 = heads_pairs(dataclasses.replace(inp, te=te_lc), t, s)
    res = {"states": states, "pairs": int(len(t)), "heads": pick_stats(h_hf, h_lc2, inp.dr.threshold)}
    cmd = "python bench/llamacpp_features.py " + " ".join(shlex.quote(x) for x in (argv or sys.argv[1:]))
    write_json(Path(args.out + ".json"), {"command": cmd, **res})
    write_text(Path(args.out + ".md"), markdown(res, cmd, args))
    print(Path(args.out + ".md").read_text())
    return 0


def markdown(res: dict, cmd: str, args) -> str:
    pct = lambda x: "-" if x is None else f"{100 * x:.1f}%"
    st = res["states"]
    lines = ["# Drafters fitted on transformers records, fed llama.cpp's hidden states", "", f"`{cmd}`", "",
             f"{st['positions']:,} positions of `{args.records}` (test split), {res['pairs']:,} (position, "
             f"since_big) pairs. Last-layer states, llama.cpp vs transformers: mean cosine {st['cosine_mean']:.4f}, "
             f"mean relative L2 difference {st['relative_l2_mean']:.3f}.", "",
             "| drafter | same pick | mean score difference | calibrated threshold | transformers states: coverage / "
             "precision / accuracy | llama.cpp states: coverage / precision / accuracy |", "|---|---|---|---|---|---|"]
    for name in ("heads",):
        r = res[name]
        cell = lambda d: f"{pct(d['coverage'])} / {pct(d['precision'])} / {pct(d['accuracy'])}"
        lines.append(f"| {name} | {pct(r['same_token'])} | {r['score_mean_abs_diff']:.4f} | {r['threshold']:.4g} | "
                     f"{cell(r['transformers'])} | {cell(r['llama.cpp'])} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
