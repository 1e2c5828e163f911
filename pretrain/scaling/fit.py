"""Fitting L(N, D) = E + A / N^alpha + B / D^beta to one's own training runs.

This is approach 3 of Hoffmann et al. 2022, "Training Compute-Optimal Large Language Models"
(Chinchilla, arXiv:2203.15556, section 3.3 and appendix D.2): minimise the Huber loss of the
log-space residuals

    LSE(a - alpha log N, b - beta log D, e) - log L,    A = exp(a), B = exp(b), E = exp(e),

with L-BFGS-B from a grid of initialisations, keeping the best optimum. Besiroglu et al. 2024
(arXiv:2404.10102) showed the paper's own fit stopped before the optimum; the tight tolerances,
the rescaled objective and the centred logs below are there so this one does not.

Typical use: train an IsoFLOP grid (a few models per FLOP budget), then
`points = read_runs(dirs)`, `law = fit_law(...)`, `bootstrap(...)`, `plot_isoflops(...)`."""

from __future__ import annotations

import dataclasses
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from scipy.optimize import minimize

from pretrain.errors import PretrainError
from pretrain.models import DEFAULT_MODEL, count_params, flops_per_token, model_spec
from pretrain.resilience.atomic_dir import write_file
from pretrain.scaling.laws import ScalingLaw

CONSTANTS = ("E", "A", "B", "alpha", "beta")
MIN_RUNS = len(CONSTANTS)  # one free constant per run at least, or the fit is underdetermined

# Hoffmann et al. 2022, appendix D.2: the grid of initialisations (a, b, e, alpha, beta).
GRID_A = np.arange(0.0, 25.1, 5.0)
GRID_B = np.arange(0.0, 25.1, 5.0)
GRID_E = np.arange(-1.0, 1.01, 0.5)
GRID_ALPHA = np.arange(0.0, 2.01, 0.5)
GRID_BETA = np.arange(0.0, 2.01, 0.5)
# All 4,500 grid points are scored in one vectorised pass; L-BFGS-B then starts from the best
# few. Optimising from every grid point would cost ~minutes and the rest end in the same optima.
OPTIMISED_STARTS = 12
BOOTSTRAP_STARTS = 3  # per resample, besides the warm start from the full-data fit
_LBFGS_OPTIONS = {"maxiter": 2000, "ftol": 1e-13, "gtol": 1e-10}
# (a_c, b_c, e, alpha, beta): exponents in [0, 4] (a loss that grows with N or D is no law to plan
# with; published ones are ~0.3), the rest wide but finite, so that a degenerate resample of few
# distinct runs cannot run off to constants that overflow.
FIT_BOUNDS = [(-50.0, 50.0), (-50.0, 50.0), (-10.0, 5.0), (0.0, 4.0), (0.0, 4.0)]


@dataclass(frozen=True)
class RunPoint:
    """One finished training run: N parameters trained on D tokens to final validation `loss`,
    costing `flops` = flops_per_token(model, seq_len) * tokens."""

    out_dir: str
    n_params: int
    tokens: int
    loss: float
    flops: float


# ---------------------------------------------------------------------------------------- runs

def read_runs(run_dirs: Sequence[str]) -> list[RunPoint]:
    """One RunPoint per run directory written by `pretrain train`: N from its config.yaml, D and
    the loss from the final validation record of its metrics.jsonl.

    A directory without config.yaml whose subdirectories have one stands for those subdirectories
    (e.g. the parent directory of a sweep)."""
    return [_read_run(run_dir) for run_dir in _expand_run_dirs(run_dirs)]


def _expand_run_dirs(run_dirs: Sequence[str]) -> list[Path]:
    expanded = []
    for run_dir in map(Path, run_dirs):
        if (run_dir / "config.yaml").is_file():
            expanded.append(run_dir)
            continue
        if not run_dir.is_dir():
            raise PretrainError(f"{run_dir} does not exist; pass the out_dir of each `pretrain train` run")
        children = sorted(p for p in run_dir.iterdir() if (p / "config.yaml").is_file())
        if not children:
            raise PretrainError(f"{run_dir} is not a run directory (no config.yaml in it or in its subdirectories); "
                                "pass the out_dir of each `pretrain train` run, or a directory holding them")
        expanded.extend(children)
    return expanded


