"""The model families pretrain trains, by the config's `model.name`.

A new family is a folder (its args dataclass with a `name: Literal["<name>"]` field, its module,
its ModelSpec) plus two lines here: the spec in SPECS and its args class in AnyModelArgs, the
type of the config's `model:` section (the config parser picks the member by `name`)."""

from __future__ import annotations

from typing import Any, Union

from pretrain.models.args import ModelArgs
from pretrain.models.gpt2 import GPT2_SPEC, GPT2Args
from pretrain.models.llama import LLAMA
from pretrain.models.spec import ModelSpec

DEFAULT_MODEL = "llama"  # the family of a config (or a saved config.yaml) without model.name
SPECS: dict[str, ModelSpec] = {spec.name: spec for spec in (LLAMA, GPT2_SPEC)}
# The first member is the default family.
AnyModelArgs = Union[ModelArgs, GPT2Args]


def model_spec(model: str | Any) -> ModelSpec:
    """The spec of a family, by name or from its args (the config's `model` section)."""
    name = model if isinstance(model, str) else model.name
    if name not in SPECS:
        raise ValueError(f"unknown model family {name!r}; pretrain knows {', '.join(SPECS)}")
    return SPECS[name]


def count_params(args: Any, include_embeddings: bool = True) -> int:
    """Distinct parameters of the model `args` describes (its family's count_params)."""
    return model_spec(args).count_params(args, include_embeddings)


def flops_per_token(args: Any, seq_len: int) -> int:
    """Training FLOPs per token of the model `args` describes at `seq_len` (its family's formula)."""
    return model_spec(args).flops_per_token(args, seq_len)
