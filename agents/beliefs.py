"""Summary statistics of belief arrays: what dashboards, the admin and metrics show
instead of the (encrypted) values themselves.

Exact statistics are values of the array: min, max and mean give back any array of up to
three elements, and each added statistic one more. So belief_summary goes only where the
full beliefs may go (the admin, credentials with the beliefs right); belief_shape is what
everyone else sees (README "Real-time updates", "Which statistics leave the encrypted store").

Speed: the real-time hub summarises every update it sends to a reader of beliefs, arrays
of 8 to 64 elements, where numpy's Python-level wrappers (ndarray.var, np.mean, str of a
dtype) cost far more than the arithmetic. The statistics call the same ufuncs, in the
same order and on the same arrays as those wrappers do, so every value is bit for bit
what they give (summation order, the SIMD logarithm); only the wrappers are skipped.
"""

from collections import defaultdict
from collections.abc import Sequence

import numpy as np

_add = np.add.reduce
_maximum = np.maximum.reduce
_minimum = np.minimum.reduce
_FLOAT64 = np.dtype(np.float64)
# Kinds whose float64 cast is exact enough to summarise the array (bool, int, float);
# anything else takes numpy's own path (a complex array's warning included).
_FAST_KINDS = frozenset("biuf")

# str(dtype) goes through numpy's Python-level formatting (~4 us); the plain numeric dtypes
# are few, so their names are kept.
_DTYPE_NAMES: dict[np.dtype, str] = {}


def _dtype_name(dtype: np.dtype) -> str:
    name = _DTYPE_NAMES.get(dtype)
    if name is None:
        name = str(dtype)
        if (
            dtype.kind in "biufc"
            and dtype.fields is None
            and dtype.metadata is None
            and len(_DTYPE_NAMES) < 64
        ):
            _DTYPE_NAMES[dtype] = name
    return name


def _entropies(matrix: np.ndarray) -> np.ndarray:
    """Shannon entropy (nats) of each row read as a distribution (its positive values,
    normalised); 0 for a row with nothing positive."""
    positive = np.where(matrix > 0, matrix, 0.0)
    totals = positive.sum(axis=1)
    p = positive / np.where(totals > 0, totals, 1.0)[:, None]
    logs = np.log(p, out=np.zeros_like(p), where=p > 0)
    return np.where(totals > 0, -(p * logs).sum(axis=1), 0.0)


def _entropy_of_row(row: np.ndarray, *, all_positive: bool = False, total=None) -> float:
    """_entropies of a one-row float64 matrix: the same ufunc calls minus the wrappers.
    all_positive: every value is > 0, so the positive part is the row itself; total: the
    row's sum, already taken in the same order."""
    positive = row if all_positive else np.where(row > 0, row, 0.0)
    totals = _add(positive, 1) if total is None else total
    if not totals[0] > 0:
        return 0.0
    p = positive / totals[:, None]
    logs = np.log(p, out=np.zeros(p.shape), where=p > 0)
    return float(-_add(p * logs, 1)[0])


def belief_entropy(beliefs: np.ndarray) -> float:
    """Shannon entropy (nats) of the array read as a distribution; 0 for an empty array."""
    flat = np.asarray(beliefs, dtype=np.float64).ravel()
    return _entropy_of_row(flat[None, :]) if flat.size else 0.0


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
    return {"shape": list(values.shape), "dtype": _dtype_name(values.dtype), "size": values.size}


def belief_summary(beliefs: np.ndarray | None) -> dict | None:
    """belief_shape plus exact entropy, max, min, mean and variance: for readers of beliefs."""
    if beliefs is None:
        return None
    values = np.asarray(beliefs)
    size = values.size
    summary = {"shape": list(values.shape), "dtype": _dtype_name(values.dtype), "size": size}
    if not size:
        summary.update(entropy=0.0, max=None, min=None, mean=None, variance=None)
    elif values.dtype.kind in _FAST_KINDS:
        summary.update(_statistics(values.astype(_FLOAT64, copy=False), size))
    else:
        numeric = values.astype(np.float64, copy=False)
        summary.update(
            entropy=belief_entropy(values),
            max=float(numeric.max()),
            min=float(numeric.min()),
            mean=float(numeric.mean()),
            variance=float(numeric.var()),
        )
    return summary


def _statistics(numeric: np.ndarray, size: int) -> dict:
    # What numeric.max(), .min(), .mean() and .var() compute (numpy/_core/_methods.py):
    # the sum with keepdims is the one _mean and _var both take, divided by the count.
    maximum = _maximum(numeric, None)
    minimum = _minimum(numeric, None)
    total = _add(numeric, None, None, None, True)
    if not isinstance(total, np.ndarray):  # the sum of a 0-d array is a scalar
        total = np.array([total])
    # belief_entropy's row: the values in C order, as ravel() gives them. When they are
    # all positive and already in that order, its total is this sum.
    row = numeric.reshape(1, size)
    all_positive = bool(minimum > 0)
    entropy = _entropy_of_row(
        row,
        all_positive=all_positive,
        total=total.reshape(1) if all_positive and numeric.flags.c_contiguous else None,
    )
    mean = np.true_divide(total, size, out=total)
    deviations = np.subtract(numeric, mean, out=...)
    np.square(deviations, out=deviations)
    return {
        "entropy": entropy,
        "max": float(maximum),
        "min": float(minimum),
        "mean": mean.item(),
        "variance": float(_add(deviations, None)) / size,
    }
