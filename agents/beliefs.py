"""Summary statistics of belief arrays: what dashboards, the admin and metrics show
instead of the (encrypted) values themselves.

Exact statistics are values of the array: min, max and mean give back any array of up to
three elements, and each added statistic one more. So belief_summary goes only where the
full beliefs may go (the admin, credentials with the beliefs right); belief_shape is what
everyone else sees (README "Real-time updates", "Which statistics leave the encrypted store").
"""

from collections import defaultdict
from collections.abc import Sequence

import numpy as np


def _entropies(matrix: np.ndarray) -> np.ndarray:
    """Shannon entropy (nats) of each row read as a distribution (its positive values,
    normalised); 0 for a row with nothing positive."""
    positive = np.where(matrix > 0, matrix, 0.0)
    totals = positive.sum(axis=1)
    p = positive / np.where(totals > 0, totals, 1.0)[:, None]
    logs = np.log(p, out=np.zeros_like(p), where=p > 0)
    return np.where(totals > 0, -(p * logs).sum(axis=1), 0.0)


def belief_entropy(beliefs: np.ndarray) -> float:
    """Shannon entropy (nats) of the array read as a distribution; 0 for an empty array."""
    flat = np.asarray(beliefs, dtype=np.float64).ravel()
    return float(_entropies(flat[None, :])[0]) if flat.size else 0.0


def belief_stats(arrays: Sequence[np.ndarray]) -> list[tuple[float, float, float] | None]:
    """(entropy, max, variance) per array, None for an empty one. Arrays of equal size
    are stacked and computed together: one numpy call per batch instead of per agent.
    The entropy is belief_entropy's."""
    results: list[tuple[float, float, float] | None] = [None] * len(arrays)
    groups: dict[int, list[int]] = defaultdict(list)
    flats = []
    for index, array in enumerate(arrays):
        flat = np.asarray(array, dtype=np.float64).ravel()
        flats.append(flat)
        if flat.size:
            groups[flat.size].append(index)
    for indices in groups.values():
        matrix = np.stack([flats[i] for i in indices])
        entropies = _entropies(matrix)
        maxima = matrix.max(axis=1)
        variances = matrix.var(axis=1)
        for i, entropy, maximum, variance in zip(
            indices, entropies.tolist(), maxima.tolist(), variances.tolist(), strict=True
        ):
            results[i] = (entropy, maximum, variance)
    return results


def belief_shape(beliefs: np.ndarray | None) -> dict | None:
    """Shape, dtype and size: nothing computed from the values, so nothing to invert."""
    if beliefs is None:
        return None
    values = np.asarray(beliefs)
    return {"shape": list(values.shape), "dtype": str(values.dtype), "size": int(values.size)}


def belief_summary(beliefs: np.ndarray | None) -> dict | None:
    """belief_shape plus exact entropy, max, min, mean and variance: for readers of beliefs."""
    if beliefs is None:
        return None
    values = np.asarray(beliefs)
    numeric = values.astype(np.float64, copy=False) if values.size else values
    return {
        "shape": list(values.shape),
        "dtype": str(values.dtype),
        "size": int(values.size),
        "entropy": belief_entropy(values) if values.size else 0.0,
        "max": float(numeric.max()) if values.size else None,
        "min": float(numeric.min()) if values.size else None,
        "mean": float(numeric.mean()) if values.size else None,
        "variance": float(numeric.var()) if values.size else None,
    }
