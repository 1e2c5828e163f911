"""A model's weights, by our own parameter names, from wherever they were saved: a training
checkpoint (DCP or DeepSpeed), a `pretrain export --format torch` file or a `--format hf`
directory. Used by `pretrain export` and by `--checkpoint.init_from`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Mapping

import torch

from pretrain.checkpoint.layout import check_shapes
from pretrain.errors import PretrainError
from pretrain.export.names import from_hf_name, from_hf_tensor, strip_wrappers
from pretrain.export.readers import MANIFEST, checkpoint_config, open_reader, read_manifest
from pretrain.models import DEFAULT_MODEL, SPECS, AnyModelArgs, HFAdapter, model_spec

TORCH_FILE = "model.pt"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TIED = ("output.weight", "tok_embeddings.weight")  # (tied name, the one it shares), in every family
# Tensors read from a DCP checkpoint per call: few calls (each re-reads the metadata), bounded memory.
READ_GROUP_BYTES = 256 << 20


def expected_shapes(args: AnyModelArgs) -> dict[str, torch.Size]:
    """Every entry of the state dict of the model `args` describes and its shape, in the model's
    order (built on the meta device: nothing is allocated)."""
    with torch.device("meta"):
        model = model_spec(args).build(args)
    return {name: t.shape for name, t in model.state_dict().items()}


def iter_checkpoint_weights(ckpt_dir: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint's weights as (name, fp32 CPU tensor), in the model's order, a few at a time:
    the whole model is never held in memory. A tied output head is yielded right after the
    embedding, as the very same tensor. The stored shapes are checked against the checkpoint's
    config first."""
    ckpt_dir = Path(ckpt_dir)
    manifest = read_manifest(ckpt_dir)
    args = checkpoint_config(ckpt_dir).model
    reader = open_reader(ckpt_dir, manifest)
    expected = expected_shapes(args)
    stored = dict(reader.shapes)
    tied = args.tie_embeddings
    if tied and TIED[1] in stored:  # the head is stored or not depending on the engine; read as the embedding
        stored.setdefault(TIED[0], stored[TIED[1]])
    check_shapes(expected, stored, f"{ckpt_dir} (config.yaml vs stored weights)", args)
    names = [n for n in expected if not (tied and n == TIED[0])]
    for group in _groups(names, expected, READ_GROUP_BYTES):
        tensors = reader.read(group)
        for name in group:
            yield name, tensors[name]
            if tied and name == TIED[1]:
                yield TIED[0], tensors[name]
        del tensors


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The whole state dict (our names, fp32, CPU) from a checkpoint directory, a `--format torch`
    export (its directory or model.pt) or a `--format hf` export directory."""
    path = Path(path)
    if path.is_dir() and (path / MANIFEST).exists():
        return dict(iter_checkpoint_weights(path))
    if path.is_file() and path.suffix == ".pt":
        return _load_torch_file(path)
    if path.is_dir() and (path / TORCH_FILE).is_file():
        return _load_torch_file(path / TORCH_FILE)
    if path.is_dir() and ((path / SAFETENSORS_FILE).is_file() or (path / SAFETENSORS_INDEX).is_file()):
        return _load_hf_dir(path)
    if not path.exists():
        raise PretrainError(f"{path} does not exist; pass a checkpoint directory (OUT_DIR/checkpoints/step_N) or "
                            "the output of `pretrain export`")
    raise PretrainError(f"{path} holds no weights pretrain can read: expected a checkpoint directory (with "
                        f"{MANIFEST}), a `pretrain export --format torch` output ({TORCH_FILE}) or a "
                        f"`--format hf` output ({SAFETENSORS_FILE} or {SAFETENSORS_INDEX})")


def _groups(names: list[str], shapes: Mapping[str, torch.Size], max_bytes: int) -> Iterator[list[str]]:
    group: list[str] = []
    size = 0
    for name in names:
        nbytes = shapes[name].numel() * 4
        if group and size + nbytes > max_bytes:
            yield group
            group, size = [], 0
        group.append(name)
        size += nbytes
    if group:
        yield group


def _load_torch_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a damaged or foreign file
        raise PretrainError(f"{path}: cannot read it as a weights-only torch file ({exc})") from exc
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]  # a {"model": ..., ...} bundle, as many trainers save
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PretrainError(f"{path} is not a state dict (a mapping of parameter names to tensors)")
    return {strip_wrappers(k): v.to(torch.float32) for k, v in state.items()}


def _load_hf_dir(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if (path / SAFETENSORS_INDEX).is_file():
        weight_map = json.loads((path / SAFETENSORS_INDEX).read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
    else:
        files = [SAFETENSORS_FILE]
    config = _hf_config(path)
    adapter = _hf_adapter(config)
    weights = {}
    for file in files:
        for hf_name, tensor in load_file(str(path / file)).items():
            name = from_hf_name(hf_name, adapter)
            weights[name] = from_hf_tensor(name, tensor, adapter).to(torch.float32).contiguous()
    if TIED[0] not in weights and config.get("tie_word_embeddings"):
        weights[TIED[0]] = weights[TIED[1]]  # Hugging Face stores a tied head once, as the embedding
    return weights


def _hf_config(path: Path) -> dict:
    try:
        return json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return {}


def _hf_adapter(config: dict) -> HFAdapter:
    """The adapter of the family whose Hugging Face model_type config.json names (Llama's when
    there is no config.json: exports of earlier versions were all Llama)."""
    model_type = config.get("model_type", model_spec(DEFAULT_MODEL).hf.model_type)
    for spec in SPECS.values():
        if spec.hf.model_type == model_type:
            return spec.hf
    raise PretrainError(f"config.json names model_type {model_type!r}; pretrain reads Hugging Face models of type "
                        f"{', '.join(repr(s.hf.model_type) for s in SPECS.values())}")
