"""Summary statistics of belief arrays: what dashboards, the admin and metrics show
instead of the (encrypted) values themselves."""

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


def belief_summary(beliefs: np.ndarray | None) -> dict | None:
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
