"""Heads: indexing helpers, baking, Medusa init, the n-gram table and the in-context index."""
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


def test_context_index_after_rollbacks_equals_a_fresh_one():
    """The in-context statistics after texts drop and re-grow their tail equal those built from scratch."""
    import random

    rng = random.Random(1)
    text = [rng.randrange(4) for _ in range(50)]
    live = H.ContextIndex()
    for _ in range(200):
        text = text[:rng.randrange(len(text) + 1)] + [rng.randrange(4) for _ in range(rng.randrange(6))]
        live.sync(text)
        fresh = H.ContextIndex()
        fresh.sync(text)
        assert live.ids == text and live.query() == fresh.query() and live.tables == fresh.tables
