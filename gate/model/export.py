"""The feature head (gate/model/eagle.py) as a Hugging Face EAGLE-3 draft: the tensors and config.json that vLLM
(`Eagle3LlamaForCausalLM`), SGLang (`LlamaForCausalLMEagle3`) and llama.cpp's converter read. Pure mapping, no I/O:
`train.py export` (gate/train/export.py) writes the folder and converts it.

    check_exportable(head, n_layers)               # ExportError: what an engine could not run, named
    tensors = eagle3_tensors(head, torch.float32)  # model.safetensors
    config = eagle3_config(head, target_config)    # config.json (target_config: the target's own config.json)

The mapping (FeatureHead -> EAGLE-3 names): fc.weight * feat_scale (the scale folded into fc's columns) -> fc.weight;
input_norm -> midlayer.input_layernorm (on the token embedding); hidden_norm -> midlayer.hidden_norm (on g);
qkv's rows q | k | v -> midlayer.self_attn.{q,k,v}_proj (input: embedding first, then g, as the engines
concatenate); o -> o_proj; post_norm -> midlayer.post_attention_layernorm; up's rows gate | up ->
midlayer.mlp.{gate,up}_proj; down -> down_proj; norm -> norm; lm_head [n_draft, H] -> lm_head; draft_ids ->
d2t (int64, target id = i + d2t[i]) and t2d (bool [V]). No embed_tokens: every engine takes the target's (vLLM and
SGLang share it, llama.cpp's eagle3 graph reads the target context's tok_embd when the draft has none).

Layer numbering. The head's `layers` are Hugging Face hidden_states indices: layer l = the input of block l. vLLM
and llama.cpp read `eagle_aux_hidden_state_layer_ids` in that numbering (vLLM collects hidden_states + residual
before block l; llama.cpp calls llama_set_embeddings_layer_inp(l)). SGLang reads `eagle_config`'s list and adds
one (its ids name the block whose output is taken), so the same layers go there as l - 1. A layer equal to the
target's block count (the post-norm last state) has no EAGLE-3 hook in vLLM or SGLang: refused.
"""
from __future__ import annotations

from typing import Sequence

import torch

from common.errors import ProjectError
from gate.model.eagle import FeatureHead

EAGLE3_ARCH = "LlamaForCausalLMEagle3"    # SGLang's class name; vLLM and llama.cpp's converter map it too
# Hugging Face model_type -> the GGUF architecture llama.cpp's converter gives it, for the targets whose graph in
# the pinned llama.cpp marks every block's input (src/models/<arch>.cpp sets res->t_layer_inp[il]): llama.cpp's
# draft-eagle3 (common/speculative.cpp) calls llama_set_embeddings_layer_inp on its target, which aborts the
# process on any other graph. The same architectures runtimes/llamacpp.py's LAYER_INP_ARCHS lists.
LLAMACPP_EAGLE3_TARGETS = {"llama": "llama", "mistral": "llama", "qwen3": "qwen3", "qwen3_moe": "qwen3moe"}


class ExportError(ValueError, ProjectError):
    """A drafter, target or option an EAGLE-3 export cannot honour; the message says which and why."""


def check_exportable(head: FeatureHead, n_layers: int | None = None) -> None:
    """Refuse a head the engines could not run as EAGLE-3: not three target layers, a layer the engines cannot
    hook (the post-norm last state, or beyond the target), a draft vocabulary that is not a set of target ids."""
    if not isinstance(head, FeatureHead):
        raise ExportError(f"not a feature head ({type(head).__name__})")
    layers = list(head.layers)
    if len(layers) != 3:
        raise ExportError(f"the feature head reads {len(layers)} layer(s) {layers}; EAGLE-3 fuses exactly three "
                          "(train.py fit --drafter eagle --eagle-layers with three layers)")
    if n_layers is not None:
        bad = [x for x in layers if not 0 <= x < n_layers]
        if bad:
            raise ExportError(f"the feature head reads layer(s) {bad} of a target with {n_layers} blocks; EAGLE-3 "
                              f"engines hand a draft the inputs of blocks 0..{n_layers - 1} (layer {n_layers}, the "
                              "final-norm output, has no hook in vLLM or SGLang); retrain with inner layers")
    ids = head.draft_ids
    if ids.numel() == 0 or bool((ids[1:] <= ids[:-1]).any()) or int(ids.min()) < 0 or \
            int(ids.max()) >= head.vocab_size:
        raise ExportError("the feature head's draft vocabulary is not a sorted set of distinct target ids "
                          f"in 0..{head.vocab_size - 1}")


