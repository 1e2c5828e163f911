"""Parameter names: our model's own ("canonical"), the wrapped names training may save, and
Hugging Face's, by the family's HFAdapter (pretrain/models/spec.py; a family's tables live with
its model code). Besides renaming, an adapter may mark weights that Hugging Face stores
transposed (GPT-2's Conv1D); nothing is permuted, split or fused."""

from __future__ import annotations

import re

import torch

from pretrain.errors import PretrainError
from pretrain.models import DEFAULT_MODEL, HFAdapter, model_spec

# Wrappers that prefix parameter names: activation checkpointing, torch.compile and FSDP1 wrap
# blocks (so they appear mid-name), DDP and DeepSpeed the whole model (only at the start). None
# of them is part of the model, so every reader drops them.
BLOCK_WRAPPERS = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")
MODEL_WRAPPERS = ("module.",)

_LAYER_INDEX = re.compile(r"(?<=\.)\d+(?=\.)")  # the block index: layers.3.x, model.layers.3.x, transformer.h.3.x
_LLAMA = model_spec(DEFAULT_MODEL).hf


def strip_wrappers(name: str) -> str:
    """`name` without wrapper prefixes (`module.layers.0._checkpoint_wrapped_module.x` -> `layers.0.x`)."""
    for prefix in BLOCK_WRAPPERS:
        name = name.replace("." + prefix, ".")
    while True:
        wrapper = next((p for p in MODEL_WRAPPERS + BLOCK_WRAPPERS if name.startswith(p)), None)
        if wrapper is None:
            return name
        name = name[len(wrapper):]


def to_hf_name(name: str, adapter: HFAdapter = _LLAMA) -> str:
    """Hugging Face's name (in `adapter`'s architecture; Llama's by default) for our parameter `name`."""
    return _translate(name, {ours: hf for ours, hf in adapter.names},
                      f"a parameter of pretrain's model that exports to {adapter.architecture}")


def from_hf_name(name: str, adapter: HFAdapter = _LLAMA) -> str:
    """Our parameter name for Hugging Face's `name` (in `adapter`'s architecture; Llama's by default)."""
    return _translate(name, {hf: ours for ours, hf in adapter.names},
                      f"a {adapter.architecture} parameter this exporter writes")


def to_hf_tensor(name: str, tensor: torch.Tensor, adapter: HFAdapter) -> torch.Tensor:
    """Our parameter `name`'s tensor as Hugging Face stores it (transposed for a Conv1D weight)."""
    return tensor.T if _pattern(name) in adapter.transposed else tensor


def from_hf_tensor(name: str, tensor: torch.Tensor, adapter: HFAdapter) -> torch.Tensor:
    """The tensor of our parameter `name` from the one Hugging Face stores."""
    return to_hf_tensor(name, tensor, adapter)  # a transpose undoes itself


def _pattern(name: str) -> str:
    return _LAYER_INDEX.sub("{i}", name, count=1)


def _translate(name: str, table: dict[str, str], what: str) -> str:
    index = _LAYER_INDEX.search(name)
    pattern = _pattern(name)
    if pattern not in table:
        raise PretrainError(f"{name!r} is not {what}; the weights come from another model family or version")
    return table[pattern].replace("{i}", index.group(0)) if index else table[pattern]
