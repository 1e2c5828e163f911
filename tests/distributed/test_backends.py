"""Every parallel backend on 2 gloo processes trains exactly like one process that accumulates
gradients to the same global batch: same losses step by step, same weights at the end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pretrain.checkpoint.safe_load import read_dcp_metadata
from pretrain.export.weights import load_weights
from tests.conftest import FSDP_TWO_RANKS, ZERO3_TIED_TWO_RANKS
from tests.distributed.ranks import run_ranks
from tests.distributed.runs import STEPS, losses, rank_train, train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def single_process(tmp_path_factory, corpus_file, tokenizer_file) -> dict[bool, Path]:
    """The 1-process reference runs, with an untied and a tied output head."""
    runs = {}
    for tied in (False, True):
        runs[tied] = tmp_path_factory.mktemp("tied" if tied else "untied")
        train(runs[tied], corpus_file, tokenizer_file, 1, model__tie_embeddings=tied)
    return runs


@pytest.fixture(scope="module")
def single_process_bf16(tmp_path_factory, corpus_file, tokenizer_file) -> Path:
    """The 1-process reference in bf16 (the default precision wherever bf16 is supported):
    autocast to bf16 over fp32 master weights."""
    run = tmp_path_factory.mktemp("bf16")
    train(run, corpus_file, tokenizer_file, 1, train__precision="bf16")
    return run


BACKENDS = {
    "ddp": {"parallel__backend": "ddp"},
    "fsdp": {"parallel__backend": "fsdp"},
    "fsdp-no-reshard-ac": {"parallel__backend": "fsdp", "parallel__reshard_after_forward": "false",
                           "parallel__activation_checkpointing": "full"},
    "hsdp-2x1": {"parallel__backend": "fsdp", "parallel__replicate": 2, "parallel__shard": 1},
    "zero1": {"parallel__backend": "deepspeed", "parallel__zero_stage": 1},
    "zero2": {"parallel__backend": "deepspeed", "parallel__zero_stage": 2},
    "zero3": {"parallel__backend": "deepspeed", "parallel__zero_stage": 3},
    "zero3-ac": {"parallel__backend": "deepspeed", "parallel__zero_stage": 3,
                 "parallel__activation_checkpointing": "selective"},
    # AdamW state and step on the CPU in DeepSpeedCPUAdam (its C++ op is built on first use)
    "zero2-offload": {"parallel__backend": "deepspeed", "parallel__zero_stage": 2, "parallel__offload_optimizer": "true"},
}


# A tied head is one parameter used by two modules: each way of holding parameters meets it once.
CASES = [(name, False) for name in BACKENDS] + [(name, True) for name in ("ddp", "fsdp", "zero3-ac")]


@pytest.mark.parametrize("backend, tied", CASES, ids=[f"{name}-{'tied' if tied else 'untied'}" for name, tied in CASES])
def test_two_ranks_match_one_process(backend, tied, single_process, tmp_path, corpus_file, tokenizer_file, request):
    settings = {**BACKENDS[backend], "model__tie_embeddings": tied}
    shared = {"fsdp_two_ranks": FSDP_TWO_RANKS, "zero3_tied_two_ranks": ZERO3_TIED_TWO_RANKS}
    shared_run = next((fixture for fixture, values in shared.items() if values == settings), None)
    if shared_run:  # trained once, also checked by the resharding and export tests
        tmp_path = request.getfixturevalue(shared_run)
    else:
        run_ranks(rank_train, 2, tmp_path, corpus_file, tokenizer_file, settings)
    reference_run = single_process[tied]
    expected, got = losses(reference_run), losses(tmp_path)
    assert len(got) == STEPS
    assert got == pytest.approx(expected, rel=2e-5), json.dumps({"expected": expected, "got": got})
    assert expected[-1] < expected[0] - 0.5  # it learned, so matching is not trivial
    # the same held-out sequences, split over the ranks, give the same validation loss
    assert losses(tmp_path, "val_loss") == pytest.approx(losses(reference_run, "val_loss"), rel=2e-5)
    reference = torch.load(reference_run / "weights.pt")
    weights = torch.load(tmp_path / "weights.pt")
    assert weights.keys() == reference.keys()
    for name, value in reference.items():
        torch.testing.assert_close(weights[name], value, rtol=1e-4, atol=1e-5, msg=name)


# Each backend casts to bf16 its own way (FSDP2's mixed-precision policy: bf16 parameters in
# compute, fp32 gradient reduction; DeepSpeed's bf16 mode: bf16 weights and gradients with an fp32
# master copy in the optimizer; one process: autocast over fp32 weights), so they agree with one
# bf16 process to bf16's precision, not bit for bit. The stated tolerance is bf16's own effect:
# each tensor of the 2-rank run may differ from the 1-process bf16 run by at most 2.5x what
# running in bf16 instead of fp32 changes it by in one process (measured: up to 1.6x for FSDP,
# 1.8x for ZeRO-2/3), and each step's loss by at most 0.1% (measured 0.02-0.03%; bf16 vs fp32 in
# one process: 0.02%). A real error (a gradient not averaged, a shard dropped) moves them by far more.
BF16 = {"fsdp": BACKENDS["fsdp"], "zero2": BACKENDS["zero2"], "zero3": BACKENDS["zero3"]}
BF16_LOSS_RTOL, BF16_WEIGHT_NOISE_FACTOR = 1e-3, 2.5


@pytest.mark.parametrize("backend", list(BF16))
def test_two_ranks_in_bf16_match_one_bf16_process(backend, single_process, single_process_bf16, tmp_path,
                                                    corpus_file, tokenizer_file):
    run_ranks(rank_train, 2, tmp_path, corpus_file, tokenizer_file,
              {**BF16[backend], "train__precision": "bf16", "checkpoint__every": STEPS})
    expected, got = losses(single_process_bf16), losses(tmp_path)
    assert len(got) == STEPS and expected[-1] < 0.9 * expected[0]
    assert got == pytest.approx(expected, rel=BF16_LOSS_RTOL), json.dumps({"expected": expected, "got": got})
    assert losses(tmp_path, "val_loss") == pytest.approx(losses(single_process_bf16, "val_loss"), rel=BF16_LOSS_RTOL)
    reference = torch.load(single_process_bf16 / "weights.pt")
    fp32 = torch.load(single_process[False] / "weights.pt")
    # the fp32 master weights (DeepSpeed's module holds bf16 copies of them)
    weights = load_weights(tmp_path / "checkpoints" / f"step_{STEPS:08d}")
    assert weights.keys() == reference.keys()
    for name, value in reference.items():
        bf16_effect = (fp32[name] - value).norm()
        assert bf16_effect > 0, f"{name}: the bf16 reference equals the fp32 one; bf16 was not used"
        assert (weights[name] - value).norm() <= BF16_WEIGHT_NOISE_FACTOR * bf16_effect, name


def test_compiled_blocks_under_fsdp_match_one_process(single_process, tmp_path, corpus_file, tokenizer_file):
    """train.compile: auto compiles by default on GPUs, where FSDP is the usual backend: compiled
    blocks wrapped by FSDP2 on 2 ranks train as one uncompiled process does (fp32; Inductor's
    fused kernels round differently, hence a tolerance rather than bit equality)."""
    run_ranks(rank_train, 2, tmp_path, corpus_file, tokenizer_file, {**BACKENDS["fsdp"], "train__compile": "true"})
    assert json.loads((tmp_path / "structure.json").read_text())["compiled_blocks"] == 3
    expected, got = losses(single_process[False]), losses(tmp_path)
    assert got == pytest.approx(expected, rel=2e-5), json.dumps({"expected": expected, "got": got})
    reference, weights = torch.load(single_process[False] / "weights.pt"), torch.load(tmp_path / "weights.pt")
    for name, value in reference.items():
        torch.testing.assert_close(weights[name], value, rtol=1e-4, atol=1e-5, msg=name)


RESUME_CASES = {
    # one per checkpoint format, with activation checkpointing, whose wrapping must not leak into names
    "fsdp-ac": BACKENDS["fsdp-no-reshard-ac"],
    "zero3-ac": BACKENDS["zero3-ac"],
    "fsdp-async": {**BACKENDS["fsdp"], "checkpoint__async": "true"},  # DCP's background write on a side group
}


@pytest.mark.parametrize("case", RESUME_CASES)
def test_two_ranks_resume_exactly(case, tmp_path, corpus_file, tokenizer_file):
    """N steps straight == N/2, stop, resume from the checkpoint, N/2 more: identical losses."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_ranks(rank_train, 2, straight, corpus_file, tokenizer_file, RESUME_CASES[case])
    stop = {**RESUME_CASES[case], "checkpoint__every": 4}
    run_ranks(rank_train, 2, resumed, corpus_file, tokenizer_file, {**stop, "train__stop_at": STEPS // 2})
    checkpoint = resumed / "checkpoints" / f"step_{STEPS // 2:08d}"
    assert (checkpoint / "manifest.json").is_file()
    assert stored_parameter_names(checkpoint) == set(torch.load(straight / "weights.pt"))  # the model's own names
    run_ranks(rank_train, 2, resumed, corpus_file, tokenizer_file, stop)
    assert losses(resumed) == losses(straight)
    reference, weights = torch.load(straight / "weights.pt"), torch.load(resumed / "weights.pt")
    assert all(torch.equal(weights[name], value) for name, value in reference.items())


def stored_parameter_names(checkpoint: Path) -> set[str]:
    """Parameter names as written on disk by DCP or DeepSpeed."""
    if (checkpoint / "deepspeed").is_dir():
        states = torch.load(next((checkpoint / "deepspeed").glob("*model_states.pt")), weights_only=False)
        return {name for group in states["param_shapes"] for name in group}
    metadata = read_dcp_metadata(checkpoint)
    return {key.removeprefix("model.") for key in metadata.state_dict_metadata if key.startswith("model.")}
