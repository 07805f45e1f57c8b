"""Linear probes: how much of the next few tokens is linearly readable from each recorded layer's hidden state?

    res = run_probes(train, test, hidden, layers, offsets=4, K=512, method="ridge")   # read by train.py evaluate
    plot_probes(res, path)                                                            # probes.png

For every recorded layer and offset k = 1..4, a linear map from the standardised hidden state at t predicts the
big model's greedy token for t+k ("argmax") and the book's token at t+k ("text") over the K most frequent such
tokens plus "other"; test accuracy counts only exact hits, beside unigram and bigram baselines. Method "ridge"
(the default): closed-form ridge regression; "softmax" refines it by multinomial logistic regression.
Targets, baselines, methods and measured numbers: docs/training.md#linear-probes-gatetrainprobespy.
"""
from __future__ import annotations

import numpy as np
import torch

from gate.model.heads import run_starts


def _run_end(run_start: np.ndarray) -> np.ndarray:
    n = len(run_start)
    starts = np.unique(run_start)
    ends = np.append(starts[1:], n) - 1
    return ends[np.searchsorted(starts, run_start)]


def _top_classes(y: np.ndarray, K: int) -> np.ndarray:
    ids, cnt = np.unique(y, return_counts=True)
    order = np.lexsort((ids, -cnt))
    return np.sort(ids[order[:K]])


def run_probes(train: dict, test: dict, hidden, layers: list[int], offsets: int = 4, K: int = 512,
               n_train: int = 20000, n_test: int = 10000, seed: int = 0, method: str = "ridge", epochs: int = 6,
               log=print) -> dict:
    """train/test: dicts with "tokens", "target", "argmax", "book", "pos" arrays; hidden(which, layer, rows) ->
    float32 [len(rows), D] hidden states of split "train"/"test" (loaded per layer, only the rows needed)."""
    rng = np.random.default_rng(seed)
    res = {"layers": layers, "offsets": list(range(1, offsets + 1)), "K": K, "accuracy": {}, "baselines": {},
           "method": method}
    tr = _probe_rows(train, offsets, n_train, rng)
    te = _probe_rows(test, offsets, n_test, rng)
    if len(tr) < 10 or len(te) < 10:
        raise ValueError("too few positions with 4 recorded successors for probes")
    targets = _probe_targets(train, test, tr, te, offsets)
    tok_tr, tok_te = np.asarray(train["tokens"][tr], dtype=np.int64), np.asarray(test["tokens"][te], dtype=np.int64)
    for (kind, k), (ytr, yte) in targets.items():
        res["baselines"][f"{kind}/{k}"] = _baselines(ytr, yte, tok_tr, tok_te)
    cls = {key: _top_classes(ytr, K) for key, (ytr, _) in targets.items()}
    for key, (_, yte) in targets.items():       # the best any probe over these classes can do
        res["baselines"][f"{key[0]}/{key[1]}"]["ceiling"] = float(np.isin(yte, cls[key]).mean())
    for layer in layers:
        Xtr = torch.from_numpy(hidden("train", layer, tr)).double()
        Xte = torch.from_numpy(hidden("test", layer, te)).double()
        for key, acc in _probe_layer(Xtr, Xte, targets, cls, method, epochs, seed).items():
            res["accuracy"][f"{key[0]}/{key[1]}/{layer}"] = acc
        log(f"[probes] layer {layer}: " + ", ".join(
            f"{kind}+{k} {res['accuracy'][f'{kind}/{k}/{layer}']:.1%}" for kind, k in targets))
    res["n_train"], res["n_test"] = int(len(tr)), int(len(te))
    return res


def _probe_rows(d: dict, offsets: int, n_max: int, rng) -> np.ndarray:
    """Rows whose every offset 1..offsets is inside the recorded stretch (a seeded sample of n_max at most)."""
    rs = run_starts(d["book"], d["pos"])
    ok = np.arange(len(rs)) + offsets - 1 <= _run_end(rs)
    rows = np.flatnonzero(ok)
    if len(rows) > n_max:
        rows = np.sort(rng.choice(rows, n_max, replace=False))
    return rows


def _probe_targets(train: dict, test: dict, tr: np.ndarray, te: np.ndarray, offsets: int) -> dict:
    """(kind, k) -> (train labels, test labels): the big model's argmax or the text token at t+k."""
    targets = {}
    for kind in ("argmax", "text"):
        for k in range(1, offsets + 1):
            if kind == "argmax":
                ytr, yte = train["argmax"][tr + k - 1], test["argmax"][te + k - 1]
            else:
                ytr = _shifted_tokens(train, tr, k)
                yte = _shifted_tokens(test, te, k)
            targets[(kind, k)] = (np.asarray(ytr, dtype=np.int64), np.asarray(yte, dtype=np.int64))
    return targets


