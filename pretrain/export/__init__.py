"""Weights out of training: `pretrain export` (Hugging Face and plain torch formats) and the
reader behind `--checkpoint.init_from`.

    weights.py        load_weights / iter_checkpoint_weights: our names, from any source
    readers.py        a checkpoint's manifest, config and weights (DCP or DeepSpeed), streamed
    names.py          our parameter names <-> Hugging Face's (the family's HFAdapter); wrappers dropped
    hf.py             --format hf: config.json, safetensors, generation config, tokenizer, parity gate
    torch_format.py   --format torch: model.pt + config.yaml + tokenizer.model
"""

from pretrain.export.weights import expected_shapes, iter_checkpoint_weights, load_weights

__all__ = ["expected_shapes", "iter_checkpoint_weights", "load_weights"]