def d2t_t2d(draft_ids: torch.Tensor, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """EAGLE-3's vocabulary maps: d2t int64 [n_draft] (target id = i + d2t[i]), t2d bool [vocab_size]."""
    ids = draft_ids.long()
    t2d = torch.zeros(vocab_size, dtype=torch.bool)
    t2d[ids] = True
    return ids - torch.arange(len(ids)), t2d


def eagle3_tensors(head: FeatureHead, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """model.safetensors of the EAGLE-3 draft (names as in the module docstring); float weights in `dtype`."""
    check_exportable(head)
    nq, nkv, m = head.n_heads * head.head_dim, head.n_kv_heads * head.head_dim, head.mlp
    with torch.no_grad():
        w = lambda mod: mod.weight.detach().float()
        q, k, v = w(head.qkv).split([nq, nkv, nkv], 0)
        gate, up = w(head.up).split([m, m], 0)
        out = {
            "fc.weight": w(head.fc) * head.feat_scale.float()[None, :],
            "midlayer.input_layernorm.weight": w(head.input_norm),
            "midlayer.hidden_norm.weight": w(head.hidden_norm),
            "midlayer.self_attn.q_proj.weight": q, "midlayer.self_attn.k_proj.weight": k,
            "midlayer.self_attn.v_proj.weight": v, "midlayer.self_attn.o_proj.weight": w(head.o),
            "midlayer.post_attention_layernorm.weight": w(head.post_norm),
            "midlayer.mlp.gate_proj.weight": gate, "midlayer.mlp.up_proj.weight": up,
            "midlayer.mlp.down_proj.weight": w(head.down),
            "norm.weight": w(head.norm),
            "lm_head.weight": w(head.lm_head),
        }
        out = {name: t.to(dtype).contiguous() for name, t in out.items()}
    out["d2t"], out["t2d"] = d2t_t2d(head.draft_ids, head.vocab_size)
    return out


def sglang_layer_ids(layers: Sequence[int]) -> list[int]:
    """SGLang's numbering of the same layers (it captures the input of block id + 1)."""
    return [int(x) - 1 for x in layers]


def eagle3_config(head: FeatureHead, target: dict, dtype: str = "float32", extra: dict | None = None) -> dict:
    """config.json of the EAGLE-3 draft. `target`: the target's config.json (its text_config merged in), which
    gives the context length and the bos/eos ids; ExportError where it disagrees with the head."""
    check_exportable(head)
    t = {**target, **target.get("text_config", {})}
    for key, mine in (("hidden_size", head.hidden_size), ("vocab_size", head.vocab_size)):
        if key in t and int(t[key]) != mine:
            raise ExportError(f"the target has {key} {t[key]} but the feature head was trained for {mine}")
    layers = [int(x) for x in head.layers]
    cfg = {
        "architectures": [EAGLE3_ARCH],
        "model_type": "llama",
        "hidden_size": head.hidden_size,
        "intermediate_size": head.mlp,
        "num_attention_heads": head.n_heads,
        "num_key_value_heads": head.n_kv_heads,
        "head_dim": head.head_dim,
        "num_hidden_layers": 1,
        "hidden_act": "silu",
        "rms_norm_eps": head.eps,
        "rope_theta": head.rope_theta,
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": head.rope_theta},
        "max_position_embeddings": int(t.get("max_position_embeddings") or 2048),
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "vocab_size": head.vocab_size,
        "draft_vocab_size": head.n_draft,
        "target_hidden_size": head.hidden_size,
        "eagle_aux_hidden_state_layer_ids": layers,        # vLLM, llama.cpp: inputs of these blocks
        "eagle_config": {"eagle_aux_hidden_state_layer_ids": sglang_layer_ids(layers),   # SGLang adds one
                         "use_aux_hidden_state": True},
        "norm_before_residual": False,
        "torch_dtype": dtype,
        "bos_token_id": t.get("bos_token_id"),
        "eos_token_id": t.get("eos_token_id"),
    }
    if extra:
        cfg["skipgate"] = extra
    return cfg


__all__ = ["EAGLE3_ARCH", "LLAMACPP_EAGLE3_TARGETS", "ExportError", "check_exportable", "d2t_t2d",
           "eagle3_tensors", "eagle3_config", "sglang_layer_ids"]
