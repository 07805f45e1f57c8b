"""Heads: indexing helpers, baking, Medusa init, and overfitting tiny synthetic record sets."""
import numpy as np
import pytest
import torch

from gate.model import heads as H


pytestmark = pytest.mark.usefixtures("one_thread")


def test_run_starts_and_pairs():
    book = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1])
    pos = np.array([0, 1, 2, 5, 0, 1, 2, 3, 4])           # a gap in book 0 between pos 2 and 5
    rs = H.run_starts(book, pos)
    assert rs.tolist() == [0, 0, 0, 3, 4, 4, 4, 4, 4]
    t, s = H.pair_index(rs, np.arange(9), 2)
    pairs = set(zip(t.tolist(), s.tolist()))
    assert (1, 1) in pairs and (2, 2) in pairs and (3, 1) not in pairs and (5, 2) not in pairs
    assert all(tt - ss >= rs[tt] for tt, ss in pairs)
    assert len(pairs) == (2 + 1) + (4 + 3)                  # run [0..2]: 2 s=1, 1 s=2; run [4..8]: 4 + 3
    tokens = np.arange(100, 109)
    ctx = H.context_ids(tokens, rs, np.array([1, 5, 8]), 3, pad=-1)
    assert ctx.tolist() == [[-1, 100, 101], [-1, 104, 105], [106, 107, 108]]


def test_word_head_bake_is_exact():
    torch.manual_seed(0)
    V, D = 50, 16
    emb = torch.randn(V, D)
    head = H.WordHead(V, D, 11, n_ctx=4, d_tok=8, d_hid=8, width=32, max_s=3, embed=emb)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ctx = torch.tensor([[V, V, 3, 7], [1, 2, 3, 4]])
    hn, s = torch.randn(2, D), torch.tensor([1, 3])
    before = head(ctx, hn, s)
    head.bake()
    assert head.embed is None and head.table.shape == (V + 1, 8)
    assert torch.allclose(head(ctx, hn, s), before, atol=1e-5)
    # a fresh inference-form head loads the baked state
    again = H.WordHead(**head.config())
    again.load_state_dict(head.state_dict())
    assert torch.allclose(again(ctx, hn, s), before, atol=1e-5)
    assert head.flops_per_token() == 2 * ((4 * 8 + 16 + 8) * 32 + 32 * 32 + 32 * D + D * 11 + D * 8)


def test_future_heads_start_as_the_big_models_restricted_logits():
    """Medusa init: zero residual blocks + output rows copied from the big output embedding (folded with the
    hidden standardisation) give exactly the big model's logits on R."""
    torch.manual_seed(0)
    D, V = 12, 40
    W = torch.randn(V, D)
    h = torch.randn(5, D) * 3 + 1
    mean, std = h.mean(0), h.std(0) + 0.1
    norm = H.HiddenNorm(D, mean, std)
    rids = torch.tensor([3, 5, 7, 11])
    ow = W[rids]
    w0 = torch.zeros(5, D)
    b0 = torch.zeros(5)
    w0[:4], b0[:4] = ow * std[None], ow @ mean
    fh = H.FutureHeads(D, 5, 3, w0, b0)
    got = fh(norm(h), torch.tensor([1, 2, 3, 1, 2]))[:, :4]
    assert torch.allclose(got, h @ ow.T, atol=1e-4)


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
    return H.HeadData(tokens, argmax, hidden, rs), torch.from_numpy(E), V, D


def test_word_head_overfits_tiny_record_set():
    torch.manual_seed(0)
    data, E, V, D = _synthetic_records()
    rmap = torch.arange(V)                                  # R = all V tokens, "other" = V never used
    mean, std = H.HiddenNorm.stats(data.hidden)
    norm = H.HiddenNorm(D, mean, std)
    head = H.WordHead(V, D, V + 1, n_ctx=4, d_tok=16, d_hid=16, width=64, max_s=3, embed=E)
    rows = np.arange(len(data))
    losses = H.train_word_head(head, norm, data, rows, rmap, epochs=15, batch=128, lr=3e-3, soft_weight=0)
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
    H.train_future_heads(fh, norm, data, rows, rmap, epochs=30, batch=128, lr=5e-3, soft_weight=0)
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
    q = H.soft_targets(ids, p, rmap, 4)
    assert torch.allclose(q, torch.tensor([[0.4, 0.0, 0.1, 0.4]]) / 0.9)


def test_ngram_table_counts_backoff_and_masking():
    x = np.array([1, 2, 3, 1, 2, 3, 1, 2, 4, 5])
    t = H.NgramTable.build([x], 10, max_order=3, min_total=1)
    r = t.lookup(np.array([[9, 1, 2], [2, 3, 1], [99, 99, 5]]), pad=99)
    assert r["top2"].tolist() == [3, 2, -1] and r["p2"][0] == pytest.approx(2 / 3) and r["n2"][0] == 3
    assert r["top3"].tolist() == [-1, 2, -1]                 # (9, 1, 2) never seen; (2, 3, 1) -> 2 twice
    assert r["top1"][2] == -1                                # 5 is never followed by anything
    mask = np.zeros(10, dtype=bool)
    mask[8] = True                                           # do not count "1 2 -> 4"
    t2 = H.NgramTable.build([x], 10, 3, 1, masks=[mask])
    r2 = t2.lookup(np.array([[9, 1, 2]]), pad=99)
    assert r2["top2"][0] == 3 and r2["p2"][0] == 1.0 and r2["n2"][0] == 2
    again = H.NgramTable.from_tensors(t.tensors(), 10)
    assert again.lookup(np.array([[9, 1, 2]]), 99)["p2"][0] == pytest.approx(2 / 3)


def test_context_index_matches_records_statistics_and_resyncs():
    tokens = np.array([5, 6, 7, 5, 6, 8, 5, 6, 7, 5, 6])
    rs = np.zeros(len(tokens), dtype=np.int64)
    st = H.context_copy_stats(tokens, rs)
    # at the last position (...5, 6): "5 6" was followed by 7, 8, 7 -> top 7 with p 2/3 over 3
    assert (st["top2"][-1], st["p2"][-1], st["n2"][-1]) == (7, pytest.approx(2 / 3), 3)
    assert st["n1"][0] == 0 and st["top1"][0] == -1           # nothing seen yet at the first token
    idx = H.ContextIndex()
    for t in range(len(tokens)):
        idx.sync(list(tokens[:t + 1]))                         # grows one token at a time, like decoding
        tops, ps, tots = idx.query()
        assert [tops[n] for n in range(3)] == [st[f"top{n + 1}"][t] for n in range(3)]
        assert [tots[n] for n in range(3)] == [st[f"n{n + 1}"][t] for n in range(3)]
    idx.sync([5, 6, 7, 9])                                     # a different text: rebuilt, not extended
    assert idx.ids == [5, 6, 7, 9] and idx.query()[2] == [0, 0, 0]
    # a new run starts from scratch
    rs2 = np.r_[np.zeros(5, dtype=np.int64), np.full(6, 5)]
    st2 = H.context_copy_stats(tokens, rs2)
    assert st2["n1"][5] == 0
