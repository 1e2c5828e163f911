"""GPT-2 as Hugging Face's GPT2LMHeadModel: names, config.json, and which weights are transposed.

Hugging Face's GPT-2 keeps its projections in Conv1D modules, whose weight is (in, out): the
transpose of an nn.Linear's. The fused q/k/v projection splits its output as q, k, v in both."""

from __future__ import annotations

from pretrain.models.gpt2.args import GPT2Args
from pretrain.models.spec import HFAdapter

_LAYER_NAMES = (
    ("attention_norm.weight", "ln_1.weight"),
    ("attention_norm.bias", "ln_1.bias"),
    ("attention.wqkv.weight", "attn.c_attn.weight"),
    ("attention.wqkv.bias", "attn.c_attn.bias"),
    ("attention.wo.weight", "attn.c_proj.weight"),
    ("attention.wo.bias", "attn.c_proj.bias"),
    ("ffn_norm.weight", "ln_2.weight"),
    ("ffn_norm.bias", "ln_2.bias"),
    ("feed_forward.w1.weight", "mlp.c_fc.weight"),
    ("feed_forward.w1.bias", "mlp.c_fc.bias"),
    ("feed_forward.w2.weight", "mlp.c_proj.weight"),
    ("feed_forward.w2.bias", "mlp.c_proj.bias"),
)
_TOP_NAMES = (
    ("tok_embeddings.weight", "transformer.wte.weight"),
    ("pos_embeddings.weight", "transformer.wpe.weight"),
    ("norm.weight", "transformer.ln_f.weight"),
    ("norm.bias", "transformer.ln_f.bias"),
    ("output.weight", "lm_head.weight"),
)
_CONV1D = ("attention.wqkv.weight", "attention.wo.weight", "feed_forward.w1.weight", "feed_forward.w2.weight")


def hf_config(args: GPT2Args) -> dict:
    """config.json keys of GPT2LMHeadModel for our model's shape (no dropout: ours has none)."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": args.vocab_size,
        "n_positions": args.max_seq_len,
        "n_embd": args.d_model,
        "n_layer": args.n_layers,
        "n_head": args.n_heads,
        "n_inner": args.ffn_hidden,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": args.norm_eps,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "scale_attn_weights": True,
        "tie_word_embeddings": True,
        "initializer_range": args.init_std,
    }


GPT2_HF = HFAdapter(
    architecture="GPT2LMHeadModel",
    model_type="gpt2",
    names=_TOP_NAMES + tuple((f"layers.{{i}}.{ours}", f"transformer.h.{{i}}.{hf}") for ours, hf in _LAYER_NAMES),
    config=hf_config,
    transposed=frozenset(f"layers.{{i}}.{name}" for name in _CONV1D),
)
