"""Published scaling laws the planner decides with, each implemented from its paper.

- Hoffmann et al. 2022, "Training Compute-Optimal Large Language Models" (Chinchilla,
  arXiv:2203.15556): the parametric loss L(N, D) = E + A / N^alpha + B / D^beta (section 3.3,
  approach 3, eq. 2 and 4) and its compute-optimal allocation under C = 6 N D.
- Besiroglu et al. 2024, "Chinchilla Scaling: A replication attempt" (arXiv:2404.10102): the same
  law refitted to the paper's own data points (their table 1).
- DeepSeek-AI 2024, "DeepSeek LLM: Scaling Open-Source Language Models with Longtermism"
  (arXiv:2401.02954, section 3.1): compute-optimal batch size and learning rate.
- Muennighoff et al. 2023, "Scaling Data-Constrained Language Models" (arXiv:2305.16264, eq. 5):
  the value of repeated tokens.
- Sardana & Frankle 2023, "Beyond Chinchilla-Optimal: Accounting for Inference in Language Model
  Scaling Laws" (arXiv:2401.00448): a smaller model trained longer when inference is expected.

Why the replication's constants are the default: the paper's own approach-3 constants imply a
compute-optimal ratio that drifts far above the ~20 tokens per parameter that its approaches 1
and 2 (and the Chinchilla model itself: 70B parameters, 1.4T tokens) found: ~50 tokens per
parameter at 1e21 FLOPs, ~90 at Chinchilla's own 5.76e23. Besiroglu et al. show the published fit is not the optimum of the
paper's own objective on the paper's data (its reported confidence intervals are also implausibly
narrow); their refit gives ~20 tokens per parameter, agreeing with approaches 1 and 2."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from pretrain.errors import PretrainError
from pretrain.resilience.atomic_dir import write_file


@dataclass(frozen=True)
class ScalingLaw:
    """L(N, D) = E + A / N^alpha + B / D^beta: final loss (nats per token) of a model with N
    parameters trained on D tokens, compute-optimally scheduled."""

    name: str
    E: float
    A: float
    B: float
    alpha: float
    beta: float
    source: str = ""

    def loss(self, n_params: float, tokens: float) -> float:
        return self.E + self.A / n_params**self.alpha + self.B / tokens**self.beta

    def compute_optimal(self, flops: float) -> tuple[float, float]:
        """(N, D) minimising L(N, D) subject to 6 N D = `flops` (Hoffmann et al. 2022, eq. 4):
        N = G (C/6)^a, D = (C/6)^b / G with G = (alpha A / (beta B))^(1 / (alpha + beta)),
        a = beta / (alpha + beta), b = alpha / (alpha + beta)."""
        total = self.alpha + self.beta
        g = (self.alpha * self.A / (self.beta * self.B)) ** (1 / total)
        n = g * (flops / 6) ** (self.beta / total)
        return n, flops / (6 * n)

    def optimal_tokens(self, n_params: float) -> float:
        """The token count for which `n_params` is the compute-optimal size (eq. 4 inverted):
        beta B / D^beta = alpha A / N^alpha at the optimum."""
        return (self.beta * self.B / (self.alpha * self.A) * n_params**self.alpha) ** (1 / self.beta)

    def optimal_params(self, tokens: float) -> float:
        """The model size for which `tokens` is the compute-optimal token count."""
        return (self.alpha * self.A / (self.beta * self.B) * tokens**self.beta) ** (1 / self.alpha)

    def to_dict(self) -> dict:
        return asdict(self)


# Hoffmann et al. 2022, section 3.3 (approach 3), fitted on their 400+ training runs.
HOFFMANN = ScalingLaw("chinchilla", E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28,
                      source="Hoffmann et al. 2022 (arXiv:2203.15556), approach 3")
# Besiroglu et al. 2024, table 1: the refit of the same law to Hoffmann et al.'s data.
BESIROGLU = ScalingLaw("besiroglu", E=1.8172, A=482.01, B=2085.43, alpha=0.3478, beta=0.3658,
                       source="Besiroglu et al. 2024 (arXiv:2404.10102), table 1")
PUBLISHED_LAWS = {law.name: law for law in (BESIROGLU, HOFFMANN)}
DEFAULT_LAW = BESIROGLU.name


def load_law(name_or_path: str) -> ScalingLaw:
    """A published law by name (besiroglu, chinchilla) or a law file that `pretrain scaling fit` wrote."""
    if name_or_path in PUBLISHED_LAWS:
        return PUBLISHED_LAWS[name_or_path]
    path = Path(name_or_path)
    if not path.is_file():
        raise PretrainError(f"--law {name_or_path!r} is neither a published law ({', '.join(PUBLISHED_LAWS)}) nor "
                            "a law file; fit one with `pretrain scaling fit RUN_DIRS... --out law.json`")
    try:
        data = json.loads(path.read_text())
        fields = {key: data["law"][key] for key in ("E", "A", "B", "alpha", "beta")}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PretrainError(f"{path} is not a law file of `pretrain scaling fit` (needs law.E, law.A, law.B, "
                            f"law.alpha, law.beta): {exc!r}") from None
    return ScalingLaw(name=data["law"].get("name", path.stem), source=f"fitted: {path}",
                      **{k: float(v) for k, v in fields.items()})


def save_law(law: ScalingLaw, path: str | Path, extra: dict | None = None) -> Path:
    """Write `law` (and `extra`, e.g. uncertainties) as JSON atomically."""
    return write_file(path, json.dumps({"law": law.to_dict(), **(extra or {})}, indent=2) + "\n")


def deepseek_batch_tokens(flops: float) -> float:
    """Compute-optimal global batch in tokens, B = 0.2920 C^0.3271 (DeepSeek LLM, eq. 1), where
    C = M D with M the non-embedding FLOPs per token (attention included)."""
    return 0.2920 * flops**0.3271


def deepseek_lr(flops: float) -> float:
    """Compute-optimal peak learning rate, eta = 0.3118 C^-0.1250 (DeepSeek LLM, eq. 1), fitted
    for AdamW (beta2 0.95, weight decay 0.1) with a multi-step schedule and 2000 warmup steps."""
    return 0.3118 * flops**-0.1250


# Muennighoff et al. 2023, eq. 5: R*_D, the number of repetitions over which the worth of
# repeated tokens decays (by 1/e), fitted on their 400+ runs.
REPEAT_DECAY = 15.4
# Their finding: up to ~4 epochs, repeated data is nearly as good as unique data.
SAFE_EPOCHS = 4.0


def effective_tokens(unique_tokens: float, tokens_used: float) -> float:
    """Tokens of new data that `tokens_used` drawn from `unique_tokens` are worth (eq. 5):
    D' = U + U R* (1 - exp(-R / R*)) with R = tokens_used / U - 1 repetitions."""
    if tokens_used <= unique_tokens:
        return tokens_used
    repeats = tokens_used / unique_tokens - 1
    return unique_tokens + unique_tokens * REPEAT_DECAY * (1 - math.exp(-repeats / REPEAT_DECAY))


