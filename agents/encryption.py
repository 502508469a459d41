"""Belief arrays: a compact binary encoding, encrypted with a data key of their tenant.

The encoding keeps dtype and shape exactly and never uses pickle:

    magic b"FAB1" | dtype length (u8) | dtype.str (ascii) | ndim (u8)
    | shape (ndim x u64, little endian) | C-ordered array bytes

A stored token names the data key that encrypted it (agents.data_keys holds the keys,
wrapped by the master keys in FREEAGENTICS_ENCRYPTION_KEYS):

    magic b"FAE1" | data key id (u32, big endian) | Fernet token

(The Fernet token stays in its url-safe base64 form: decoding it to binary would save a
quarter of the bytes but cost half the throughput, measured in benchmarks/encryption.py.)

Tokens written before envelope encryption are plain Fernet tokens under a master key
(they start with "gAAAAA"); they keep reading, and rotate_encryption_keys converts them.
"""

import functools
import math
import os
import struct
import time
from collections.abc import Sequence

import numpy as np
from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.signals import setting_changed
from django.dispatch import receiver

from agents import data_keys
from agents.exceptions import BeliefStateDecryptionError, BeliefStateFormatError

MAGIC = b"FAB1"
# Numeric kinds only: bool, signed/unsigned int, float, complex. Object arrays would need pickle.
SUPPORTED_KINDS = frozenset("biufc")


@functools.lru_cache(maxsize=256)
def _header(dtype_str: str, shape: tuple[int, ...]) -> bytes:
    dtype = dtype_str.encode("ascii")
    return b"".join(
        (
            MAGIC,
            bytes((len(dtype),)),
            dtype,
            bytes((len(shape),)),
            struct.pack(f"<{len(shape)}Q", *shape),
        )
    )


_DTYPES: dict[bytes, np.dtype] = {}
# ndim is one byte, so 256 precompiled shape formats cover every header.
_SHAPES = tuple(struct.Struct(f"<{n}Q") for n in range(256))


def _dtype(name: bytes) -> np.dtype:
    dtype = _DTYPES.get(name)
    if dtype is None:
        dtype = np.dtype(name.decode("ascii"))
        if dtype.kind not in SUPPORTED_KINDS:
            raise ValueError(f"unsupported dtype {dtype}")
        if len(_DTYPES) < 64:
            _DTYPES[name] = dtype
    return dtype


def encode_array(array: np.ndarray) -> bytes:
    """Serialise a numeric ndarray to bytes that keep dtype and shape exactly."""
    if not isinstance(array, np.ndarray):
        raise TypeError(f"expected a numpy.ndarray, got {type(array).__name__}")
    if array.dtype.kind not in SUPPORTED_KINDS:
        raise TypeError(f"dtype {array.dtype} is not supported; use a numeric dtype")
    # Headers repeat (same dtype and shape for every agent), so they are cached.
    return _header(array.dtype.str, array.shape) + np.ascontiguousarray(array).tobytes()


def decode_array(data: bytes) -> np.ndarray:
    """Inverse of encode_array. Raises BeliefStateFormatError on anything malformed."""
    try:
        if not data.startswith(MAGIC):
            raise ValueError("missing FAB1 header")
        dtype_len = data[4]
        dtype = _dtype(data[5 : 5 + dtype_len])
        offset = 5 + dtype_len
        ndim = data[offset]
        offset += 1
        shape = _SHAPES[ndim].unpack_from(data, offset)
        offset += 8 * ndim
        expected = dtype.itemsize * math.prod(shape)
        if len(data) - offset != expected:
            raise ValueError(f"expected {expected} data bytes, found {len(data) - offset}")
        # copy(): frombuffer over immutable bytes would hand callers a read-only array.
        array = np.frombuffer(data, dtype=dtype, offset=offset).copy()
        return array if ndim == 1 else array.reshape(shape)
    except (IndexError, TypeError, ValueError, struct.error, UnicodeDecodeError) as e:
        raise BeliefStateFormatError(f"not a belief array: {e}") from e


@functools.cache
def _fernet_for(keys: tuple[str, ...]) -> tuple[MultiFernet, tuple[Fernet, ...]]:
    fernets = []
    for index, key in enumerate(keys):
        try:
            fernets.append(Fernet(key))
        except (ValueError, TypeError) as e:
            raise ImproperlyConfigured(
                f"FREEAGENTICS_ENCRYPTION_KEYS entry {index + 1} is not a Fernet key "
                "(32 url-safe base64-encoded bytes)."
            ) from e
    if not fernets:
        raise ImproperlyConfigured("FREEAGENTICS_ENCRYPTION_KEYS must hold at least one key.")
    return MultiFernet(fernets), tuple(fernets)


_last: tuple[object, tuple[Fernet, ...]] = (None, ())


