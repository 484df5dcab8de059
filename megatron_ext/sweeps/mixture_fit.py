"""Mixture laws: from a swarm's runs (mixture weights -> final figures), a regression per metric, its
cross-validated accuracy, and the mixture that minimises an objective, with its predicted figures.

- Models: "log-linear" (Olmix's default; Data Mixing Laws' exponential family): log y = b + sum_j t_j x_j,
  least squares (scikit-learn's LinearRegression); "gbt": gradient-boosted trees (LightGBM, as RegMix), which
  need many runs (RegMix used 512): with a few dozen their leaves hold few runs each.
- Accuracy: k-fold cross-validation (scikit-learn's KFold), each run predicted by the model fitted without
  its fold: Spearman's rank correlation (scipy) and the mean absolute error, per metric and model.
- Search (RegMix's): many mixtures drawn from the prior (Dirichlet per group of weights that sum to 1, within
  the bounds), each scored by the model fitted on every run; the optimum is the mean of the best `top`.
  Constraints: a metric predicted no worse than at a reference mixture (the base phases file's). The spread
  of a prediction is its standard deviation across the k fold models.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

MODELS = ("log-linear", "gbt")


class FitError(ValueError):
    """One line naming the metric, file or flag."""


@dataclass(frozen=True)
class Runs:
    """The regression's data: one row per run."""

    features: list[str]  # e.g. "phases[1].code"
    groups: list[list[int]]  # feature indices whose weights sum to 1 (one simplex each)
    x: np.ndarray  # runs x features
    metrics: dict[str, np.ndarray]  # name -> per run (NaN where a run has none)
    names: list[str] = field(default_factory=list)  # the runs'

    def rows(self, metric: str) -> np.ndarray:
        return ~np.isnan(self.metrics[metric])


