"""Model code: plain `nn.Module`s with no distributed imports."""

from pretrain.models.args import ModelArgs, count_params, flops_per_token, matmul_params
from pretrain.models.transformer import Transformer

__all__ = ["ModelArgs", "Transformer", "count_params", "flops_per_token", "matmul_params"]