def _decrypting_fernets() -> tuple[Fernet, ...]:
    # Identity check on the settings list: the hot path skips hashing the key tuple.
    global _last
    keys = settings.FREEAGENTICS_ENCRYPTION_KEYS
    if _last[0] is not keys:
        _last = (keys, _fernet_for(tuple(keys))[1])
    return _last[1]


def multi_fernet() -> MultiFernet:
    return _fernet_for(tuple(settings.FREEAGENTICS_ENCRYPTION_KEYS))[0]


@receiver(setting_changed)
def _forget_keys(*, setting, **kwargs):
    global _last
    if setting == "FREEAGENTICS_ENCRYPTION_KEYS":
        _fernet_for.cache_clear()
        _last = (None, ())


ENVELOPE_MAGIC = b"FAE1"
_KEY_ID = struct.Struct(">I")
_ENVELOPE_HEADER = len(ENVELOPE_MAGIC) + _KEY_ID.size


_IV_SIZE = 16  # Fernet's: an AES block


def seal(plaintext: bytes, key: data_keys.DataKey) -> bytes:
    return ENVELOPE_MAGIC + _KEY_ID.pack(key.id) + key.fernet.encrypt(plaintext)


def seal_many(plaintexts: Sequence[bytes], key: data_keys.DataKey) -> list[bytes]:
    """seal() of each plaintext: the same Fernet tokens, each with its own random IV, but
    one read of the random source and of the clock for the batch instead of one per
    token. Every os.urandom call also released the GIL: beside a busy thread (the
    real-time publisher) a writer waited up to a switch interval for it back each time.
    The IVs are read here, per call, never pooled: a pool copied into a forked child
    would hand both processes the same IVs."""
    if not plaintexts:
        return []
    ivs = os.urandom(_IV_SIZE * len(plaintexts))
    now = int(time.time())
    # Fernet.encrypt is encrypt_at_time(data, int(time.time())), which is
    # _encrypt_from_parts(data, current_time, os.urandom(16)): only the IV's source moves.
    encrypt = key.fernet._encrypt_from_parts
    header = ENVELOPE_MAGIC + _KEY_ID.pack(key.id)
    return [
        header + encrypt(plaintext, now, ivs[offset : offset + _IV_SIZE])
        for offset, plaintext in zip(range(0, len(ivs), _IV_SIZE), plaintexts, strict=True)
    ]


def encrypt_array(array: np.ndarray, *, tenant_id) -> bytes:
    """The array encrypted with the tenant's active data key."""
    return seal(encode_array(array), data_keys.active_key(tenant_id))


def encrypt_arrays(arrays: Sequence[np.ndarray], *, tenant_id) -> list[bytes]:
    """encrypt_array of each array, as one batch (seal_many)."""
    if not arrays:
        return []
    key = data_keys.active_key(tenant_id)
    return seal_many([encode_array(array) for array in arrays], key)


def token_key_id(token: bytes) -> int | None:
    """The data key id a token names; None for a token under a master key (legacy)."""
    if token[:4] == ENVELOPE_MAGIC and len(token) > _ENVELOPE_HEADER:
        return _KEY_ID.unpack_from(token, 4)[0]
    return None


def open_token(token: bytes, *, label: str = "belief state", tenant_id=None) -> bytes:
    """The plaintext inside a token. With tenant_id, a token under another tenant's key
    is refused: a ciphertext copied between tenants never opens."""
    key_id = token_key_id(token)
    if key_id is None:
        return _open_legacy(token, label)
    try:
        key = data_keys.key_by_id(key_id)
    except BeliefStateDecryptionError as e:
        raise type(e)(f"Cannot decrypt {label}: {e}") from e
    if tenant_id is not None and str(key.tenant_id) != str(tenant_id):
        raise BeliefStateDecryptionError(
            f"Cannot decrypt {label}: it is under data key {key_id} of another tenant."
        )
    try:
        return key.fernet.decrypt(token[_ENVELOPE_HEADER:])
    except InvalidToken:
        raise BeliefStateDecryptionError(
            f"Cannot decrypt {label}: data key {key_id} does not open it (corrupt ciphertext)."
        ) from None


def _open_legacy(token: bytes, label: str) -> bytes:
    # The same loop MultiFernet.decrypt runs, minus its per-call overhead.
    for fernet in _decrypting_fernets():
        try:
            return fernet.decrypt(token)
        except InvalidToken:
            continue
    raise BeliefStateDecryptionError(
        f"Cannot decrypt {label}: no key in FREEAGENTICS_ENCRYPTION_KEYS opens it "
        "(wrong key, or corrupt ciphertext)."
    )


def decrypt_array(token: bytes, *, label: str = "belief state", tenant_id=None) -> np.ndarray:
    """Decrypt and decode a token. label names the model and field in errors."""
    plaintext = open_token(token, label=label, tenant_id=tenant_id)
    try:
        return decode_array(plaintext)
    except BeliefStateFormatError as e:
        raise BeliefStateFormatError(f"Cannot decode {label}: {e}") from e
