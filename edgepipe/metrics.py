"""Task metrics with 95% intervals, and the rule that judges an accuracy drop against its budget.

- A score (accuracy, token accuracy) on n rows: the Jeffreys interval, Beta(k + 1/2, n - k + 1/2).
- Macro-F1: a bootstrap over rows (seeded, so a report is reproducible).
- A share of words tagged right (token classification): a bootstrap over rows, since the words of
  one row are not independent of each other.
- A drop against FP32 on the same rows: the rows split into lost (FP32 right, candidate wrong),
  gained and unchanged; the interval comes from the Dirichlet posterior of those three shares
  with the same Jeffreys prior. It stays honest at zero flips (0 of 100 rows is not "exactly 0").
- The budget rule: a drop whose interval lies at or under the budget is within it; one whose
  interval lies above it is over; one whose interval straddles it is unresolved, with an
  estimate of how many more rows would resolve it (the interval narrows as 1/sqrt(rows)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

DRAWS = 4000  # posterior draws / bootstrap resamples per interval
LEVEL = 0.95
WITHIN, OVER, UNRESOLVED = "within", "over", "unresolved"
IGNORED = -100  # a label that is neither trained on nor judged (a token that is not a word's first, padding)


@dataclass(frozen=True)
class Interval:
    value: float
    low: float
    high: float

    def to_dict(self) -> dict:
        return {"value": round(self.value, 6), "low": round(self.low, 6), "high": round(self.high, 6)}

    def __str__(self) -> str:
        return f"{self.value:.4f} [{self.low:.4f}, {self.high:.4f}]"


def _quantiles(samples: np.ndarray, value: float) -> Interval:
    tail = (1 - LEVEL) / 2
    low, high = np.quantile(samples, [tail, 1 - tail])
    return Interval(float(value), float(min(low, value)), float(max(high, value)))


def proportion(hits: int, rows: int, seed: int = 0) -> Interval:
    """A share of `rows` (accuracy): the Jeffreys interval."""
    rng = np.random.default_rng(seed)
    return _quantiles(rng.beta(hits + 0.5, rows - hits + 0.5, DRAWS), hits / max(rows, 1))


def clustered_proportion(hits: np.ndarray, counts: np.ndarray, seed: int = 0) -> Interval:
    """sum(hits) / sum(counts) over rows (words tagged right / words), bootstrapped over rows."""
    hits, counts = np.asarray(hits, dtype=np.float64), np.asarray(counts, dtype=np.float64)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(counts), size=(DRAWS, len(counts)))
    draws = hits[picks].sum(axis=1) / np.maximum(counts[picks].sum(axis=1), 1)
    return _quantiles(draws, float(hits.sum() / max(counts.sum(), 1)))


def macro_f1_value(pred: np.ndarray, labels: np.ndarray, classes: int) -> float:
    """Mean over the classes present (in labels or predictions) of each class's F1."""
    tp = np.bincount(labels[pred == labels], minlength=classes).astype(float)
    predicted = np.bincount(pred, minlength=classes).astype(float)
    actual = np.bincount(labels, minlength=classes).astype(float)
    present = (predicted + actual) > 0
    f1 = np.divide(2 * tp, predicted + actual, out=np.zeros(classes), where=present)
    return float(f1[present].mean()) if present.any() else 0.0


def macro_f1(pred: np.ndarray, labels: np.ndarray, seed: int = 0) -> Interval:
    """Macro-F1 with a bootstrap interval over rows."""
    classes = int(max(pred.max(initial=0), labels.max(initial=0))) + 1
    rng = np.random.default_rng(seed)
    n = len(labels)
    draws = [macro_f1_value(pred[idx], labels[idx], classes)
             for idx in rng.integers(0, n, size=(min(DRAWS, 1000), n))]
    return _quantiles(np.asarray(draws), macro_f1_value(pred, labels, classes))


def bootstrap_mean(values: np.ndarray, seed: int = 0) -> Interval:
    """The mean of per-unit values (e.g. one per text window) with a bootstrap interval over units."""
    values = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    draws = values[rng.integers(0, len(values), size=(DRAWS, len(values)))].mean(axis=1)
    return _quantiles(draws, float(values.mean()))


def paired_drop(losses: int, gains: int, rows: int, seed: int = 0) -> Interval:
    """(losses - gains) / rows with its interval, from the Dirichlet posterior of the shares of
    rows lost, gained and unchanged."""
    rng = np.random.default_rng(seed)
    same = max(rows - losses - gains, 0)
    shares = rng.dirichlet((losses + 0.5, gains + 0.5, same + 0.5), DRAWS)
    return _quantiles(shares[:, 0] - shares[:, 1], (losses - gains) / max(rows, 1))


def resolution(drop: Interval, budget: float) -> str:
    if drop.high <= budget:
        return WITHIN
    if drop.low > budget:
        return OVER
    return UNRESOLVED


def rows_needed(drop: Interval, budget: float, rows: int) -> int | None:
    """About how many more rows would move the interval clear of the budget (None: the measured
    drop sits on the budget, so no number of rows is sure to)."""
    gap = abs(drop.value - budget)
    half = (drop.high - drop.low) / 2
    if gap < 1e-9 or half <= 0:
        return None
    return max(1, math.ceil(rows * (half / gap) ** 2) - rows)


def judged(pred: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(predictions, labels) of what labels judge: each row's, or with a label per token (token
    classification) each tagged word's, flattened."""
    labels = labels[:len(pred)]
    if labels.ndim == 2:
        keep = labels != IGNORED
        return pred[keep], labels[keep]
    return pred, labels


def scores(pred: np.ndarray, labels: np.ndarray) -> dict[str, Interval]:
    """Accuracy and macro-F1 of class predictions against labels, each with its interval."""
    pred, labels = judged(pred, labels)
    hits = int((pred == labels).sum())
    return {"accuracy": proportion(hits, len(labels)), "macro_f1": macro_f1(pred, labels)}


def unresolved_text(rows_needed: int | None) -> str:
    more = f"~{rows_needed} more rows needed" if rows_needed else "the drop sits on the budget"
    return f"unresolved: its 95% interval straddles the budget ({more})"