def _make(model: str, n: int):
    if model == "log-linear":
        from sklearn.linear_model import LinearRegression

        return LinearRegression()
    import lightgbm

    # A leaf needs a few runs: LightGBM's default (20 per leaf) would leave a swarm of 24 runs one leaf.
    return lightgbm.LGBMRegressor(
        n_estimators=300, learning_rate=0.05, num_leaves=15, min_child_samples=max(2, n // 12), verbose=-1,
        random_state=0,
    )  # fmt: skip


@dataclass
class Fitted:
    """One metric's model: on every run, and on each fold's training runs (for the spread)."""

    metric: str
    model: str
    full: object
    folds: list = field(default_factory=list)
    spearman: float = math.nan
    mae: float = math.nan
    log_target: bool = False

    def predict(self, x: np.ndarray, which=None) -> np.ndarray:
        y = (which or self.full).predict(x)
        return np.exp(y) if self.log_target else y

    def spread(self, x: np.ndarray) -> np.ndarray:
        return np.std([self.predict(x, m) for m in self.folds], axis=0)


def fit(runs: Runs, metric: str, model: str, folds: int = 5, seed: int = 0) -> Fitted:
    """The model of one metric, with its k-fold cross-validated Spearman and mean absolute error."""
    from scipy.stats import spearmanr
    from sklearn.model_selection import KFold

    if model not in MODELS:
        raise FitError(f"--model {model}: one of {', '.join(MODELS)}")
    rows = runs.rows(metric)
    x, y = runs.x[rows], runs.metrics[metric][rows]
    if len(y) < 4:
        raise FitError(f"metric {metric!r}: {len(y)} runs have it; a fit needs at least 4")
    log_target = model == "log-linear"
    if log_target and not (y > 0).all():
        raise FitError(f"metric {metric!r}: the log-linear model needs positive values (use --model gbt)")
    target = np.log(y) if log_target else y
    k = min(folds, len(y))
    predicted = np.empty_like(y)
    fold_models = []
    for train, test in KFold(k, shuffle=True, random_state=seed).split(x):
        m = _make(model, len(train)).fit(x[train], target[train])
        fold_models.append(m)
        predicted[test] = np.exp(m.predict(x[test])) if log_target else m.predict(x[test])
    result = Fitted(metric, model, _make(model, len(y)).fit(x, target), fold_models, log_target=log_target)
    result.spearman = float(spearmanr(predicted, y).statistic) if np.ptp(y) > 0 else math.nan
    result.mae = float(np.mean(np.abs(predicted - y)))
    return result


def held_out(fitted: Fitted, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(Spearman, mean absolute error) of the model fitted on every run, on runs it never saw."""
    from scipy.stats import spearmanr

    p = fitted.predict(x)
    return float(spearmanr(p, y).statistic), float(np.mean(np.abs(p - y)))


def candidates(runs: Runs, alphas: list[np.ndarray], bounds: dict[int, tuple[float, float]], count: int,
               seed: int) -> np.ndarray:  # fmt: skip
    """count mixtures from the prior (a Dirichlet per group), those outside the bounds (feature index ->
    (low, high)) left out."""
    rng = np.random.default_rng(seed)
    x = np.zeros((count, len(runs.features)))
    for group, alpha in zip(runs.groups, alphas):
        x[:, group] = rng.dirichlet(alpha, size=count)
    keep = np.ones(count, dtype=bool)
    for j, (low, high) in bounds.items():
        keep &= (x[:, j] >= low) & (x[:, j] <= high)
    if keep.sum() == 0:
        raise FitError(f"search: none of {count:,} drawn mixtures lies within the bounds")
    return x[keep]


@dataclass(frozen=True)
class Optimum:
    weights: np.ndarray  # per feature
    predicted: dict[str, tuple[float, float]]  # metric -> (prediction, spread across folds)
    considered: int  # candidates that met the constraints


def search(fitted: dict[str, Fitted], objective: dict[str, float], pool: np.ndarray, top: int,
           no_worse_than: dict[str, float] | None = None) -> Optimum:  # fmt: skip
    """The mean of the `top` candidates with the lowest weighted sum of predicted metrics, among those whose
    constrained metrics are predicted at or below their limits."""
    missing = [m for m in [*objective, *(no_worse_than or {})] if m not in fitted]
    if missing:
        raise FitError(f"objective: no fitted metric {missing[0]!r}; fitted: {', '.join(fitted)}")
    keep = np.ones(len(pool), dtype=bool)
    for metric, limit in (no_worse_than or {}).items():
        keep &= fitted[metric].predict(pool) <= limit
    if keep.sum() == 0:
        raise FitError("search: no drawn mixture is predicted to meet the constraints")
    pool = pool[keep]
    score = sum(w * fitted[m].predict(pool) for m, w in objective.items())
    best = pool[np.argsort(score)[: max(1, min(top, len(pool)))]]
    weights = best.mean(axis=0)
    at = weights[None, :]
    predicted = {m: (float(f.predict(at)[0]), float(f.spread(at)[0])) for m, f in fitted.items()}
    return Optimum(weights, predicted, int(keep.sum()))


def read_regmix_csv(mixtures_csv: str, metrics_csv: str) -> Runs:
    """RegMix's layout: a mixture file (an `index` column, one column per domain weight) and a metrics file
    (`index`, one column per metric); rows are matched by index, the weights normalised to sum to 1."""
    import csv

    def table(path: str) -> dict[str, dict[str, float]]:
        try:
            with open(path, newline="") as f:
                reader = csv.DictReader(f)
                if reader.fieldnames is None or "index" not in reader.fieldnames:
                    raise FitError(f"{path}: no 'index' column (RegMix's layout: index, then one column each)")
                out = {}
                for line, row in enumerate(reader, start=2):
                    try:
                        out[row["index"]] = {k: float(v) for k, v in row.items() if k != "index"}
                    except (TypeError, ValueError):
                        raise FitError(f"{path}:{line}: a value that is not a number") from None
                return out
        except OSError as e:
            raise FitError(f"{path}: {e.strerror}") from None

    mix, met = table(mixtures_csv), table(metrics_csv)
    if not mix:
        raise FitError(f"{mixtures_csv}: no rows")
    common = [i for i in mix if i in met]
    if not common:
        raise FitError(f"{metrics_csv}: no index in common with {mixtures_csv}")
    features = list(next(iter(mix.values())))
    x = np.array([[mix[i][f] for f in features] for i in common])
    sums = x.sum(axis=1, keepdims=True)
    if (sums <= 0).any():
        raise FitError(f"{mixtures_csv}: a row whose weights sum to 0")
    metric_names = list(next(iter(met.values())))
    metrics = {m: np.array([met[i].get(m, math.nan) for i in common]) for m in metric_names}
    return Runs(features, [list(range(len(features)))], x / sums, metrics, common)
