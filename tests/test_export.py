"""train.py export --format eagle3 (issue 28): the feature head as the Hugging Face EAGLE-3 draft folder.

The mapping is checked against an independent reference: EAGLE-3's draft step written from the exported files
alone, in plain torch, as vLLM's llama_eagle3.py computes it (fc on the three concatenated target states;
input_layernorm on the token embedding, hidden_norm on g, q/k/v over [embedding, g]; residual g; post-attention
norm, SiLU MLP, residual; norm; lm_head over the draft vocabulary; d2t back to target ids) must give the feature
head's logits, for true entries and for chain steps that feed the pre-norm output back. The CLI refuses what no
engine could run with one error line. llama.cpp's own conversion and speculative decoding: test_export_llamacpp.py.
"""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from gate.model.eagle import ChainCache, FeatureHead
from gate.model.export import (
    ExportError,
    check_exportable,
    d2t_t2d,
    eagle3_config,
    eagle3_tensors,
    sglang_layer_ids,
)
from helpers import (
    assert_one_error_line,
    call_main,
    make_tiny_llama,
    make_tiny_tokenizer,
    save_model,
    split_records,
)


# ------------------------------------------------------------------------------ the reference (vLLM's equations)
def rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rope(x, pos: int, theta: float):
    """x [heads, hd] rotated to position pos, Hugging Face LLaMA's rotate_half layout."""
    hd = x.shape[-1]
    ang = pos / theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    cos, sin = torch.cat([ang, ang]).cos(), torch.cat([ang, ang]).sin()
    rot = torch.cat([-x[..., hd // 2:], x[..., :hd // 2]], -1)
    return (x.double() * cos + rot.double() * sin).float()


class Eagle3Reference:
    """One EAGLE-3 draft sequence from an exported folder: step(g, token, pos) appends an entry (its own KV cache,
    causal) and returns (pre-norm output, logits over the target vocabulary, -inf outside the draft vocabulary)."""

    def __init__(self, folder, embed):
        self.w = load_file(str(folder / "model.safetensors"))
        self.cfg = json.loads((folder / "config.json").read_text())
        self.embed, self.keys, self.values = embed, [], []

    def fuse(self, h3):
        return h3 @ self.w["fc.weight"].float().T

    def step(self, g, token: int, pos: int):
        w, c, L = self.w, self.cfg, "midlayer."
        W = {k: v.float() for k, v in w.items() if v.is_floating_point()}
        H, KV, hd, eps = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"], c["rms_norm_eps"]
        x = torch.cat([rms(self.embed[token], W[L + "input_layernorm.weight"], eps),
                       rms(g, W[L + "hidden_norm.weight"], eps)])
        q = rope((x @ W[L + "self_attn.q_proj.weight"].T).view(H, hd), pos, c["rope_theta"])
        self.keys.append(rope((x @ W[L + "self_attn.k_proj.weight"].T).view(KV, hd), pos, c["rope_theta"]))
        self.values.append((x @ W[L + "self_attn.v_proj.weight"].T).view(KV, hd))
        K = torch.stack(self.keys).repeat_interleave(H // KV, 1)          # [T, H, hd]
        V = torch.stack(self.values).repeat_interleave(H // KV, 1)
        att = torch.softmax(torch.einsum("hd,thd->ht", q, K) / hd ** 0.5, -1)
        r = torch.einsum("ht,thd->hd", att, V).flatten() @ W[L + "self_attn.o_proj.weight"].T + g
        m = rms(r, W[L + "post_attention_layernorm.weight"], eps)
        pre = (torch.nn.functional.silu(m @ W[L + "mlp.gate_proj.weight"].T) * (m @ W[L + "mlp.up_proj.weight"].T)) \
            @ W[L + "mlp.down_proj.weight"].T + r
        draft = rms(pre, W["norm.weight"], eps) @ W["lm_head.weight"].T
        full = torch.full((c["vocab_size"],), -torch.inf)
        full[torch.arange(c["draft_vocab_size"]) + w["d2t"]] = draft
        return pre, full


# ------------------------------------------------------------------------------------------ tiny heads, folders
TARGET = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 16, "vocab_size": 50,
          "num_hidden_layers": 4, "max_position_embeddings": 256, "bos_token_id": 1, "eos_token_id": 2}


def random_head(seed=0, V=50, D=16, K=20, layers=(1, 2, 3)):
    g = torch.Generator().manual_seed(seed)
    head = FeatureHead(V, D, K, layers=layers, n_heads=2, n_kv_heads=1, mlp=24, rope_theta=500.0, eps=1e-5)
    head.embed.normal_(generator=g)
    head.draft_ids.copy_(torch.randperm(V, generator=g)[:K].sort().values)   # not 0..K-1: d2t has work to do
    head.feat_scale.uniform_(0.5, 2.0, generator=g)
    for p in head.parameters():
        with torch.no_grad():
            p.normal_(0, 0.3, generator=g)
    return head.eval()


def write_folder(head, path, dtype=torch.float32):
    path.mkdir()
    save_file(eagle3_tensors(head, dtype), str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(eagle3_config(head, TARGET)))
    return path


def full_logits(head, draft_logits):
    out = torch.full((head.vocab_size,), -torch.inf)
    out[head.draft_ids] = draft_logits
    return out


def close(a, b):
    return bool((a.isinf() == b.isinf()).all()) and torch.allclose(a[~a.isinf()], b[~b.isinf()], atol=1e-4)


def test_reference_from_the_exported_files_gives_the_heads_logits(tmp_path):
    """True entries (every position of a text) and chain steps (the pre-norm output fed back with the drafted
    token): the plain-torch EAGLE-3 step over the exported tensors equals FeatureHead / ChainCache."""
    head = random_head()
    folder = write_folder(head, tmp_path / "out")
    g = torch.Generator().manual_seed(1)
    L = 9
    h = torch.randn(L, 3 * head.hidden_size, generator=g) * 3
    toks = torch.randint(0, head.vocab_size, (L + 1,), generator=g).tolist()
    with torch.no_grad():
        want = head.logits(head(h[None], torch.tensor(toks[1:])[None], depth=1)[0][0])
    ref = Eagle3Reference(folder, head.embed)
    assert torch.allclose(ref.fuse(h), head.fuse(h), atol=1e-4)            # feat_scale folded into fc
    pres = []
    for j in range(L):
        pre, got = ref.step(ref.fuse(h[j]), toks[j + 1], j)
        pres.append(pre)
        assert close(got, full_logits(head, want[j])), j
    # chain: true entries 0..n-1, then three steps each fed the previous pre-norm output and the drafted token
    n = 5
    ref = Eagle3Reference(folder, head.embed)
    for j in range(n):
        pre, logits = ref.step(ref.fuse(h[j]), toks[j + 1], j)
    ids, cache = toks[:n + 1], ChainCache(head)
    for depth in range(3):
        mine = full_logits(head, cache.draft(ids, h[:n]))
        assert close(logits, mine), depth
        drafted = int(logits.argmax())
        assert head.draft_ids.tolist().count(drafted) == 1                # a target id inside the draft vocabulary
        ids = ids + [drafted]
        pre, logits = ref.step(pre, drafted, len(ids) - 2)


def test_tensor_names_shapes_and_vocabulary_maps(tmp_path):
    head = random_head(2)
    t = eagle3_tensors(head, torch.bfloat16)
    D, hd, m = head.hidden_size, head.head_dim, head.mlp
    shapes = {"fc.weight": (D, 3 * D), "midlayer.self_attn.q_proj.weight": (head.n_heads * hd, 2 * D),
              "midlayer.self_attn.k_proj.weight": (head.n_kv_heads * hd, 2 * D),
              "midlayer.self_attn.v_proj.weight": (head.n_kv_heads * hd, 2 * D),
              "midlayer.self_attn.o_proj.weight": (D, head.n_heads * hd), "midlayer.mlp.gate_proj.weight": (m, D),
              "midlayer.mlp.up_proj.weight": (m, D), "midlayer.mlp.down_proj.weight": (D, m),
              "lm_head.weight": (head.n_draft, D), "norm.weight": (D,), "midlayer.hidden_norm.weight": (D,),
              "midlayer.input_layernorm.weight": (D,), "midlayer.post_attention_layernorm.weight": (D,),
              "d2t": (head.n_draft,), "t2d": (head.vocab_size,)}
    assert {k: tuple(v.shape) for k, v in t.items()} == shapes
    assert "embed_tokens.weight" not in t                                   # the engines use the target's
    assert t["fc.weight"].dtype == torch.bfloat16 and t["d2t"].dtype == torch.int64 and t["t2d"].dtype == torch.bool
    assert (torch.arange(head.n_draft) + t["d2t"]).tolist() == head.draft_ids.tolist()
    assert t["t2d"].nonzero()[:, 0].tolist() == head.draft_ids.tolist()
    d2t, t2d = d2t_t2d(torch.tensor([0, 3, 7]), 9)
    assert d2t.tolist() == [0, 2, 5] and t2d.tolist() == [1, 0, 0, 1, 0, 0, 0, 1, 0]


def test_config_loads_with_autoconfig_and_names_the_layers_for_each_engine(tmp_path):
    from transformers import AutoConfig

    head = random_head(3)
    folder = write_folder(head, tmp_path / "out")
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLMEagle3"] and cfg["num_hidden_layers"] == 1
    assert cfg["eagle_aux_hidden_state_layer_ids"] == [1, 2, 3]              # vLLM, llama.cpp: block inputs
    assert cfg["eagle_config"] == {"eagle_aux_hidden_state_layer_ids": [0, 1, 2], "use_aux_hidden_state": True}
    assert cfg["tie_word_embeddings"] is False and cfg["bos_token_id"] == 1 and cfg["eos_token_id"] == 2
    auto = AutoConfig.from_pretrained(folder)
    assert type(auto).__name__ == "LlamaConfig"
    assert (auto.hidden_size, auto.intermediate_size, auto.num_attention_heads, auto.num_key_value_heads,
            auto.head_dim, auto.vocab_size, auto.max_position_embeddings) == (16, 24, 2, 1, 8, 50, 256)
    assert auto.draft_vocab_size == 20 and auto.target_hidden_size == 16 and auto.rms_norm_eps == 1e-5
    theta = getattr(auto, "rope_parameters", None) or {"rope_theta": auto.rope_theta}
    assert theta["rope_theta"] == 500.0
    assert sglang_layer_ids([2, 15, 27]) == [1, 14, 26]


def test_heads_no_engine_could_run_are_refused():
    with pytest.raises(ExportError, match="exactly three"):
        check_exportable(random_head(layers=(2,)))
    with pytest.raises(ExportError, match=r"layer\(s\) \[4\].*final-norm"):
        check_exportable(random_head(layers=(1, 2, 4)), n_layers=4)
    check_exportable(random_head(layers=(0, 2, 3)), n_layers=4)
    with pytest.raises(ExportError, match="hidden_size 32"):
        eagle3_config(random_head(), {**TARGET, "hidden_size": 32})
    head = random_head()
    head.draft_ids[3] = head.draft_ids[2]
    with pytest.raises(ExportError, match="draft vocabulary"):
        eagle3_tensors(head)


# ------------------------------------------------------------------------------------------------- the CLI
FIT = dict(drafter="eagle", eagle_layers="1,2,3", eagle_vocab=64, eagle_window=16, eagle_batch=8, eagle_depth=3,
           eagle_epochs=2.0, eagle_lr=3e-3, dtype="float32", threads=1)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, tiny_tokenizer):
    """(target folder, feature-head artifact) of a 4-block tiny LLaMA, the head reading blocks 1, 2 and 3."""
    from gate.train.fit import fit

    root = tmp_path_factory.mktemp("export")
    model_dir, _, records = split_records(root, make_tiny_llama(len(tiny_tokenizer), layers=4), tiny_tokenizer,
                                          ("1", "2", "3"))
    fit(records, root / "eagle", log=lambda m: None, **FIT)
    return model_dir, root / "eagle"


def export(*args):
    import train

    return call_main(train.main, ["export", *args])


def test_export_writes_the_folder_the_engines_read(fitted, tmp_path):
    from transformers import AutoConfig

    from gate.model.load import load_drafter

    _, gate = fitted
    rc, err = export("--gate", gate, "--format", "eagle3", "--out", tmp_path / "out", "--no-gguf")
    assert rc == 0, err[-2000:]
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]       # no temporary folder left
    head = load_drafter(gate, None).head
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["eagle_aux_hidden_state_layer_ids"] == [1, 2, 3] and cfg["vocab_size"] == 300
    assert cfg["draft_vocab_size"] == head.n_draft and cfg["skipgate"]["drafter_format"] == "skipgate-eagle/2"
    AutoConfig.from_pretrained(out)
    t = load_file(str(out / "model.safetensors"))
    assert torch.equal(t["fc.weight"], head.fc.weight.detach() * head.feat_scale[None, :])
    assert (torch.arange(head.n_draft) + t["d2t"]).tolist() == head.draft_ids.tolist()
    # --force replaces a folder that is not empty, whole
    (out / "stale.txt").write_text("x")
    rc, err = export("--gate", gate, "--out", out, "--no-gguf", "--force", "--dtype", "bfloat16")
    assert rc == 0, err[-2000:]
    assert not (out / "stale.txt").exists() and load_file(str(out / "model.safetensors"))["fc.weight"].dtype == \
        torch.bfloat16


def fake_artifact(path, fmt, keys):
    path.mkdir()
    meta = {"format": fmt, "big_model": {"name": "x", "fingerprint": "y"}, "max_skip": 2, "hidden_layer": 3,
            "files": {}, **{k: {} for k in keys}}
    (path / "drafter.json").write_text(json.dumps(meta))
    return path


def test_export_refuses_with_one_error_line(fitted, tmp_path):
    model_dir, gate = fitted
    start = "train.py export: error: "
    cases = [
        (["--gate", tmp_path / "none", "--out", tmp_path / "o"], "no such drafter folder"),
        (["--gate", fake_artifact(tmp_path / "h", "skipgate-drafter/1", ("predictor", "gates", "primary_gate")),
          "--out", tmp_path / "o"], "the heads drafter (train.py fit), not a feature head"),
        (["--gate", fake_artifact(tmp_path / "r", "skipgate-router/1", ("small_model", "gate", "features",
                                                                         "threshold")), "--out", tmp_path / "o"],
         "a router for a big/small pair (train.py fit --drafter router), not a feature head"),
        (["--gate", fake_artifact(tmp_path / "e1", "skipgate-eagle/1", ("head", "gate")), "--out", tmp_path / "o"],
         "before EAGLE-3's layout"),
        (["--gate", gate, "--out", gate, "--force"], "holds the drafter"),
        (["--gate", gate, "--out", gate.parent, "--force"], "holds the drafter"),
        (["--gate", gate, "--out", tmp_path / "o", "--format", "medusa"], "invalid choice: 'medusa'"),
        (["--gate", gate], "the following arguments are required: --out"),
    ]
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    cases.append((["--gate", gate, "--out", tmp_path / "full"], "exists and is not empty"))
    (tmp_path / "file").write_text("x")
    cases.append((["--gate", gate, "--out", tmp_path / "file"], "exists and is not a folder"))
    other = save_model(tmp_path / "other", make_tiny_llama(280, layers=4), make_tiny_tokenizer(280))
    cases.append((["--gate", gate, "--out", tmp_path / "o", "--target", other], "tokenizer"))
    qwen = tmp_path / "qwen"
    shutil.copytree(model_dir, qwen)
    cfg = json.loads((qwen / "config.json").read_text())
    (qwen / "config.json").write_text(json.dumps({**cfg, "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}))
    cases.append((["--gate", gate, "--out", tmp_path / "o", "--target", qwen], "--no-gguf writes the folder"))
    for argv, expected in cases:
        rc, err = export(*argv)
        prog = "usage:" in err and "train.py export: error: " or start
        assert_one_error_line(rc, err, expected, start=prog)
        assert not (tmp_path / "o").exists(), argv
    assert (tmp_path / "full" / "x").read_text() == "x" and (gate / "drafter.json").is_file()


# ------------------------------------------------------------------- llama.cpp's programs: lookup and parsing
FAKE_SPEC = r"""#!/bin/sh
echo "$@" > "$(dirname "$0")/args.txt"
printf '\n\nHello world\n\n\n'
cat >&2 <<'EOF'
0.00.1 I encoded    6 tokens in    0.009 seconds, speed:  672.118 t/s
0.00.2 D spec        draft:  - seq_id 0, draft candidate   0, pos   0:  25995 (   0.108) ' SY'
0.00.2 D spec        draft:  - seq_id 0, draft candidate   1, pos   0:   3950 (   0.105) ' Red'
0.00.2 D spec        draft:  - seq_id 0, draft candidate   0, pos   1:   4158 (   0.106) ' miles'
0.00.3 D accepted 1/2 draft tokens, the last target token is: (34725)
0.00.4 D spec        draft:  - seq_id 0, draft candidate   0, pos   0:     11 (   0.300) 'x'
0.00.5 D accepted 0/1 draft tokens, the last target token is: (12)
0.00.6 I decoded    5 tokens in    0.100 seconds, speed:   50.000 t/s
0.00.6 I n_draft   = 3
0.00.6 I n_predict = 5
0.00.6 I n_drafted = 3
0.00.6 I n_accept  = 1
0.00.6 I accept    = 33.333%
0.00.6 I spec common_specu: statistics     draft-eagle3: #calls(b,g,a) =    1      2      2, #acc tokens =     1
EOF
"""


def fake_tool(folder, name, script):
    folder.mkdir(exist_ok=True)
    (folder / name).write_text(script)
    (folder / name).chmod(0o755)


def test_speculative_runs_are_parsed_and_tools_found_where_the_env_says(tmp_path, monkeypatch):
    from runtimes.llama_tools import LlamaToolsError, find_tool, llama_cpp_source, require_tool, speculative_simple

    bin_dir = tmp_path / "bin"
    fake_tool(bin_dir, "llama-speculative-simple", FAKE_SPEC)
    monkeypatch.setenv("SKIPGATE_LLAMA_BIN", str(bin_dir))
    assert find_tool("llama-speculative-simple") == bin_dir / "llama-speculative-simple"
    r = speculative_simple("t.gguf", "Hello", 4, draft="d.gguf", threads=2, verbose=True)
    args = (bin_dir / "args.txt").read_text().split()
    assert " ".join(args[args.index("--spec-type"):][:2]) == "--spec-type draft-eagle3" and "-v" in args
    assert args[args.index("-md") + 1] == "d.gguf" and args[args.index("--temp") + 1] == "0"
    assert r["text"] == "Hello world" and (r["n_prompt"], r["n_predict"], r["n_drafted"], r["n_accept"]) == (6, 5, 3, 1)
    assert (r["target_passes"], r["tokens_per_pass"], r["accept_rate"]) == (4, 1.25, 0.3333)
    assert (r["decode_tokens"], r["decode_s"], r["decode_tokens_per_s"]) == (5, 0.1, 50.0)
    assert r["rounds"] == [{"drafts": [25995, 4158], "accepted": 1, "target": 34725},
                           {"drafts": [11], "accepted": 0, "target": 12}]
    assert r["stats"].startswith("draft-eagle3:")
    with pytest.raises(LlamaToolsError, match=r"llama-simple is not in SKIPGATE_LLAMA_BIN=.*make llama-tools"):
        require_tool("llama-simple")
    fake_tool(bin_dir, "llama-speculative-simple", "#!/bin/sh\necho 'main: error: bad draft model' >&2\nexit 1\n")
    with pytest.raises(LlamaToolsError, match="exit 1.*bad draft model"):
        speculative_simple("t.gguf", "Hello", 4)
    monkeypatch.setenv("SKIPGATE_LLAMA_SRC", str(tmp_path))
    with pytest.raises(LlamaToolsError, match="not a llama.cpp source folder"):
        llama_cpp_source()
