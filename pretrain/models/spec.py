"""What the rest of pretrain may know about a model family: a `ModelSpec` (torchtitan's
model_spec.py idea). The trainer, exporter, planner, MFU and memory code ask the spec of the
config's `model.name` (registry.py) and never import a family's module class."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, cast

from torch import nn


@dataclass(frozen=True)
class HFAdapter:
    """How a family's weights and shape map onto a Hugging Face transformers architecture. Plain
    tables: the exporter (pretrain/export/names.py, hf.py, parity.py) does the work.

    Names are ours and Hugging Face's, `{i}` standing for a block index. A name of `transposed`
    holds its weight transposed on the Hugging Face side (GPT-2's Conv1D stores (in, out))."""

    architecture: str  # the transformers class that loads the export, e.g. "LlamaForCausalLM"
    model_type: str  # config.json's model_type, by which a Hugging Face directory's family is known
    names: tuple[tuple[str, str], ...]  # (ours, Hugging Face's)
    config: Callable[[Any], dict]  # config.json keys from the model args (token ids are added by the exporter)
    transposed: frozenset[str] = frozenset()


@dataclass(frozen=True)
class ModelSpec:
    """One model family: its config section, how to build it and the numbers other code needs.

    A model built by `build` is a plain nn.Module with the forward signature
    `(tokens, document_ids=None, labels=None)` (logits, or the mean loss given labels),
    `init_weights()` (every tensor from the seeded global RNG, after `to_empty`) and
    `init_buffers()` (only the tensors a state dict does not hold), a tied head named
    `output.weight` sharing `tok_embeddings.weight`, and an OutputHead (transformer.py) as
    `output_head(model)`."""

    name: str  # the config's model.name
    args_class: type  # the dataclass that is the `model:` section for this family
    build: Callable[[Any], nn.Module]  # on the current default device: call it under torch.device("meta")
    count_params: Callable[..., int]  # (args, include_embeddings=True) -> distinct parameters
    flops_per_token: Callable[[Any, int], int]  # (args, seq_len) -> training FLOPs per token
    block_activation_bytes: Callable[[Any, int], float]  # (args, element bytes) -> saved bytes per token per block
    check: Callable[[Any], list[str]]  # config problems of the model section, each naming its key
    hf: HFAdapter
    # Keys a resume may change: they shape no trained tensor and no computation up to the length
    # trained on, or act only at initialisation.
    free_on_resume: tuple[str, ...] = ()
    blocks: Callable[[nn.Module], nn.ModuleList] = lambda model: cast(nn.ModuleList, model.layers)  # what AC, compile and FSDP wrap
    output_head: Callable[[nn.Module], nn.Module] = lambda model: cast(nn.Module, model.output)  # holds the fused loss
