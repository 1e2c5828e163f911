"""The Llama family (`model.name: llama`, the default): ModelArgs (args.py), its blocks
(layers.py) and Transformer (transformer.py), exported as Hugging Face's LlamaForCausalLM.

Our layers already use Hugging Face's rotate-half RoPE layout, so exporting is a renaming only:
no tensor is permuted, split or fused."""

from __future__ import annotations

from pretrain.models.args import ModelArgs, block_activation_bytes, check_args, count_params, flops_per_token
from pretrain.models.spec import HFAdapter, ModelSpec
from pretrain.models.transformer import Transformer

# (ours, Hugging Face's) per transformer block, then the rest.
_LAYER_NAMES = (
    ("attention.wq.weight", "self_attn.q_proj.weight"),
    ("attention.wk.weight", "self_attn.k_proj.weight"),
    ("attention.wv.weight", "self_attn.v_proj.weight"),
    ("attention.wo.weight", "self_attn.o_proj.weight"),
    # SwiGLU w2(silu(w1 x) * w3 x) is down(silu(gate x) * up x) in Hugging Face's naming.
    ("feed_forward.w1.weight", "mlp.gate_proj.weight"),
    ("feed_forward.w2.weight", "mlp.down_proj.weight"),
    ("feed_forward.w3.weight", "mlp.up_proj.weight"),
    ("attention_norm.weight", "input_layernorm.weight"),
    ("ffn_norm.weight", "post_attention_layernorm.weight"),
)
_TOP_NAMES = (
    ("tok_embeddings.weight", "model.embed_tokens.weight"),
    ("norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
)


def hf_config(args: ModelArgs) -> dict:
    """config.json keys of LlamaForCausalLM for our model's shape."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": args.vocab_size,
        "hidden_size": args.d_model,
        "intermediate_size": args.ffn_hidden,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "head_dim": args.head_dim,
        "max_position_embeddings": args.max_seq_len,
        "hidden_act": "silu",
        "rms_norm_eps": args.norm_eps,
        # transformers 4.x reads rope_theta, 5.x rope_parameters; written both ways so neither
        # silently falls back to its default base.
        "rope_theta": args.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": args.rope_theta},
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": args.tie_embeddings,
        "initializer_range": args.init_std,
    }


LLAMA = ModelSpec(
    name="llama",
    args_class=ModelArgs,
    build=Transformer,
    count_params=count_params,
    flops_per_token=flops_per_token,
    block_activation_bytes=block_activation_bytes,
    check=check_args,
    hf=HFAdapter(
        architecture="LlamaForCausalLM",
        model_type="llama",
        names=_TOP_NAMES + tuple((f"layers.{{i}}.{ours}", f"model.layers.{{i}}.{hf}") for ours, hf in _LAYER_NAMES),
        config=hf_config,
    ),
    # max_seq_len only extends the rotary tables; the init keys act only at initialisation.
    free_on_resume=("max_seq_len", "init_std", "init_scaled_residual"),
)