def _read_run(run_dir: Path) -> RunPoint:
    config_path = run_dir / "config.yaml"
    try:
        config = yaml.safe_load(config_path.read_text()) or {}
        model_section, seq_len = config["model"], int(config["data"]["seq_len"])
        args_class = model_spec(model_section.get("name", DEFAULT_MODEL)).args_class
        known = {f.name for f in dataclasses.fields(args_class)}
        args = args_class(**{k: v for k, v in model_section.items() if k in known})
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError) as exc:
        raise PretrainError(f"{config_path} is not the config.yaml of a `pretrain train` run (needs a model: section "
                            f"and data.seq_len): {exc!r}") from None

    final = _final_validation(run_dir / "metrics.jsonl")
    max_steps = (config.get("train") or {}).get("max_steps")
    # The trainer always evaluates at its last step; an earlier last evaluation means the run
    # stopped early, and its loss mid-schedule would bias the fit (the schedule must match D).
    if max_steps is not None and final["step"] < max_steps:
        raise PretrainError(f"{run_dir}: the last val_loss is at step {final['step']} but train.max_steps={max_steps}; "
                            "the run did not finish: resume it with `pretrain train` or leave it out of the fit")
    if "tokens" not in final:
        raise PretrainError(f"{run_dir / 'metrics.jsonl'}: the validation record at step {final['step']} has no "
                            "'tokens'; it was written by an older `pretrain train`: rerun the final evaluation")
    tokens = int(final["tokens"])
    return RunPoint(out_dir=str(run_dir), n_params=count_params(args), tokens=tokens, loss=float(final["val_loss"]),
                    flops=float(flops_per_token(args, seq_len)) * tokens)


def _final_validation(metrics_path: Path) -> dict:
    """The validation record with the largest step; of repeats (a resumed run logs a step again)
    the one written last."""
    if not metrics_path.is_file():
        raise PretrainError(f"{metrics_path} is missing: {metrics_path.parent} has not been trained; "
                            "run `pretrain train` with this out_dir first")
    final = None
    with metrics_path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                raise PretrainError(f"{metrics_path}:{number} is not a JSON record ({line[:60]!r}); "
                                    "delete that line (a run killed mid-write leaves one) and fit again") from None
            if "val_loss" in record and (final is None or record["step"] >= final["step"]):
                final = record
    if final is None:
        raise PretrainError(f"{metrics_path.parent} has no val_loss record in metrics.jsonl; train it with "
                            "eval.every > 0 so it records val_loss at its last step")
    return final


# ----------------------------------------------------------------------------------------- fit

def fit_law(n_params: Sequence[float], tokens: Sequence[float], losses: Sequence[float], *,
            huber_delta: float = 1e-3, name: str = "fitted") -> ScalingLaw:
    """The L(N, D) = E + A / N^alpha + B / D^beta closest to the runs, by approach 3 of Hoffmann
    et al. 2022 (section 3.3, appendix D.2): Huber loss (delta = `huber_delta`) on log-loss
    residuals, L-BFGS-B from the best points of their grid of initialisations."""
    data = _FitData.of(n_params, tokens, losses, huber_delta)
    theta = data.best_of(data.grid_starts(OPTIMISED_STARTS))
    return data.to_law(theta, name=name,
                       source=f"fitted to {data.count} runs (Hoffmann et al. 2022 approach 3, Huber delta {huber_delta:g})")


