import warnings

import numpy as np
import pytest

from agents import beliefs

# The implementation before the fast path (numpy's own methods), kept as the reference the
# fast one must equal bit for bit.


def _reference_entropies(matrix):
    positive = np.where(matrix > 0, matrix, 0.0)
    totals = positive.sum(axis=1)
    p = positive / np.where(totals > 0, totals, 1.0)[:, None]
    logs = np.log(p, out=np.zeros_like(p), where=p > 0)
    return np.where(totals > 0, -(p * logs).sum(axis=1), 0.0)


def _reference_entropy(values):
    flat = np.asarray(values, dtype=np.float64).ravel()
    return float(_reference_entropies(flat[None, :])[0]) if flat.size else 0.0


def reference_summary(values):
    if values is None:
        return None
    values = np.asarray(values)
    numeric = values.astype(np.float64, copy=False) if values.size else values
    return {
        "shape": list(values.shape),
        "dtype": str(values.dtype),
        "size": int(values.size),
        "entropy": _reference_entropy(values) if values.size else 0.0,
        "max": float(numeric.max()) if values.size else None,
        "min": float(numeric.min()) if values.size else None,
        "mean": float(numeric.mean()) if values.size else None,
        "variance": float(numeric.var()) if values.size else None,
    }


def _exactly(value) -> str:
    # repr tells -0.0 from 0.0 and shows nan, and a float's repr round-trips every bit.
    return repr(value)


def _assert_same(values):
    with warnings.catch_warnings():
        # Overflow and 0/0 warn on both sides; the values are what is compared.
        warnings.simplefilter("ignore", RuntimeWarning)
        warnings.simplefilter("ignore", np.exceptions.ComplexWarning)
        expected = reference_summary(values)
        summary = beliefs.belief_summary(values)
        entropy = beliefs.belief_entropy(values) if np.asarray(values).dtype.kind != "c" else None
        reference_entropy = (
            _reference_entropy(values) if np.asarray(values).dtype.kind != "c" else None
        )
    assert _exactly(summary) == _exactly(expected)
    assert list(summary) == list(expected)
    assert _exactly(entropy) == _exactly(reference_entropy)
    shape = {key: expected[key] for key in ("shape", "dtype", "size")} if expected else None
    assert beliefs.belief_shape(values) == shape


EDGE_CASES = {
    "empty": np.array([]),
    "empty 2-d int": np.zeros((0, 3), dtype=np.int8),
    "0-d": np.array(3.0),
    "numpy scalar": np.float64(2.5),
    "python int": 5,
    "list of ints": [1, 2, 3],
    "list of bools": [True, False],
    "one nan": np.array([np.nan]),
    "nan among values": np.array([0.2, np.nan, 0.8]),
    "nan in 2-d": np.array([[np.nan, 1.0], [2.0, 3.0]]),
    "inf": np.array([np.inf]),
    "inf among values": np.array([np.inf, 1.0, 2.0]),
    "-inf and inf": np.array([-np.inf, np.inf]),
    "-inf only": np.array([-np.inf, -1.0]),
    "signed zeros": np.array([0.0, -0.0]),
    "negative zero": np.array([-0.0]),
    "eight negative zeros": np.full(8, -0.0),
    "all zeros": np.zeros(8),
    "all negative": -np.ones(8),
    "sum overflows": np.array([1e308, 1e308]),
    "subnormals": np.array([5e-324, 5e-324]),
    "p underflows to 0": np.array([5e-324, 1e10]),
    "int8 limits": np.array([-128, 127], dtype=np.int8),
    "int64": np.arange(-5, 60),
    "uint64 beyond 2**53": np.array([2**63, 2**64 - 1, 3], dtype=np.uint64),
    "bool": np.array([True, True, False]),
    "float16": np.array([0.5, 0.25, 0.125], dtype=np.float16),
    "float32": np.random.default_rng(3).random(64, dtype=np.float32),
    "big-endian float64": np.array([0.25, 0.75], dtype=">f8"),
    "longdouble": np.array([0.1, 0.9], dtype=np.longdouble),
    "complex (numpy's path)": np.array([1 + 2j, 3 - 1j]),
    "3-d": np.arange(24.0).reshape(2, 3, 4),
    "strided 3-d view": np.arange(24.0).reshape(2, 3, 4)[:, ::2, 1:],
    "fortran order": np.asfortranarray(np.arange(12.0).reshape(3, 4)),
    "transposed": np.random.default_rng(4).dirichlet(np.ones(64)).reshape(8, 8).T,
    "every other element": np.random.default_rng(5).random(64)[::2],
}


@pytest.mark.parametrize("values", EDGE_CASES.values(), ids=EDGE_CASES.keys())
def test_belief_summary_is_bit_for_bit_numpys_on_edge_cases(values):
    _assert_same(values)


def test_belief_summary_is_bit_for_bit_numpys_on_random_arrays_of_every_small_size():
    rng = np.random.default_rng(42)
    for size in [*range(1, 200), 511, 512, 1000, 8192, 9000]:
        scale = 10.0 ** float(rng.integers(-300, 300))
        cases = [
            rng.dirichlet(np.ones(size)),
            rng.normal(size=size) * scale,
            rng.integers(-1000, 1000, size=size),
            rng.random(size) * 1e308,
        ]
        special = rng.normal(size=size)
        special[rng.integers(0, size)] = rng.choice([np.nan, np.inf, -np.inf, 0.0, -0.0])
        cases.append(special)
        for values in cases:
            _assert_same(values)
            if size % 4 == 0:
                _assert_same(values.reshape(2, -1))
                _assert_same(values.reshape(2, -1).T)
                _assert_same(values[::2])


def test_belief_summary_of_none_is_none():
    assert beliefs.belief_summary(None) is None
    assert beliefs.belief_shape(None) is None