def _baselines(ytr, yte, tok_tr, tok_te) -> dict:
    """Test accuracy of the unigram (most frequent label) and bigram (most frequent label after the token at t)."""
    ids, cnt = np.unique(ytr, return_counts=True)
    uni = ids[np.argmax(cnt)]
    pair = tok_tr * (int(max(ytr.max(), tok_tr.max())) + 1) + ytr
    pid, pc = np.unique(pair, return_counts=True)
    base = int(max(ytr.max(), tok_tr.max())) + 1
    prev, nxt = pid // base, pid % base
    order = np.lexsort((-pc, prev))                        # by prev, most frequent first
    first = np.r_[True, prev[order][1:] != prev[order][:-1]]
    best = dict(zip(prev[order][first].tolist(), nxt[order][first].tolist()))
    pred_bi = np.array([best.get(int(x), uni) for x in tok_te])
    return {"unigram": float((yte == uni).mean()), "bigram": float((yte == pred_bi).mean())}


def _probe_layer(Xtr, Xte, targets: dict, cls: dict, method: str, epochs: int, seed: int) -> dict:
    """Test accuracy per target of the probes of one layer: one ridge solve for all targets (refined by softmax
    regression with method "softmax")."""
    mu, sd = Xtr.mean(0), Xtr.std(0) + 1e-3
    Xtr, Xte = (Xtr - mu) / sd, (Xte - mu) / sd
    Xtr = torch.cat([Xtr, torch.ones(len(Xtr), 1, dtype=torch.float64)], 1)
    Xte = torch.cat([Xte, torch.ones(len(Xte), 1, dtype=torch.float64)], 1)
    G = Xtr.T @ Xtr
    G += 1e-2 * len(Xtr) * torch.eye(G.shape[0], dtype=torch.float64)
    chol = torch.linalg.cholesky(G)
    keys = list(targets)
    Ys, W0 = [], []
    for key in keys:
        ytr = targets[key][0]
        c = cls[key]
        m = np.searchsorted(c, ytr)
        inr = (m < len(c)) & (c[np.clip(m, 0, len(c) - 1)] == ytr)
        Ys.append(np.where(inr, m, len(c)))
        Y = torch.zeros(len(ytr), len(c) + 1, dtype=torch.float64)
        Y[torch.arange(len(ytr)), torch.from_numpy(Ys[-1])] = 1.0
        W0.append(torch.cholesky_solve(Xtr.T @ Y, chol))
    Ws = _softmax_probes(Xtr.float(), Ys, [w.float() for w in W0], epochs, seed) if method == "softmax" else W0
    acc = {}
    for key, W in zip(keys, Ws):
        c = cls[key]
        pred = (Xte.to(W.dtype) @ W)[:, :len(c)].argmax(1).numpy()      # never predict "other"
        acc[key] = float((c[pred] == targets[key][1]).mean())
    return acc


def _softmax_probes(X: torch.Tensor, Ys: list, W0: list, epochs: int, seed: int) -> list:
    """Multinomial logistic regression for every target at once (one [D+1, sum(K+1)] matrix), started from the
    ridge solution, minibatch Adam; deterministic for a seed and thread count."""
    g = torch.Generator().manual_seed(seed)
    W = torch.nn.Parameter(torch.cat(W0, 1).clone())
    sizes = [w.shape[1] for w in W0]
    Y = torch.from_numpy(np.stack(Ys, 1))
    opt = torch.optim.Adam([W], lr=3e-3)
    n = len(X)
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for i in range(0, n, 1024):
            b = perm[i:i + 1024]
            logits = (X[b] @ W).split(sizes, 1)
            loss = sum(torch.nn.functional.cross_entropy(lg, Y[b, j]) for j, lg in enumerate(logits))
            opt.zero_grad()
            loss.backward()
            opt.step()
    return [w.detach() for w in W.detach().split(sizes, 1)]


def _shifted_tokens(d: dict, rows: np.ndarray, k: int) -> np.ndarray:
    """The text token at position t+k = target[t+k-1] (target is the token after t)."""
    return np.asarray(d["target"][rows + k - 1], dtype=np.int64)


def plot_probes(res: dict, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    layers, offs = res["layers"], res["offsets"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.45 * (len(layers) + 2) + 2.2), squeeze=False)
    for ax, kind in zip(axes[0], ("argmax", "text")):
        rows = [f"layer {l}" for l in layers] + ["bigram", "unigram"]
        M = np.array([[res["accuracy"][f"{kind}/{k}/{l}"] for k in offs] for l in layers]
                     + [[res["baselines"][f"{kind}/{k}"]["bigram"] for k in offs],
                        [res["baselines"][f"{kind}/{k}"]["unigram"] for k in offs]])
        im = ax.imshow(M, vmin=0, vmax=max(0.01, float(M.max())), cmap="viridis", aspect="auto")
        for i in range(M.shape[0]):
            for j in range(M.shape[1]):
                ax.text(j, i, f"{M[i, j]:.0%}", ha="center", va="center",
                        color="white" if M[i, j] < 0.6 * M.max() else "black", fontsize=8)
        ax.set_xticks(range(len(offs)), [f"t+{k}" for k in offs])
        ax.set_yticks(range(len(rows)), rows)
        ax.axhline(len(layers) - 0.5, color="white", lw=2)
        ax.set_title(f"{'big model argmax' if kind == 'argmax' else 'book text'} token at t+k")
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle(f"Linear probes from the hidden state at t (top {res['K']} tokens + other; test accuracy)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
