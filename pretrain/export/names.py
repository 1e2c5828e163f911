"""Parameter names: our model's own ("canonical"), the wrapped names training may save, and
Hugging Face Llama's.

Our layers already use Hugging Face's rotate-half RoPE layout, so converting a checkpoint is a
renaming only: no tensor is permuted, split or fused."""

from __future__ import annotations

import re

from pretrain.errors import PretrainError

# Wrappers that prefix parameter names: activation checkpointing, torch.compile and FSDP1 wrap
# blocks (so they appear mid-name), DDP and DeepSpeed the whole model (only at the start). None
# of them is part of the model, so every reader drops them.
BLOCK_WRAPPERS = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")
MODEL_WRAPPERS = ("module.",)

# (ours, Hugging Face's) per transformer block; {i} is the layer index.
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
_TO_HF = dict(_TOP_NAMES) | {f"layers.{{i}}.{ours}": f"model.layers.{{i}}.{hf}" for ours, hf in _LAYER_NAMES}
_FROM_HF = {hf: ours for ours, hf in _TO_HF.items()}
_LAYER_INDEX = re.compile(r"(?<=layers\.)\d+(?=\.)")


def strip_wrappers(name: str) -> str:
    """`name` without wrapper prefixes (`module.layers.0._checkpoint_wrapped_module.x` -> `layers.0.x`)."""
    for prefix in BLOCK_WRAPPERS:
        name = name.replace("." + prefix, ".")
    while True:
        prefix = next((p for p in MODEL_WRAPPERS + BLOCK_WRAPPERS if name.startswith(p)), None)
        if prefix is None:
            return name
        name = name[len(prefix):]


def to_hf_name(name: str) -> str:
    """Hugging Face LlamaForCausalLM's name for our parameter `name`."""
    return _translate(name, _TO_HF, "a parameter of pretrain's Transformer")


def from_hf_name(name: str) -> str:
    """Our parameter name for Hugging Face LlamaForCausalLM's `name`."""
    return _translate(name, _FROM_HF, "a LlamaForCausalLM parameter this exporter writes")


def _translate(name: str, table: dict[str, str], what: str) -> str:
    index = _LAYER_INDEX.search(name)
    pattern = _LAYER_INDEX.sub("{i}", name, count=1) if index else name
    if pattern not in table:
        raise PretrainError(f"{name!r} is not {what}; the weights come from another model family or version")
    return table[pattern].replace("{i}", index.group(0)) if index else table[pattern]