def bootstrap(n_params: Sequence[float], tokens: Sequence[float], losses: Sequence[float], *,
              samples: int = 100, seed: int = 0, best: ScalingLaw | None = None,
              huber_delta: float = 1e-3) -> dict[str, dict[str, float]]:
    """Uncertainty of the fitted constants: refit on `samples` resamples of the runs drawn with
    replacement; for each of E, A, B, alpha, beta return {"std", "p05", "p95"} (a 90% interval).

    Each refit starts from `best` (the fit to all runs; computed when not given) and from the best
    few grid points of its resample, which is enough because resamples move the optimum little."""
    if samples < 2:
        raise PretrainError(f"bootstrap samples={samples} gives no spread; use at least 2 (100 is typical)")
    full = _FitData.of(n_params, tokens, losses, huber_delta)
    best = best or fit_law(n_params, tokens, losses, huber_delta=huber_delta)
    rng = np.random.default_rng(seed)
    fitted = []
    for _ in range(samples):
        chosen = rng.integers(0, full.count, full.count)
        while np.unique(chosen).size < MIN_RUNS:  # fewer distinct runs than constants: no fit
            chosen = rng.integers(0, full.count, full.count)
        data = full.resample(chosen)
        theta = data.best_of([data.from_law(best), *data.grid_starts(BOOTSTRAP_STARTS)])
        law = data.to_law(theta, name="bootstrap", source="")
        fitted.append([getattr(law, key) for key in CONSTANTS])
    values = np.array(fitted)
    return {key: {"std": float(np.std(values[:, i], ddof=1)),
                  "p05": float(np.percentile(values[:, i], 5)),
                  "p95": float(np.percentile(values[:, i], 95))}
            for i, key in enumerate(CONSTANTS)}


