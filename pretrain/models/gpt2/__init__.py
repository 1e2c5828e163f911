"""The GPT-2 family (`model.name: gpt2`): GPT2Args (args.py), the module (model.py) and its
Hugging Face adapter (hf.py), registered in pretrain/models/registry.py."""

from pretrain.models.gpt2.args import GPT2Args, block_activation_bytes, check_args, count_params, flops_per_token
from pretrain.models.gpt2.hf import GPT2_HF
from pretrain.models.gpt2.model import GPT2
from pretrain.models.spec import ModelSpec

GPT2_SPEC = ModelSpec(
    name="gpt2",
    args_class=GPT2Args,
    build=GPT2,
    count_params=count_params,
    flops_per_token=flops_per_token,
    block_activation_bytes=block_activation_bytes,
    check=check_args,
    hf=GPT2_HF,
    # Not max_seq_len: it is the number of rows of a trained tensor, the position table.
    free_on_resume=("init_std", "init_scaled_residual"),
)

__all__ = ["GPT2", "GPT2Args", "GPT2_SPEC"]
