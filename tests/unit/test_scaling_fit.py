"""Approach-3 fit (Hoffmann et al. 2022) on runs drawn from a known law, and reading run dirs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from scipy.optimize import check_grad

from pretrain.errors import PretrainError
from pretrain.models.args import ModelArgs, count_params, flops_per_token
from pretrain.scaling.fit import (
    RunPoint,
    _FitData,
    bootstrap,
    fit_law,
    fit_report,
    group_by_budget,
    plot_isoflops,
    read_runs,
)
from pretrain.scaling.laws import ScalingLaw

TRUE = ScalingLaw("true", E=1.8, A=400.0, B=1000.0, alpha=0.34, beta=0.37)
BUDGETS = (1e17, 1e18, 1e19, 1e20)


def isoflop_grid(noise: float, seed: int = 1) -> tuple[list[float], list[float], list[float]]:
    """5 sizes per budget from N_opt / 8 to 8 N_opt, D = C / 6N, losses with multiplicative noise."""
    rng = np.random.default_rng(seed)
    n_params, tokens, losses = [], [], []
    for budget in BUDGETS:
        optimal_n, _ = TRUE.compute_optimal(budget)
        for factor in np.geomspace(1 / 8, 8, 5):
            n = optimal_n * factor
            d = budget / (6 * n)
            n_params.append(n)
            tokens.append(d)
            losses.append(TRUE.loss(n, d) * (1 + noise * rng.standard_normal()))
    return n_params, tokens, losses


def test_noiseless_fit_is_exact():
    # the optimiser must reach the optimum, not stop early (Besiroglu et al. 2024's finding)
    law = fit_law(*isoflop_grid(noise=0.0))
    for key in ("E", "A", "B", "alpha", "beta"):
        assert getattr(law, key) == pytest.approx(getattr(TRUE, key), rel=1e-6), key


def test_fit_recovers_constants_under_noise():
    law = fit_law(*isoflop_grid(noise=0.003), name="mine")
    assert law.name == "mine" and "20 runs" in law.source
    assert law.alpha == pytest.approx(TRUE.alpha, rel=0.05)
    assert law.beta == pytest.approx(TRUE.beta, rel=0.05)
    assert law.E == pytest.approx(TRUE.E, rel=0.03)


def test_gradient_matches_finite_differences():
    data = _FitData.of(*isoflop_grid(noise=0.003), huber_delta=1e-3)
    rng = np.random.default_rng(0)
    for _ in range(3):
        theta = np.array([1.0, 2.0, 0.5, 0.3, 0.4]) + 0.2 * rng.standard_normal(5)
        gradient_norm = np.linalg.norm(data.objective(theta)[1])
        error = check_grad(lambda t: data.objective(t)[0], lambda t: data.objective(t)[1], theta, epsilon=1e-7)
        assert error < 1e-4 * gradient_norm


def test_too_few_runs_is_an_error():
    n_params, tokens, losses = isoflop_grid(noise=0.0)
    with pytest.raises(PretrainError, match="at least 5 runs"):
        fit_law(n_params[:4], tokens[:4], losses[:4])
    with pytest.raises(PretrainError, match="positive"):
        fit_law(n_params[:5], tokens[:5], [-1.0] * 5)


def test_bootstrap_intervals_contain_the_truth():
    n_params, tokens, losses = isoflop_grid(noise=0.003)
    best = fit_law(n_params, tokens, losses)
    spread = bootstrap(n_params, tokens, losses, samples=30, seed=0, best=best)
    assert set(spread) == {"E", "A", "B", "alpha", "beta"}
    for key in ("alpha", "beta"):
        assert spread[key]["p05"] <= getattr(TRUE, key) <= spread[key]["p95"], (key, spread[key])
    for key, interval in spread.items():
        assert interval["std"] > 0 and interval["p05"] < interval["p95"], (key, interval)
    json.dumps(spread)  # goes into the law file next to the law


TINY = ModelArgs(vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=128, max_seq_len=32)


def write_run(out_dir, records: list[dict], model: ModelArgs = TINY, max_steps: int = 100, seq_len: int = 32):
    out_dir.mkdir(parents=True)
    model_section = {k: getattr(model, k) for k in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads",
                                                     "ffn_hidden", "max_seq_len", "tie_embeddings")}
    config = {"model": model_section, "data": {"seq_len": seq_len, "sources": ["/nowhere/train.txt"]},
              "train": {"max_steps": max_steps, "global_batch_tokens": 256}}
    (out_dir / "config.yaml").write_text(yaml.safe_dump(config))
    (out_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return out_dir


def resumed_records() -> list[dict]:
    """A run killed after step 60 and resumed from its step-50 checkpoint, then run once more
    after it finished (which evaluates step 100 again)."""
    first = [{"step": s, "loss": 5.0 - s / 100, "tokens": 256 * s} for s in (10, 20, 30, 40, 50, 60)]
    first.insert(0, {"step": 0, "tokens": 0, "val_loss": 5.6, "val_ppl": 270.4})
    first.insert(6, {"step": 50, "tokens": 12800, "val_loss": 4.2, "val_ppl": 66.7})
    second = [{"step": s, "loss": 5.0 - s / 100, "tokens": 256 * s} for s in (60, 70, 80, 90, 100)]
    second.append({"step": 100, "tokens": 25600, "val_loss": 3.91, "val_ppl": 49.9})
    third = [{"step": 100, "tokens": 25600, "val_loss": 3.9, "val_ppl": 49.4}]
    return first + second + third


def test_read_runs_takes_the_final_validation(tmp_path):
    run = write_run(tmp_path / "run", resumed_records())
    (point,) = read_runs([str(run)])
    assert point == RunPoint(out_dir=str(run), n_params=count_params(TINY), tokens=25600, loss=3.9,
                             flops=float(flops_per_token(TINY, 32)) * 25600)


def test_read_runs_expands_a_sweep_directory(tmp_path):
    wide = ModelArgs(**{**TINY.__dict__, "d_model": 128, "ffn_hidden": 256})
    write_run(tmp_path / "sweep" / "a", resumed_records())
    write_run(tmp_path / "sweep" / "b", resumed_records(), model=wide)
    (tmp_path / "sweep" / "notes").mkdir()  # no config.yaml: not a run, skipped
    points = read_runs([str(tmp_path / "sweep")])
    assert [p.n_params for p in points] == [count_params(TINY), count_params(wide)]


def test_read_runs_errors_name_the_dir_and_the_fix(tmp_path):
    no_val = write_run(tmp_path / "no_val", [{"step": 100, "loss": 4.0, "tokens": 25600}])
    with pytest.raises(PretrainError, match=r"no_val.*eval.every > 0"):
        read_runs([str(no_val)])
    unfinished = write_run(tmp_path / "unfinished", resumed_records()[:9])
    with pytest.raises(PretrainError, match=r"unfinished.*step 50 but train.max_steps=100"):
        read_runs([str(unfinished)])
    with pytest.raises(PretrainError, match=r"empty.*no config.yaml"):
        (tmp_path / "empty").mkdir()
        read_runs([str(tmp_path / "empty")])
    with pytest.raises(PretrainError, match=r"missing_dir does not exist"):
        read_runs([str(tmp_path / "missing_dir")])
    untrained = tmp_path / "untrained"
    write_run(untrained, [])
    (untrained / "metrics.jsonl").unlink()
    with pytest.raises(PretrainError, match=r"metrics.jsonl is missing"):
        read_runs([str(untrained)])


def synthetic_points() -> list[RunPoint]:
    n_params, tokens, losses = isoflop_grid(noise=0.003)
    # +-10% jitter on FLOPs, as rounding steps to whole batches gives
    return [RunPoint(f"run{i}", int(n), int(d), loss, 6 * n * d * (1 + 0.1 * (-1) ** i))
            for i, (n, d, loss) in enumerate(zip(n_params, tokens, losses))]


def test_budget_groups_and_report():
    points = synthetic_points()
    groups = group_by_budget(points)
    assert [len(g) for g in groups] == [5, 5, 5, 5]
    lines = fit_report(points, TRUE, {"alpha": {"std": 0.01, "p05": 0.33, "p95": 0.35}})
    assert len(lines) == 1 + 20 + 1 + 5 + 2
    assert "90% interval [0.33, 0.35]" in "\n".join(lines)
    assert any("at 1.0e+21 FLOPs" in line and "tokens per parameter" in line for line in lines)


def test_plot_isoflops_writes_a_png(tmp_path):
    path = plot_isoflops(synthetic_points(), TRUE, tmp_path / "plots" / "isoflops.png")
    assert path == tmp_path / "plots" / "isoflops.png"
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert [p.name for p in path.parent.iterdir()] == ["isoflops.png"]  # no temporary file left
