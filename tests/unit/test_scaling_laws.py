"""The published laws: allocations consistent with the loss they minimise, and the papers' numbers."""

from __future__ import annotations

import math

import pytest
from scipy.optimize import minimize_scalar

from pretrain.errors import PretrainError
from pretrain.scaling.laws import (
    BESIROGLU,
    HOFFMANN,
    PUBLISHED_LAWS,
    ScalingLaw,
    deepseek_batch_tokens,
    deepseek_lr,
    effective_tokens,
    inference_aware,
    load_law,
    save_law,
)


@pytest.mark.parametrize("law", PUBLISHED_LAWS.values(), ids=PUBLISHED_LAWS)
@pytest.mark.parametrize("flops", [1e18, 1e21, 5.76e23])
def test_compute_optimal_allocation_minimises_the_loss_at_fixed_compute(law, flops):
    n_opt, d_opt = law.compute_optimal(flops)
    assert 6 * n_opt * d_opt == pytest.approx(flops)
    numeric = minimize_scalar(lambda log_n: law.loss(math.exp(log_n), flops / (6 * math.exp(log_n))),
                              bounds=(math.log(1e3), math.log(1e13)), method="bounded", options={"xatol": 1e-8})
    assert math.exp(numeric.x) == pytest.approx(n_opt, rel=1e-3)
    # and the inverse relations agree with it
    assert law.optimal_tokens(n_opt) == pytest.approx(d_opt, rel=1e-9)
    assert law.optimal_params(d_opt) == pytest.approx(n_opt, rel=1e-9)


def test_the_default_replication_gives_about_20_tokens_per_parameter_the_paper_fit_far_more():
    # Chinchilla itself: 70B parameters on 1.4T tokens at ~5.76e23 FLOPs (Hoffmann et al. 2022)
    n, d = BESIROGLU.compute_optimal(5.76e23)
    assert 15 < d / n < 25 and 5e10 < n < 1e11
    n, d = HOFFMANN.compute_optimal(5.76e23)
    assert d / n > 60  # the inconsistency Besiroglu et al. 2024 point out
    # Hoffmann et al. table 3 (approaches 1 and 2): 1e21 FLOPs is between their 1B (1.21e20) and 10B
    # (1.23e22) rows, ~2.8B on an N ~ C^0.5 line
    assert 2.2e9 < BESIROGLU.compute_optimal(1e21)[0] < 3.5e9


def test_deepseek_batch_and_learning_rate_formulas():
    # DeepSeek LLM eq. 1 at their 7B run's compute scale, ~1e23 with their M
    assert deepseek_batch_tokens(1e23) == pytest.approx(0.2920 * 1e23**0.3271)
    assert deepseek_lr(1e23) == pytest.approx(0.3118 * 1e23**-0.125)
    # more compute: larger batches, smaller learning rates
    assert deepseek_batch_tokens(1e22) < deepseek_batch_tokens(1e23)
    assert deepseek_lr(1e22) > deepseek_lr(1e23)


def test_repeated_tokens_lose_worth_beyond_a_few_epochs():
    unique = 1e9
    assert effective_tokens(unique, 5e8) == 5e8
    assert effective_tokens(unique, 4e9) > 0.85 * 4e9  # up to ~4 epochs nearly as good as new
    assert effective_tokens(unique, 40e9) < 0.5 * 40e9
    assert effective_tokens(unique, 1e15) == pytest.approx(unique * (1 + 15.4), rel=1e-6)  # the ceiling


def test_inference_aware_plan_is_smaller_and_cheaper_over_the_model_life():
    law, flops, served = BESIROGLU, 1e22, 2e12
    assert inference_aware(law, flops, 0.0) == law.compute_optimal(flops)
    n, d = inference_aware(law, flops, served)
    n_opt, _ = law.compute_optimal(flops)
    assert n < n_opt and 6 * n * d == pytest.approx(flops)
    # Sardana & Frankle: among models of this quality, this one costs least to train and serve
    quality = law.loss(n, d)

    def life_cost(size: float) -> float:
        tokens = (law.B / (quality - law.E - law.A / size**law.alpha)) ** (1 / law.beta)
        return size * (6 * tokens + 2 * served)

    assert life_cost(n) <= min(life_cost(n * 0.9), life_cost(n * 1.1))


def test_law_files_round_trip_and_bad_names_are_explained(tmp_path):
    law = ScalingLaw("mine", E=1.5, A=300.0, B=900.0, alpha=0.3, beta=0.35)
    path = save_law(law, tmp_path / "law.json", {"uncertainty": {}})
    loaded = load_law(str(path))
    assert (loaded.E, loaded.A, loaded.B, loaded.alpha, loaded.beta) == (1.5, 300.0, 900.0, 0.3, 0.35)
    assert load_law("chinchilla") is HOFFMANN
    with pytest.raises(PretrainError, match="neither a published law"):
        load_law("kaplan")
    (tmp_path / "bad.json").write_text('{"law": {"E": 1}}')
    with pytest.raises(PretrainError, match="bad.json is not a law file"):
        load_law(str(tmp_path / "bad.json"))