class _FitData:
    """The runs in log space. The optimiser works on (a_c, b_c, e, alpha, beta) with
    a_c = a - alpha mean(log N), b_c = b - beta mean(log D): with log N ~ 18 and a spread of a few
    units, a and alpha are nearly collinear, which leaves L-BFGS-B on a long flat ridge."""

    def __init__(self, n_params: np.ndarray, tokens: np.ndarray, losses: np.ndarray, huber_delta: float):
        self.n_params, self.tokens, self.losses, self.huber_delta = n_params, tokens, losses, huber_delta
        self.count = losses.size
        self.centre_n, self.centre_d = float(np.mean(np.log(n_params))), float(np.mean(np.log(tokens)))
        self.log_n, self.log_d = np.log(n_params) - self.centre_n, np.log(tokens) - self.centre_d
        self.log_loss = np.log(losses)

    @staticmethod
    def of(n_params, tokens, losses, huber_delta: float) -> _FitData:
        arrays = [np.asarray(x, dtype=float) for x in (n_params, tokens, losses)]
        if len({a.shape for a in arrays}) != 1 or arrays[0].ndim != 1:
            raise PretrainError(f"n_params, tokens and losses must be equally long lists; got lengths "
                                f"{[a.size for a in arrays]}")
        if arrays[0].size < MIN_RUNS:
            raise PretrainError(f"fitting L(N, D) needs at least {MIN_RUNS} runs (it has {MIN_RUNS} free constants: "
                                f"{', '.join(CONSTANTS)}); got {arrays[0].size}: train more runs, ideally 3+ sizes "
                                "at each of 3+ FLOP budgets")
        for name, values in zip(("n_params", "tokens", "losses"), arrays):
            if not np.all(np.isfinite(values) & (values > 0)):
                raise PretrainError(f"{name} must be positive and finite for a fit in log space; got {values.tolist()}")
        if huber_delta <= 0:
            raise PretrainError(f"huber_delta={huber_delta} must be positive (Hoffmann et al. use 1e-3)")
        return _FitData(arrays[0], arrays[1], arrays[2], huber_delta=huber_delta)

    def resample(self, chosen: np.ndarray) -> _FitData:
        return _FitData(self.n_params[chosen], self.tokens[chosen], self.losses[chosen], self.huber_delta)

    def objective(self, thetas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Mean Huber loss over the runs, divided by delta^2 so it is O(1) (L-BFGS-B's ftol is
        relative to max(|f|, 1); the unscaled ~1e-6 would stop it at once), and its gradient, for
        thetas of shape (..., 5). Called thousands of times per fit, hence the hand-written LSE."""
        a, b, e, alpha, beta = (thetas[..., i, None] for i in range(5))
        term_n, term_d = a - alpha * self.log_n, b - beta * self.log_d
        term_e = np.broadcast_to(e, term_n.shape)
        peak = np.maximum(np.maximum(term_n, term_d), term_e)
        exp_n, exp_d, exp_e = np.exp(term_n - peak), np.exp(term_d - peak), np.exp(term_e - peak)
        total = exp_n + exp_d + exp_e
        residual = peak + np.log(total) - self.log_loss
        delta = self.huber_delta
        size = np.abs(residual)
        huber = np.where(size <= delta, 0.5 * residual**2, delta * (size - 0.5 * delta))
        scale = 1.0 / (delta * delta * self.count)
        slope = np.clip(residual, -delta, delta) * (scale / total)  # d huber / d residual, over the softmax sum
        weight_n, weight_d = slope * exp_n, slope * exp_d  # softmax weights times the slope
        grad = np.stack([weight_n.sum(-1), weight_d.sum(-1), (slope * exp_e).sum(-1),
                         -(weight_n * self.log_n).sum(-1), -(weight_d * self.log_d).sum(-1)], axis=-1)
        return huber.sum(-1) * scale, grad

    def grid_starts(self, keep: int) -> list[np.ndarray]:
        """The `keep` best points of Hoffmann et al.'s grid, in centred coordinates."""
        a, b, e, alpha, beta = (g.ravel() for g in np.meshgrid(GRID_A, GRID_B, GRID_E, GRID_ALPHA, GRID_BETA,
                                                               indexing="ij"))
        grid = np.stack([a - alpha * self.centre_n, b - beta * self.centre_d, e, alpha, beta], axis=-1)
        values, _ = self.objective(grid)
        return list(grid[np.argsort(values)[:keep]])

    def from_law(self, law: ScalingLaw) -> np.ndarray:
        return np.array([math.log(law.A) - law.alpha * self.centre_n, math.log(law.B) - law.beta * self.centre_d,
                         math.log(law.E), law.alpha, law.beta])

    def best_of(self, starts: Sequence[np.ndarray]) -> np.ndarray:
        """L-BFGS-B from each start; the lowest optimum, within FIT_BOUNDS."""
        bounds = FIT_BOUNDS
        best = None
        for start in starts:
            result = minimize(self.objective, start, jac=True, method="L-BFGS-B",
                              bounds=bounds, options=_LBFGS_OPTIONS)
            if np.isfinite(result.fun) and (best is None or result.fun < best.fun):
                best = result
        assert best is not None, "every start of the fit diverged"
        return best.x

    def to_law(self, theta: np.ndarray, name: str, source: str) -> ScalingLaw:
        a_centred, b_centred, e, alpha, beta = (float(v) for v in theta)
        return ScalingLaw(name=name, E=math.exp(e), A=math.exp(a_centred + alpha * self.centre_n),
                          B=math.exp(b_centred + beta * self.centre_d), alpha=alpha, beta=beta, source=source)


# ------------------------------------------------------------------------------------ reporting

def group_by_budget(points: Sequence[RunPoint], tolerance: float = 1.25) -> list[list[RunPoint]]:
    """Runs grouped by FLOP budget: sorted by FLOPs, a run joins the current group while its
    FLOPs are within `tolerance` times the group's smallest (an IsoFLOP grid rounds steps)."""
    groups: list[list[RunPoint]] = []
    for point in sorted(points, key=lambda p: p.flops):
        if groups and point.flops <= groups[-1][0].flops * tolerance:
            groups[-1].append(point)
        else:
            groups.append([point])
    return groups


def _budget(group: Sequence[RunPoint]) -> float:
    return math.exp(sum(math.log(p.flops) for p in group) / len(group))


def plot_isoflops(points: Sequence[RunPoint], law: ScalingLaw, path: str | Path) -> Path:
    """A PNG with two panels: loss against parameters per FLOP budget with the law's IsoFLOP
    curves L(N, C / 6N) and their minima (as Hoffmann et al. 2022, figure 3, left), and the law's
    compute-optimal N(C) with each budget's best observed run (figure 3, centre)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a cluster node
    import matplotlib.pyplot as plt

    groups = group_by_budget(points)
    colors = plt.cm.viridis(np.linspace(0, 0.9, max(len(groups), 1)))
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 5))
    for group, color in zip(groups, colors):
        budget = _budget(group)
        sizes = np.array([p.n_params for p in group], dtype=float)
        optimal_n, optimal_d = law.compute_optimal(budget)
        low, high = min(sizes.min(), optimal_n) / 2, max(sizes.max(), optimal_n) * 2
        curve_n = np.geomspace(low, high, 200)
        left.plot(curve_n, [law.loss(n, budget / (6 * n)) for n in curve_n], color=color, lw=1)
        left.scatter(sizes, [p.loss for p in group], color=color, label=f"{budget:.1e} FLOPs", zorder=3)
        left.scatter([optimal_n], [law.loss(optimal_n, optimal_d)], color=color, marker="*", s=150,
                     edgecolor="black", zorder=4)
    left.set(xscale="log", xlabel="parameters N", ylabel="final validation loss",
             title="IsoFLOP profiles (lines: fitted law, stars: its optimum)")
    left.legend(fontsize=8)

    budgets = [_budget(g) for g in groups]
    frontier_c = np.geomspace(min(budgets) / 3, max(budgets) * 1e3, 200)
    right.plot(frontier_c, [law.compute_optimal(c)[0] for c in frontier_c], color="black",
               label=f"fitted N_opt(C), exponent {law.beta / (law.alpha + law.beta):.3f}")
    best_runs = [min(g, key=lambda p: p.loss) for g in groups]
    right.scatter(budgets, [p.n_params for p in best_runs], color=colors[:len(groups)], zorder=3,
                  label="best run per budget")
    right.set(xscale="log", yscale="log", xlabel="training FLOPs C", ylabel="parameters N",
              title="compute-optimal model size")
    right.legend(fontsize=8)
    figure.tight_layout()

    png = io.BytesIO()
    figure.savefig(png, format="png", dpi=120)
    plt.close(figure)
    return write_file(path, png.getvalue())


def fit_report(points: Sequence[RunPoint], law: ScalingLaw,
               uncertainty: dict[str, dict[str, float]] | None = None) -> list[str]:
    """Console lines: the runs with observed and fitted loss, the constants with their bootstrap
    uncertainty, and the compute-optimal tokens per parameter the law implies."""
    lines = [f"{'params':>10} {'tokens':>10} {'FLOPs':>9} {'loss':>7} {'fitted':>7} {'resid':>8}  run"]
    by_budget = [p for group in group_by_budget(points) for p in sorted(group, key=lambda p: p.n_params)]
    for p in by_budget:
        fitted = law.loss(p.n_params, p.tokens)
        lines.append(f"{p.n_params:>10.3e} {p.tokens:>10.3e} {p.flops:>9.2e} {p.loss:>7.4f} {fitted:>7.4f} "
                     f"{p.loss - fitted:>+8.4f}  {p.out_dir}")
    lines.append(f"L(N, D) = E + A / N^alpha + B / D^beta, {law.source or law.name}:")
    for key in CONSTANTS:
        value = getattr(law, key)
        spread = ""
        if uncertainty and key in uncertainty:
            u = uncertainty[key]
            spread = f"  std {u['std']:.4g}, 90% interval [{u['p05']:.4g}, {u['p95']:.4g}]"
        lines.append(f"  {key:>5} = {value:.4g}{spread}")
    budgets = sorted({1e21, max((p.flops for p in points), default=1e21)})
    for budget in budgets:
        n, d = law.compute_optimal(budget)
        lines.append(f"  at {budget:.1e} FLOPs: N_opt {n:.3e}, D_opt {d:.3e}, {d / n:.1f} tokens per parameter")
    return lines