def inference_aware(law: ScalingLaw, train_flops: float, inference_tokens: float) -> tuple[float, float]:
    """(N, D) using `train_flops` = 6 N D on Sardana & Frankle's frontier: the point that,
    among models of its quality, minimises training + inference FLOPs 6 N D + 2 N D_inf.

    At their optimum the gradients of cost and loss are parallel:
    (6 D + 2 D_inf) / (6 N) = (alpha A N^(-alpha-1)) / (beta B D^(-beta-1)).
    On the curve D = C / (6 N) the log of left over right side grows as (alpha + beta) log N, so
    it crosses zero once, and bisection in log N finds it. With D_inf = 0 this is the Chinchilla optimum."""
    if inference_tokens <= 0:
        return law.compute_optimal(train_flops)

    def excess(log_n: float) -> float:
        n = math.exp(log_n)
        d = train_flops / (6 * n)
        cost_ratio = (6 * d + 2 * inference_tokens) / (6 * n)
        loss_ratio = (law.alpha * law.A * n ** (-law.alpha - 1)) / (law.beta * law.B * d ** (-law.beta - 1))
        return math.log(cost_ratio) - math.log(loss_ratio)

    high = math.log(law.compute_optimal(train_flops)[0])  # inference only ever makes the model smaller
    low = high - math.log(1e6)
    for _ in range(200):
        middle = (low + high) / 2
        if excess(middle) > 0:  # excess grows with N along the curve: the root lies below
            high = middle
        else:
            low = middle
    n = math.exp((low + high) / 2)
    return n, train_flops / (6 * n)
