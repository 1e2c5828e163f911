"""What defines the global data stream, saved with its position so a resume can tell whether it
continues the same stream, and which config key to look at when it does not."""

from __future__ import annotations

from pretrain.config.schema import DataConfig
from tokenizer import Tokenizer

ALLOW_OVERRIDE = "--data.allow_changed_data=true"


def stream_fingerprint(data: DataConfig, seed: int, sources: list, modes: list[str], tokenizer: Tokenizer,
                       n_lanes: int, global_batch: int) -> dict:
    """Everything the order and content of the stream depend on (`seed`: train.seed)."""
    return {
        "seed": seed,
        "seq_len": data.seq_len,
        "global_batch": global_batch,
        "lanes": n_lanes,
        "val_fraction": data.val_fraction,
        "tokenizer": tokenizer.sha256[:16],
        "sources": {src.name: {"content": src.fingerprint, "mode": mode, "weight": float(sc.weight)}
                    for src, mode, sc in zip(sources, modes, data.sources)},
    }


STREAM_KEYS = {
    "seed": "train.seed",
    "seq_len": "data.seq_len",
    "global_batch": "the global batch in sequences (train.global_batch_tokens / data.seq_len)",
    "lanes": "data.lanes (by default the smallest multiple of the global batch >= 256)",
    "val_fraction": "data.val_fraction",
    "tokenizer": "the tokenizer model (tokenizer.path)",
}


def stream_differences(saved: dict, current: dict, data: DataConfig) -> list[str]:
    """One line per difference between a checkpoint's fingerprint and the current one."""
    lines = [f"{label}: {saved.get(key)!r} in the checkpoint, {current[key]!r} now"
             for key, label in STREAM_KEYS.items() if saved.get(key) != current[key]]
    index = {s.name: i for i, s in enumerate(data.sources)}
    old, new = saved.get("sources", {}), current["sources"]
    for name in old:
        if name not in new:
            lines.append(f"data.sources: source {name!r} was in the checkpoint's mixture and is gone")
    for name, now in new.items():
        key = f"data.sources[{index[name]}]"
        if name not in old:
            lines.append(f"data.sources: source {name!r} is new")
            continue
        if old[name]["content"] != now["content"]:
            lines.append(f"{key}.path ({name!r}): its files changed (other files, sizes or text_field)")
        if old[name]["mode"] != now["mode"]:
            lines.append(f"{key} ({name!r}): read {old[name]['mode']} in the checkpoint, {now['mode']} now "
                         "(prepared shards and sources up to data.in_memory_max_bytes are indexed, larger raw "
                         "sources streamed)")
        if old[name]["weight"] != now["weight"]:
            lines.append(f"{key}.weight ({name!r}): {old[name]['weight']} in the checkpoint, {now['weight']} now")
    return lines


def lanes_reusable(saved: dict, current: dict) -> bool:
    """Whether lane cursors of unchanged sources still point at the same data."""
    return all(saved.get(key) == current[key] for key in STREAM_KEYS)
