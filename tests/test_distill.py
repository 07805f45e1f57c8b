"""Training the heads (gate/train/distill.py): overfitting tiny synthetic record sets, distillation targets."""
import numpy as np
import pytest
import torch

from gate.model import heads as H
from gate.train import distill as T

pytestmark = pytest.mark.usefixtures("one_thread")


def _synthetic_records(n_books=3, length=400, V=30, D=24, seed=0):
    """A 'big model' whose argmax is a fixed function of the current token and whose hidden state encodes the
    next few tokens of a deterministic sequence, so both heads can reach ~100% on the training rows."""
    rng = np.random.default_rng(seed)
    succ = rng.permutation(V)                               # argmax[t] = succ[token[t]]
    toks, books, poss = [], [], []
    for b in range(n_books):
        x = [int(rng.integers(V))]
        for _ in range(length - 1):
            x.append(int(succ[x[-1]]) if rng.random() < 0.8 else int(rng.integers(V)))
        toks += x
        books += [b] * length
        poss += list(range(length))
    tokens = np.array(toks)
    argmax = succ[tokens]
    E = rng.normal(size=(V, D)).astype(np.float32)
    # hidden at t: embedding of argmax[t], argmax chain t+1 and t+2 (what the future heads must read)
    hidden = (E[argmax] + 0.5 * E[succ[argmax]] + 0.25 * E[succ[succ[argmax]]]).astype(np.float16)
    rs = H.run_starts(np.array(books), np.array(poss))
    return T.HeadData(tokens, argmax, hidden, rs), torch.from_numpy(E), V, D


def test_word_head_overfits_tiny_record_set():
    torch.manual_seed(0)
    data, E, V, D = _synthetic_records()
    rmap = torch.arange(V)                                  # R = all V tokens, "other" = V never used
    mean, std = H.HiddenNorm.stats(data.hidden)
    norm = H.HiddenNorm(D, mean, std)
    head = H.WordHead(V, D, V + 1, n_ctx=4, d_tok=16, d_hid=16, width=64, max_s=3, embed=E)
    rows = np.arange(len(data))
    losses = T.train_word_head(head, norm, data, rows, rmap, epochs=15, batch=128, lr=3e-3, soft_weight=0)
    assert losses[-1] < 0.2 * losses[0]
    head.bake()
    t, s = H.pair_index(data.run_start, rows, 3)
    ctx = torch.from_numpy(H.context_ids(data.tokens, data.run_start, t, 4, head.pad))
    hn = norm(torch.from_numpy(data.hidden[t - s].astype(np.float32)))
    with torch.no_grad():
        pred = head(ctx, hn, torch.from_numpy(s)).argmax(-1).numpy()
    assert (pred == data.argmax[t]).mean() > 0.97


def test_future_heads_overfit_tiny_record_set():
    torch.manual_seed(0)
    data, E, V, D = _synthetic_records()
    rmap = torch.arange(V)
    mean, std = H.HiddenNorm.stats(data.hidden)
    norm = H.HiddenNorm(D, mean, std)
    fh = H.FutureHeads(D, V + 1, 2)
    rows = np.arange(len(data))
    T.train_future_heads(fh, norm, data, rows, rmap, epochs=30, batch=128, lr=5e-3, soft_weight=0)
    t, s = H.pair_index(data.run_start, rows, 2)
    with torch.no_grad():
        pred = fh(norm(torch.from_numpy(data.hidden[t - s].astype(np.float32))), torch.from_numpy(s)).argmax(-1)
    acc = {j: float((pred.numpy() == data.argmax[t])[s == j].mean()) for j in (1, 2)}
    # argmax[p+1] = succ[token[p+1]] and token[p+1] = argmax[p] 80% of the time, so the ceiling is ~80%
    assert acc[1] > 0.72 and acc[2] > 0.55, acc


def test_soft_targets_map_topk_into_restricted_vocab():
    rmap = torch.tensor([0, 3, 1, 3, 2])                    # tokens 1 and 3 are outside R = {0, 2, 4}
    ids = torch.tensor([[0, 1, 3, 4]])
    p = torch.tensor([[0.4, 0.2, 0.2, 0.1]])
    q = T.soft_targets(ids, p, rmap, 4)
    assert torch.allclose(q, torch.tensor([[0.4, 0.0, 0.1, 0.4]]) / 0.9)
