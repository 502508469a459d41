"""Summary statistics of belief arrays: what dashboards, the admin and metrics show
instead of the (encrypted) values themselves.

Exact statistics are values of the array: min, max and mean give back any array of up to
three elements, and each added statistic one more. So belief_summary goes only where the
full beliefs may go (the admin, credentials with the beliefs right); belief_shape is what
everyone else sees (README "Real-time updates", "Which statistics leave the encrypted store").
"""

import numpy as np


def belief_entropy(beliefs: np.ndarray) -> float:
    """Shannon entropy (nats) of the array read as a distribution; 0 for an empty array."""
    flat = np.asarray(beliefs, dtype=np.float64).ravel()
    positive = flat[flat > 0]
    total = positive.sum()
    if total <= 0:
        return 0.0
    p = positive / total
    return float(-(p * np.log(p)).sum())


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
