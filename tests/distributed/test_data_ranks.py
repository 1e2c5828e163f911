"""The data pipeline in a real 2-process gloo group: each rank takes its slice of the global
stream with its own worker, and the gathered state equals the single-process state."""

from __future__ import annotations

import json

import pytest

from tests.conftest import MODES, rows_of, take, train_data
from tests.distributed.ranks import run_ranks

pytestmark = pytest.mark.slow


def consume(rank: int, world_size: int, cfg, tokenizer, out_dir) -> None:
    data = train_data(cfg, tokenizer, rank, world_size)
    rows = [rows_of(data.next_step()) for _ in range(4)]
    state = data.state_dict()  # a collective: every rank gathers every lane's cursor
    metrics = data.metrics()
    data.close()
    (out_dir / f"rank{rank}.json").write_text(json.dumps({"rows": rows, "state": state, "metrics": metrics}))


@MODES
def test_two_ranks_take_their_slices_and_gather_the_single_process_state(mixed_config, tokenizer, tmp_path, mode):
    cfg = mixed_config(data__num_workers=1, **mode)
    run_ranks(consume, 2, cfg, tokenizer, tmp_path)
    single = train_data(cfg, tokenizer)
    expected_rows = [rows_of(single.next_step()) for _ in range(4)]
    expected_state = json.loads(json.dumps(single.state_dict()))
    single.close()
    for rank in range(2):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert [[tuple(r) for r in step] for step in result["rows"]] == [step[rank::2] for step in expected_rows]
        assert result["state"] == expected_state
        assert result["metrics"]["mix_share"] == pytest.approx({"topics": 0.3, "paragraphs": 0.7}, abs=0.1)
    # and the gathered state resumes a single process exactly where the uninterrupted one is
    resumed = train_data(cfg, tokenizer)
    resumed.load_state_dict(expected_state)
    assert take(resumed, steps=2) == take(single, steps=2)
