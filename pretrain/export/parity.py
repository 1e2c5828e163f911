"""The export's parity gate: the exported Hugging Face model must compute the checkpoint's logits.

A fixed batch of token ids goes through our model (weights read back from the checkpoint) and
through the family's Hugging Face architecture (LlamaForCausalLM, GPT2LMHeadModel) loaded from
the export, both fp32 on the CPU. A wrong name, a transposed or permuted weight, a wrong RoPE base
or norm epsilon in config.json all show up as logit differences far above float32 rounding."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import nn

from pretrain.errors import PretrainError
from pretrain.models import AnyModelArgs, model_spec

TOLERANCE = 1e-4  # fp32 on the CPU: the two implementations differ by ~1e-6 in practice
BATCH, SEQ, SEED = 2, 16, 1234


def build_model(args: AnyModelArgs, weights: dict[str, torch.Tensor]) -> nn.Module:
    """Our model in eval mode on the CPU holding `weights` (no random init: init_buffers fills
    what a state dict does not hold, such as rotary tables)."""
    with torch.device("meta"):
        model = model_spec(args).build(args)
    # to_empty unties a tied head; both names are loaded with the same values, so the logits agree.
    model.to_empty(device="cpu")
    model.init_buffers()  # type: ignore[operator]  # every family's model has it (ModelSpec.build)
    model.load_state_dict(weights, strict=True)
    return model.eval()


def parity_tokens(args: AnyModelArgs) -> torch.Tensor:
    generator = torch.Generator().manual_seed(SEED)
    assert args.max_seq_len is not None  # a checkpoint's config has it derived
    return torch.randint(0, args.vocab_size, (BATCH, min(SEQ, args.max_seq_len)), generator=generator)


@torch.no_grad()
def check_parity(args: AnyModelArgs, weights: dict[str, torch.Tensor], hf_dir: Path,
                 progress: Callable[[str], None] = lambda _: None) -> float:
    """Max |logit difference| between our model with `weights` and the family's Hugging Face
    architecture from `hf_dir`; PretrainError if it exceeds TOLERANCE."""
    import transformers

    tokens = parity_tokens(args)
    ours = build_model(args, weights)(tokens)
    del weights
    hf_class = getattr(transformers, model_spec(args).hf.architecture)
    hf_model = hf_class.from_pretrained(str(hf_dir), attn_implementation="eager", local_files_only=True, **_fp32())
    theirs = hf_model.eval()(input_ids=tokens).logits
    if theirs.shape != ours.shape:
        raise PretrainError(f"parity: the exported model returns logits of shape {tuple(theirs.shape)}, the "
                            f"checkpoint's model {tuple(ours.shape)}")
    diff = (theirs - ours).abs().max().item()
    progress(f"parity: max |logit difference| = {diff:.3g} (tolerance {TOLERANCE:g})")
    if not diff <= TOLERANCE:  # also catches NaN
        raise PretrainError(f"parity check failed: the exported model's logits differ from the checkpoint's by up "
                            f"to {diff:.3g} (tolerance {TOLERANCE:g}) on a fixed {BATCH}x{tokens.shape[1]} batch; "
                            "nothing was written. This is a bug in the exporter or an unsupported transformers "
                            "version: please report it")
    return diff


def _fp32() -> dict:
    """from_pretrained's dtype argument: `dtype` since transformers 4.56, `torch_dtype` before."""
    import transformers

    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    return {"dtype" if (major, minor) >= (4, 56) else "torch_dtype": torch.float32}
