"""`pretrain export --format hf`: a checkpoint as a Hugging Face model directory of its family's
architecture (LlamaForCausalLM, GPT2LMHeadModel: the family's HFAdapter) with config.json,
safetensors weights, generation_config.json and tokenizer files, published only after the
exported model has reproduced the checkpoint's logits (parity.py)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Callable

from pretrain.errors import PretrainError
from pretrain.export.hf_tokenizer import write_tokenizer
from pretrain.export.names import to_hf_name, to_hf_tensor
from pretrain.export.output import atomic_output, check_output_dir
from pretrain.export.parity import check_parity
from pretrain.export.readers import checkpoint_config, checkpoint_tokenizer, read_manifest
from pretrain.export.shards import write_safetensors
from pretrain.export.weights import TIED, expected_shapes, iter_checkpoint_weights, load_weights
from pretrain.models import AnyModelArgs, model_spec
from tokenizer import Tokenizer

DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # Hugging Face's default max_shard_size, "5GB"


def require_transformers() -> None:
    if importlib.util.find_spec("transformers") is None:
        raise PretrainError("--format hf needs the transformers package: pip install 'pretrain[export]'")


def hf_config(args: AnyModelArgs, tokenizer: Tokenizer) -> dict:
    """config.json for the family's Hugging Face architecture with our model's shape."""
    return {
        **model_spec(args).hf.config(args),
        "bos_token_id": tokenizer.bos_id,
        "eos_token_id": tokenizer.eos_id,
        "pad_token_id": tokenizer.pad_id,
        "torch_dtype": "float32",
        "use_cache": True,
    }


def generation_config(tokenizer: Tokenizer) -> dict:
    return {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id}


def export_hf(ckpt_dir: str | Path, out_dir: str | Path, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
              parity: bool = True, force: bool = False, progress: Callable[[str], None] = lambda _: None) -> Path:
    """Write the checkpoint at `ckpt_dir` to `out_dir` as a Hugging Face model, streaming
    the weights into safetensors shards of at most `max_shard_bytes`. With `parity`, the export
    is published only if its logits match the checkpoint's (PretrainError otherwise, and nothing
    is left at `out_dir`). Returns `out_dir`."""
    require_transformers()
    ckpt_dir, out_dir = Path(ckpt_dir), Path(out_dir)
    manifest = read_manifest(ckpt_dir)
    cfg = checkpoint_config(ckpt_dir)
    args = cfg.model
    sp_model = checkpoint_tokenizer(ckpt_dir, cfg)
    tokenizer = Tokenizer.load(sp_model)
    check_output_dir(out_dir, ckpt_dir, force)
    progress(f"exporting step {manifest['step']} ({manifest.get('engine', 'dcp')} checkpoint) of a "
             f"{args.n_layers}-layer, d_model={args.d_model} model to {out_dir}")
    # Hugging Face stores a tied head once, as the embedding.
    shapes = {n: s for n, s in expected_shapes(args).items() if not (args.tie_embeddings and n == TIED[0])}
    adapter = model_spec(args).hf
    sizes = {to_hf_name(n, adapter): shape.numel() * 4 for n, shape in shapes.items()}  # fp32
    with atomic_output(out_dir) as tmp:
        _write_json(tmp / "config.json", hf_config(args, tokenizer))
        _write_json(tmp / "generation_config.json", generation_config(tokenizer))
        hf_tensors = ((to_hf_name(n, adapter), to_hf_tensor(n, t, adapter))
                      for n, t in iter_checkpoint_weights(ckpt_dir) if n in shapes)
        write_safetensors(hf_tensors, sizes, tmp, max_shard_bytes, progress)
        assert args.max_seq_len is not None  # a checkpoint's config has it derived
        write_tokenizer(sp_model, tmp, args.max_seq_len)
        progress("tokenizer: AutoTokenizer gives the run's token ids")
        if parity:
            check_parity(args, load_weights(ckpt_dir), tmp, progress)
    return out_dir


def _write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n")
