"""Preflight checks on one process: disk room for checkpoints, the checkpoint size against a real
one, the memory estimate's mapping of the config, the OOM advice and the printed report."""

from __future__ import annotations

import dataclasses
import errno
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from pretrain.config import Config
from pretrain.errors import PretrainError
from pretrain.hardware import preflight
from pretrain.hardware.memory_advice import memory_estimate, memory_fixes, oom_message
from pretrain.hardware.preflight import (
    CHECKPOINT_ALLOWANCE,
    RankInfo,
    RankReport,
    check_free_disk,
    check_out_dir,
    checkpoint_bytes,
    format_report,
    run_preflight,
)
from pretrain.models import count_params
from pretrain.parallel import DistInfo
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
        check_free_disk(str(out_dir), GIB * 3 // 4, copies=2)
    message = str(error.value)
    assert asked == [str(tmp_path)]
    assert f"out_dir {out_dir} ({tmp_path}) has 1.00 GiB free but two checkpoints of this model need 1.50 GiB" \
        in message
    # keep_last=1 still holds the newest checkpoint while the next is written (CheckpointManager.prune)
    assert "even --checkpoint.keep_last=1 needs room for two" in message
    assert "--out_dir on a disk with 1.50 GiB free (two checkpoints while the next is written), or free 0.50 GiB " \
           "there" in message
    assert check_free_disk(str(out_dir), GIB // 2, copies=2) == GIB  # exactly enough passes


def test_one_checkpoint_larger_than_the_free_space_suggests_no_keep_last(monkeypatch, tmp_path):
    _free_disk(monkeypatch, free=70 * GIB)
    with pytest.raises(PretrainError) as error:
        check_free_disk(str(tmp_path), 158 * GIB, copies=2)
    message = str(error.value)
    assert f"out_dir {tmp_path} ({tmp_path}) has 70.00 GiB free but one checkpoint of this model needs 158.00 GiB, " \
           "so no checkpoint.keep_last helps" in message
    assert "--checkpoint.keep_last" not in message  # no value of it can help
    assert "choose another --out_dir on a disk with 316.00 GiB free (two checkpoints while the next is written), " \
           "or free 246.00 GiB there" in message
    with pytest.raises(PretrainError, match="on a disk with 158.00 GiB free, or free 88.00 GiB there"):
        check_free_disk(str(tmp_path), 158 * GIB, copies=1)  # checkpoint.every=0: one, on preemption


def test_keep_last_advice_counts_the_checkpoint_being_written(tiny_config, monkeypatch):
    cfg = tiny_config(checkpoint__every=1, train__max_steps=20)
    _free_disk(monkeypatch, free=5 * checkpoint_bytes(cfg))
    report = run_preflight(cfg, DistInfo(0, 0, 1, CPU), measure=False)
    assert report.failures == []
    assert [w for w in report.warnings if "keeps all 20 checkpoints" in w and "--checkpoint.keep_last=4 " in w]


def _flag_settings(flags: str) -> dict[str, object]:
    return {key: yaml.safe_load(value) for key, value in re.findall(r"--(\S+?)=(\S+)", flags)}


def _changed(cfg: Config, flags: str) -> Config:
    for key, value in _flag_settings(flags).items():
        section, name = key.split(".")
        cfg = _with(cfg, section, **{name: value})
    return cfg


def _changes(message: str) -> dict[str, float]:
    """The `--a.b=c [--d.e=f ...] -> X GiB per rank` lines of a message, flags -> GiB."""
    rows = re.findall(r"^ +((?:--\S+ ?)+?) +-> ([\d.]+) GiB per rank$", message, re.MULTILINE)
    return {flags.strip(): float(gib) for flags, gib in rows}


@pytest.fixture
def fitting_config(tiny_config, monkeypatch):
    """(cfg, set_memory): a 135M-parameter config, estimated only (micro-batch 4 of a 64-sequence
    batch, no activation checkpointing, one fp32 rank), and a setter for the bytes the device offers."""
    cfg = tiny_config(model__d_model=1024, model__n_layers=8, model__n_heads=8, model__n_kv_heads=8,
                      model__ffn_hidden=4096, data__seq_len=512, train__global_batch_tokens=512 * 64)

    def set_memory(available: float) -> None:
        monkeypatch.setattr(preflight, "device_memory_bytes", lambda device, world_size=1: available)

    return cfg, set_memory


def test_a_config_that_does_not_fit_is_refused_with_the_knobs_that_fit(fitting_config):
    cfg, set_memory = fitting_config
    single = {"--train.micro_batch_size=2": _with(cfg, "train", micro_batch_size=2),
              "--train.micro_batch_size=1": _with(cfg, "train", micro_batch_size=1),
              "--parallel.activation_checkpointing=selective":
                  _with(cfg, "parallel", activation_checkpointing="selective"),
              "--parallel.activation_checkpointing=full": _with(cfg, "parallel", activation_checkpointing="full"),
              "--parallel.backend=fsdp": _with(cfg, "parallel", backend="fsdp")}
    estimates = {flag: memory_estimate(changed, 1, CPU).total for flag, changed in single.items()}
    # Between the two knobs: full checkpointing and micro-batch 1 fit, micro-batch 2, selective and
    # FSDP (one rank: nothing to shard) do not.
    available = (estimates["--parallel.activation_checkpointing=full"] + estimates["--train.micro_batch_size=2"]) / 2
    set_memory(available)
    report = run_preflight(cfg, DistInfo(0, 0, 1, CPU), measure=False)
    assert len(report.failures) == 1 and report.warnings == []
    message = report.failures[0]
    assert message.startswith(f"the estimate exceeds the device's memory: {report.memory.total / GIB:.2f} GiB per rank "
                              f"of {available / GIB:.2f} GiB")
    assert "it fits with any one of these changes" in message
    changes = _changes(message)
    fitting = [flag for flag, total in estimates.items() if total <= available]
    assert list(changes) == ["--train.micro_batch_size=1", "--parallel.activation_checkpointing=full"] == fitting
    assert all(memory_estimate(_changed(cfg, flags), 1, CPU).total <= available for flags in changes)
    assert message.endswith("to start anyway, at the risk of running out of memory: --train.ignore_memory_check=true")
    lines = format_report(report)
    assert lines[-1].endswith("FAILED") and any(line.startswith("error        the estimate exceeds") for line in lines)
    with pytest.raises(PretrainError, match="preflight failed:\n  - the estimate exceeds"):
        report.raise_on_failure()

    # The override key turns the refusal back into a warning.
    ignored = run_preflight(_with(cfg, "train", ignore_memory_check=True), DistInfo(0, 0, 1, CPU), measure=False)
    assert ignored.failures == [] and len(ignored.warnings) == 1
    assert "starting anyway (train.ignore_memory_check=true)" in ignored.warnings[0]
    assert list(_changes(ignored.warnings[0])) == fitting


def test_when_no_single_knob_fits_the_smallest_combination_is_named(fitting_config):
    cfg, set_memory = fitting_config
    micro_batches, checkpointing = (2, 1), ("selective", "full")
    singles = [_with(cfg, "train", micro_batch_size=m) for m in micro_batches] + [
        _with(cfg, "parallel", activation_checkpointing=ac) for ac in checkpointing]
    available = min(memory_estimate(c, 1, CPU).total for c in singles) - 1
    pairs = {f"--train.micro_batch_size={m} --parallel.activation_checkpointing={ac}":
             memory_estimate(_with(_with(cfg, "train", micro_batch_size=m), "parallel", activation_checkpointing=ac),
                             1, CPU).total for m in micro_batches for ac in checkpointing}
    fitting = {flags: total for flags, total in pairs.items() if total <= available}
    assert len(fitting) > 1  # the numbers this test relies on: several pairs fit, no single knob
    set_memory(available)
    message = run_preflight(cfg, DistInfo(0, 0, 1, CPU), measure=False).failures[0]
    assert "no single change fits; this combination does" in message
    mildest = max(fitting, key=fitting.get)  # the pair that fits using the most memory
    assert _changes(message) == {mildest: round(fitting[mildest] / GIB, 2)}


def test_when_nothing_fits_it_says_so_and_how_many_ranks_would(fitting_config):
    cfg, set_memory = fitting_config
    least = _with(_with(cfg, "train", micro_batch_size=1), "parallel", activation_checkpointing="full")
    sharded = _with(least, "parallel", backend="fsdp")
    available = memory_estimate(sharded, 2, CPU).total  # 2 ranks fit exactly, 1 does not
    assert memory_estimate(least, 1, CPU).total > available
    set_memory(available)
    message = run_preflight(cfg, DistInfo(0, 0, 1, CPU), measure=False).failures[0]
    assert (f"nothing fits in {available / GIB:.2f} GiB per rank on this hardware: the least memory these knobs reach "
            f"is {memory_estimate(least, 1, CPU).total / GIB:.2f} GiB per rank, with --train.micro_batch_size=1 "
            "--parallel.activation_checkpointing=full") in message
    assert ("it would fit sharded over 2 ranks (e.g. 2 machines with this much free memory, one rank each): "
            "--train.micro_batch_size=1 --parallel.activation_checkpointing=full --parallel.backend=fsdp") in message
    assert "it fits with" not in message and "--train.ignore_memory_check=true" in message

    # Below what one sequence's activations take, no number of ranks helps.
    set_memory(memory_estimate(sharded, 2**40, CPU).total / 2)
    message = run_preflight(cfg, DistInfo(0, 0, 1, CPU), measure=False).failures[0]
    assert "no number of ranks makes it fit" in message and "sharded over" not in message


def test_an_out_dir_through_a_file_fails_naming_the_file(tiny_config, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(PretrainError) as error:
        check_out_dir(str(blocker / "run"))
    assert str(error.value).startswith(f"out_dir {blocker / 'run'} cannot be created: a parent, {blocker}, is a file; ")
    with pytest.raises(PretrainError, match=f"out_dir {blocker} cannot be created: {blocker} is a file, not a dir"):
        check_out_dir(str(blocker))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoints").write_text("")  # where the checkpoints would go
    with pytest.raises(PretrainError, match="checkpoints is a file, not a directory"):
        check_out_dir(str(tmp_path / "run"))

    # In preflight: a failure like any other, and no free space is claimed for a path that cannot exist.
    report = run_preflight(tiny_config(out_dir=blocker / "run"), DistInfo(0, 0, 1, CPU), measure=False)
    assert report.failures == [f"out_dir {blocker / 'run'} cannot be created: a parent, {blocker}, is a file; "
                               "choose another --out_dir or fix that path"]
    assert report.disk_free is None and "free space not checked" in "\n".join(format_report(report))


@pytest.fixture
def unwritable_dir(tmp_path) -> Iterator[Path]:
    """A directory this process cannot create files in. Permission bits do not stop root, but
    sysfs takes no new files from anyone."""
    if os.geteuid() == 0:
        yield Path("/sys/kernel")
        return
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    yield locked
    locked.chmod(0o755)


def test_an_unwritable_out_dir_fails_with_the_cause(unwritable_dir, tiny_config, tmp_path, monkeypatch):
    with pytest.raises(PretrainError) as error:
        check_out_dir(str(unwritable_dir))
    assert str(error.value).startswith(f"out_dir {unwritable_dir} cannot be written: [Errno 13] Permission denied "
                                       f"(creating a file in {unwritable_dir}); choose another --out_dir")
    report = run_preflight(tiny_config(out_dir=unwritable_dir), DistInfo(0, 0, 1, CPU), measure=False)
    assert len(report.failures) == 1 and "[Errno 13] Permission denied" in report.failures[0]

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(tmp_path / ".preflight-x"))

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", read_only)
    with pytest.raises(PretrainError, match=r"out_dir \S+ cannot be written: \[Errno 30\] Read-only file system \("):
        check_out_dir(str(tmp_path / "run"))


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
    assert list(knobs) == ["--train.micro_batch_size=1", "--parallel.activation_checkpointing=full",
                           "--parallel.backend=fsdp"]  # each knob at its strongest
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
    cfg = tiny_config(checkpoint__every=0, train__ignore_memory_check=True)  # memory: a warning, not a failure
    report = run_preflight(cfg, DistInfo(0, 0, 1, CPU), measure=False)
    assert report.matmul_flops is None and report.checkpoints_needed == 1  # a preemption still saves one
    assert len(report.failures) == 1 and "one checkpoint of this model needs" in report.failures[0]
    lines = format_report(report)
    warning = next(i for i, line in enumerate(lines) if line.startswith("warning"))
    assert "the estimate exceeds the device's memory" in lines[warning]
    assert lines[warning + 1].startswith(" " * 13 + "nothing fits")  # continued under the value column
    assert any(line.startswith("error        out_dir ") for line in lines) and lines[-1].endswith("FAILED")
    with pytest.raises(PretrainError, match="preflight failed"):
        report.raise_on_failure()


def test_main_prints_the_report_and_returns_the_exit_code(tmp_path, corpus_file, tokenizer_file, monkeypatch, capsys):
    overrides = tiny_overrides(tmp_path / "run", corpus_file, tokenizer_file, checkpoint__every=5)
    assert preflight.main(None, overrides) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "result       ok"
    _free_disk(monkeypatch, free=0)
    assert preflight.main(None, overrides) == 1
    assert "one checkpoint of this model needs" in capsys.readouterr().out


def test_a_resumed_run_needs_room_for_the_next_checkpoint_only(tiny_config, monkeypatch):
    """The checkpoint it resumes from is on the disk already: the one that stays while the next
    is written. Room for one more is enough; a fresh run needs room for two."""
    cfg = tiny_config(checkpoint__every=1)
    size = checkpoint_bytes(cfg)
    _free_disk(monkeypatch, free=3 * size // 2)
    fresh = run_preflight(cfg, DistInfo(0, 0, 1, CPU), measure=False)
    assert fresh.checkpoints_needed == 2 and [f for f in fresh.failures if "two checkpoints" in f]
    existing = Path(cfg.out_dir) / "checkpoints" / "step_00000001"
    existing.mkdir(parents=True)
    (existing / "manifest.json").write_text('{"step": 1, "files": {}}')
    resumed = run_preflight(cfg, DistInfo(0, 0, 1, CPU), measure=False)
    assert resumed.checkpoints_needed == 1 and resumed.failures == []
    starting_over = run_preflight(_with(cfg, "checkpoint", resume=False), DistInfo(0, 0, 1, CPU), measure=False)
    assert starting_over.checkpoints_needed == 2 and starting_over.failures
