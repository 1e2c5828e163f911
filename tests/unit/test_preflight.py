"""Preflight checks on one process: disk room for checkpoints, the checkpoint size against a real
one, the memory estimate's mapping of the config, the OOM advice and the printed report."""

from __future__ import annotations

import dataclasses
import re
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from pretrain import preflight
from pretrain.config import Config
from pretrain.errors import PretrainError
from pretrain.models import count_params
from pretrain.parallel import DistInfo
from pretrain.preflight import (
    CHECKPOINT_ALLOWANCE,
    RankInfo,
    RankReport,
    check_free_disk,
    checkpoint_bytes,
    format_report,
    memory_estimate,
    memory_fixes,
    oom_message,
    run_preflight,
)
from pretrain.scaling.memory import GIB, training_memory
from tests.conftest import tiny_overrides

CPU, CUDA = torch.device("cpu"), torch.device("cuda")  # a cuda device object needs no GPU until used


def _free_disk(monkeypatch, free: int) -> list[str]:
    """Make every filesystem report `free` bytes; returns the paths asked about."""
    asked = []

    def disk_usage(path):
        asked.append(str(path))
        return SimpleNamespace(total=100 * GIB, used=100 * GIB - free, free=free)

    monkeypatch.setattr(shutil, "disk_usage", disk_usage)
    return asked


def _with(cfg: Config, section: str, **changes: object) -> Config:
    """cfg with some keys of one section changed (past validate(), which checks them for 1 rank)."""
    return dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **changes)})


def test_a_full_disk_fails_with_the_path_the_sizes_and_the_fixes(monkeypatch, tmp_path):
    asked = _free_disk(monkeypatch, free=GIB)
    out_dir = tmp_path / "not" / "yet"  # asks about the nearest existing parent
    with pytest.raises(PretrainError) as error:
        check_free_disk(str(out_dir), 3 * GIB)
    message = str(error.value)
    assert asked == [str(tmp_path)]
    assert f"out_dir {out_dir} ({tmp_path}) has 1.00 GiB free but two checkpoints of this model need 3.00 GiB" \
        in message
    assert "--out_dir" in message and "--checkpoint.keep_last=1" in message
    assert check_free_disk(str(out_dir), GIB) == GIB  # exactly enough passes


def test_checkpoint_bytes_against_a_saved_checkpoint(tiny_config):
    from pretrain.trainer import Trainer

    cfg = tiny_config(checkpoint__every=1, train__max_steps=1, optim__warmup_steps=0)
    Trainer(cfg).train()
    files = [p for p in (Path(cfg.out_dir) / "checkpoints").rglob("*") if p.is_file()]
    on_disk = sum(p.stat().st_size for p in files)
    tensors = sum(p.stat().st_size for p in files if p.suffix == ".distcp")
    estimate = checkpoint_bytes(cfg)
    assert on_disk <= estimate  # the allowance covers tokenizer, state, RNG and metadata
    # The per-parameter part (12 B) against DCP's tensor data: DCP adds a header of ~2 kB per
    # tensor and the optimizer's step counters, ~10% of this 0.14M-parameter model, nothing on a real one.
    assert 0.85 <= (estimate - CHECKPOINT_ALLOWANCE) / tensors <= 1.0
    # DeepSpeed saves the module's weights beside its fp32 master copy and moments: 4 B more
    deepspeed = _with(cfg, "parallel", backend="deepspeed")
    assert checkpoint_bytes(deepspeed) - CHECKPOINT_ALLOWANCE == 16 * count_params(cfg.model)


def test_memory_estimate_maps_the_config_onto_training_memory(tiny_config):
    cfg = tiny_config()  # fp32, backend none, micro-batch 4 x 32 tokens
    assert memory_estimate(cfg, 1, CPU) == training_memory(cfg.model, 32, 4, 1, "none", bf16=False)

    # HSDP: 2 replicas of 2 shards, so the states divide by 2, not 4
    hsdp = _with(_with(cfg, "parallel", backend="fsdp", replicate=2, activation_checkpointing="selective", ac_every=1),
                 "train", precision="bf16")
    assert memory_estimate(hsdp, 4, CPU) == training_memory(cfg.model, 32, 4, 2, "fsdp", checkpointing="selective",
                                                             bf16=True, ac_every=1)

    # What offloading keeps in host memory leaves the GPU's estimate; on a CPU it is the same memory.
    zero = _with(_with(cfg, "parallel", backend="deepspeed", zero_stage=2, offload_optimizer=True), "train",
                 precision="bf16")
    paper = training_memory(cfg.model, 32, 4, 8, "deepspeed", zero_stage=2, bf16=True)
    on_gpu = memory_estimate(zero, 8, CUDA)
    assert on_gpu.states.optimizer == 0 and on_gpu.states.params == paper.states.params > 0
    assert on_gpu.activations == paper.activations and memory_estimate(zero, 8, CPU) == paper
    fsdp_offload = memory_estimate(_with(hsdp, "parallel", cpu_offload=True), 4, CUDA)
    assert fsdp_offload.states.total == 0 and fsdp_offload.activations == memory_estimate(hsdp, 4, CPU).activations


