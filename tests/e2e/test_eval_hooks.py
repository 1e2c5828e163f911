"""Eval hooks on every new checkpoint (in the training process or beside it), the shipped hooks,
and `pretrain eval` of a checkpoint or of a whole run, reproducing the in-loop validation loss."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from pretrain.cli import main
from pretrain.config import load_config
from pretrain.trainer import Trainer
from tests.conftest import tiny_overrides

pytestmark = pytest.mark.slow

RECORD, EXPLODE = "tests.e2e.recording_hooks:record", "tests.e2e.recording_hooks:explode"


def lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("hooks_async", [False, True], ids=["in-process", "async"])
def test_each_checkpoint_goes_to_every_hook_once_and_a_failing_hook_does_not_stop_training(
        tmp_path, corpus_file, tokenizer_file, hooks_async):
    run, calls = tmp_path / "run", tmp_path / "calls.jsonl"
    overrides = tiny_overrides(run, corpus_file, tokenizer_file, train__max_steps=4, checkpoint__every=2,
                               eval__hooks=f"[{EXPLODE}, {RECORD}]", eval__hooks_async=hooks_async,
                               eval__hook_options=f"{{'{RECORD}': {{log_file: '{calls}'}}}}")
    assert Trainer(load_config(None, overrides)).train() == 0

    seen = lines(calls)
    assert [c["step"] for c in seen] == [2, 4]
    assert [c["checkpoint"] for c in seen] == [str(run / "checkpoints" / f"step_{s:08d}") for s in (2, 4)]
    assert all(c["manifest"] and c["out_dir"] == str(run) for c in seen)  # published, with the run's config
    logged = [r for r in lines(run / "metrics.jsonl") if "eval/record/double_step" in r]
    assert [(r["step"], r["eval/record/double_step"]) for r in logged] == [(2, 4), (4, 8)]
    assert [r["step"] for r in lines(run / "eval" / "record.jsonl")] == [2, 4]
    failures = lines(run / "eval" / "explode.jsonl")
    assert [f["step"] for f in failures] == [2, 4] and "RuntimeError: hook failure at step 2" in failures[0]["error"]


def test_a_hook_that_cannot_be_imported_fails_before_training(tmp_path, corpus_file, tokenizer_file):
    overrides = tiny_overrides(tmp_path / "run", corpus_file, tokenizer_file,
                               eval__hooks="[tests.e2e.recording_hooks:no_such_hook]")
    with pytest.raises(Exception, match="no_such_hook.*cannot be imported"):
        Trainer(load_config(None, overrides))


def test_pretrain_eval_reproduces_the_in_loop_validation_and_watch_catches_up_once(
        tmp_path, corpus_file, tokenizer_file, capsys):
    run = tmp_path / "run"
    text = tmp_path / "heldout.txt"
    text.write_text(corpus_file.read_text()[:20000])
    options = (f"{{'pretrain.hooks:perplexity': {{text_file: '{text}'}}, "
               f"'pretrain.hooks:samples': {{prompts: ['The ', 'def '], tokens: 8}}}}")
    overrides = tiny_overrides(run, corpus_file, tokenizer_file, train__max_steps=4, checkpoint__every=2,
                               eval__every=2, eval__hooks="[pretrain.hooks:perplexity, pretrain.hooks:samples]",
                               eval__hook_options=options, logging__wandb__mode="offline")
    assert Trainer(load_config(None, overrides)).train() == 0
    in_loop = {r["step"]: r for r in lines(run / "metrics.jsonl") if "val_loss" in r}

    assert main(["eval", str(run / "checkpoints" / "step_00000004"), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)  # the record alone: log lines went to stderr
    assert record["step"] == 4 and record["tokens"] == in_loop[4]["tokens"]
    assert record["val_loss"] == pytest.approx(in_loop[4]["val_loss"], abs=1e-5)
    assert record["val_bpb"] == pytest.approx(in_loop[4]["val_bpb"], abs=1e-5)

    assert main(["eval", "--watch", str(run), "--once"]) == 0  # catches up on step 2 only
    assert sorted(r["step"] for r in lines(run / "eval" / "validation.jsonl")) == [2, 4]
    assert main(["eval", "--watch", str(run), "--once"]) == 0  # a restart evaluates nothing twice
    assert "evaluated 0 checkpoint(s)" in capsys.readouterr().out
    run_id = (run / "wandb_run_id").read_text().strip()  # the watcher logged into the training's wandb run
    history = b"".join(p.read_bytes() for p in (run / "wandb").glob(f"offline-run-*-{run_id}/*.wandb"))
    assert b"eval/val_loss" in history and b"eval/step" in history
    watched = {r["step"]: r for r in lines(run / "eval" / "validation.jsonl")}
    assert watched[2]["val_loss"] == pytest.approx(in_loop[2]["val_loss"], abs=1e-5)

    ppl = lines(run / "eval" / "perplexity.jsonl")
    assert [r["step"] for r in ppl] == [2, 4] and ppl[1]["ppl"] < ppl[0]["ppl"] * 1.5 and ppl[1]["bpb"] > 0
    samples = (run / "eval" / "samples_step_00000004.txt").read_text()
    assert "=== 'The ' ===" in samples and "=== 'def ' ===" in samples

    assert main(["eval", str(run / "checkpoints" / "step_00000002")]) == 0  # a readable line by default
    assert (f"evaluated {run / 'checkpoints' / 'step_00000002'} (step 2): val_loss {watched[2]['val_loss']:.4f} "
            f"(ppl {watched[2]['val_ppl']:.2f}, {watched[2]['val_bpb']:.3f} bits/byte)\n") in capsys.readouterr().out
    assert main(["eval", "--watch", str(run), "--json"]) == 1
    assert "--json prints the record of one checkpoint" in capsys.readouterr().err


# A hook module that is only beside the config: neither installed nor on sys.path.
BESIDE_THE_CONFIG = """
def score(checkpoint, step, config, scale=1.0):
    return {"acc": 0.125 * scale, "checked": step, "note": "text: kept in the jsonl only"}
"""


@pytest.mark.parametrize("hooks_async", [False, True], ids=["in-process", "async"])
def test_a_hook_beside_the_config_is_found_and_its_numbers_reach_the_console(tmp_path, corpus_file, tokenizer_file,
                                                                             hooks_async):
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "finance_terms.py").write_text(BESIDE_THE_CONFIG)
    config = configs / "run.yaml"
    config.write_text("eval:\n  hooks: [finance_terms:score]\n  hook_options:\n    finance_terms:score: {scale: 2}\n")
    overrides = tiny_overrides(tmp_path / "run", corpus_file, tokenizer_file, train__max_steps=4, checkpoint__every=2,
                               eval__hooks_async=hooks_async)
    result = subprocess.run([sys.executable, "-m", "pretrain", "train", str(config), *overrides], cwd=tmp_path,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for step in (2, 4):
        assert re.search(rf"^\S+ step {step} \| eval/score/acc 0.25 \| eval/score/checked {step}$", result.stdout,
                         re.M), result.stdout
    assert "step 4/4 | loss " in result.stdout
    assert not re.findall(r"^\S+ step \d+(/\d+)?\s*$", result.stdout, re.M)  # a line per record with numbers only
    assert [r["note"] for r in lines(tmp_path / "run" / "eval" / "score.jsonl")] == ["text: kept in the jsonl only"] * 2
