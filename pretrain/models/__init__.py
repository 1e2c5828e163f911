"""Model code: plain `nn.Module`s with no distributed imports, one family per ModelSpec
(spec.py), looked up by the config's model.name (registry.py)."""

from pretrain.models.args import ModelArgs, matmul_params
from pretrain.models.gpt2 import GPT2, GPT2Args
from pretrain.models.registry import DEFAULT_MODEL, SPECS, AnyModelArgs, count_params, flops_per_token, model_spec
from pretrain.models.spec import HFAdapter, ModelSpec
from pretrain.models.transformer import Transformer

__all__ = ["DEFAULT_MODEL", "GPT2", "SPECS", "AnyModelArgs", "GPT2Args", "HFAdapter", "ModelArgs", "ModelSpec",
           "Transformer", "count_params", "flops_per_token", "matmul_params", "model_spec"]