def _knobs(message: str) -> dict[str, float]:
    rows = re.findall(r"^  (--\S+)\s+-> ([\d.]+) GiB per rank$", message, re.MULTILINE)
    return {flag: float(gib) for flag, gib in rows}


def test_oom_message_gives_the_estimate_and_the_knobs_that_lower_it():
    cfg = _with(_with(Config(), "train", precision="bf16", micro_batch_size=4), "parallel", backend="ddp")
    estimate = memory_estimate(cfg, 8, CPU)
    message = oom_message(cfg, 8, CPU)
    assert message.startswith(f"out of memory on cpu: this config needs about {estimate.total / GIB:.2f} GiB per rank")
    assert (f"(model states {estimate.states.total / GIB:.2f} + activations {estimate.activations / GIB:.2f} + "
            f"bf16 weight copies {estimate.compute_copies / GIB:.2f})") in message
    assert "train.global_batch_tokens stays the same" in message
    knobs = _knobs(message)
    assert list(knobs) == ["--train.micro_batch_size=2", "--parallel.activation_checkpointing=full",
                           "--parallel.backend=fsdp"]
    assert all(gib < estimate.total / GIB for gib in knobs.values())

    # DeepSpeed below stage 3 gets its own knobs; ones already turned are not offered again, nor
    # offloading on a CPU (the same memory, so no lower estimate).
    zero = _with(_with(cfg, "parallel", backend="deepspeed", zero_stage=1, activation_checkpointing="full"), "train",
                 micro_batch_size=1)
    assert list(_knobs("\n".join(memory_fixes(zero, 8, CUDA)))) == ["--parallel.zero_stage=3",
                                                                    "--parallel.offload_optimizer=true"]
    assert list(_knobs(oom_message(zero, 8, CPU))) == ["--parallel.zero_stage=3"]
    fsdp = _with(cfg, "parallel", backend="fsdp")
    assert "--parallel.cpu_offload=true" in _knobs("\n".join(memory_fixes(fsdp, 8, CUDA)))


def test_rank_report_bandwidths_by_hand():
    ranks = [RankInfo(r, "host", 100 + r, "cpu") for r in range(4)]
    report = RankReport(ranks, allreduce_bytes=10**9, allreduce_s=0.5)
    assert report.algbw == 2e9 and report.busbw == pytest.approx(2e9 * 2 * 3 / 4)
    assert RankReport(ranks[:1]).algbw is None and RankReport(ranks[:1]).busbw is None


def test_report_lines_on_one_cpu_rank(tiny_config):
    cfg = tiny_config(checkpoint__every=5)
    start = time.perf_counter()
    report = run_preflight(cfg, DistInfo(0, 0, 1, CPU))
    assert time.perf_counter() - start < 5, "it runs before every training run"
    assert report.matmul_flops > 0 and report.peak_flops == cfg.logging.peak_flops  # the tiny config sets one
    assert report.failures == [] and report.checkpoints_needed == 2
    lines = format_report(report)
    assert [line[:12].strip() for line in lines] == ["ranks", "matmul", "memory", "checkpoint", "result"]
    assert all(line[12] == " " and line[13] != " " for line in lines)  # one aligned value column
    assert "1 of 1 answered" in lines[0] and lines[-1].endswith("ok")
    assert f"{report.memory.total / GIB:.2f} GiB per rank" in lines[2]


def test_report_shows_failures_and_warnings(tiny_config, monkeypatch):
    _free_disk(monkeypatch, free=0)
    monkeypatch.setattr(preflight, "device_memory_bytes", lambda device, world_size=1: 1.0)
    cfg = tiny_config(checkpoint__every=0)
    report = run_preflight(cfg, DistInfo(0, 0, 1, CPU), measure=False)
    assert report.matmul_flops is None and report.checkpoints_needed == 1  # a preemption still saves one
    assert len(report.failures) == 1 and "one checkpoint of this model need" in report.failures[0]
    lines = format_report(report)
    warning = next(i for i, line in enumerate(lines) if line.startswith("warning"))
    assert "the estimate exceeds the device's memory" in lines[warning]
    assert lines[warning + 1].startswith(" " * 13 + "to use less memory")  # continued under the value column
    assert any(line.startswith("error        out_dir ") for line in lines) and lines[-1].endswith("FAILED")
    with pytest.raises(PretrainError, match="preflight failed"):
        report.raise_on_failure()


def test_main_prints_the_report_and_returns_the_exit_code(tmp_path, corpus_file, tokenizer_file, monkeypatch, capsys):
    overrides = tiny_overrides(tmp_path / "run", corpus_file, tokenizer_file, checkpoint__every=5)
    assert preflight.main(None, overrides) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "result       ok"
    _free_disk(monkeypatch, free=0)
    assert preflight.main(None, overrides) == 1
    assert "two checkpoints of this model need" in capsys.readouterr().out
