"""Belief arrays: a compact binary encoding, encrypted with MultiFernet.

The encoding keeps dtype and shape exactly and never uses pickle:

    magic b"FAB1" | dtype length (u8) | dtype.str (ascii) | ndim (u8)
    | shape (ndim x u64, little endian) | C-ordered array bytes
"""

import functools
import struct

import numpy as np
from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.signals import setting_changed
from django.dispatch import receiver

from agents.exceptions import BeliefStateDecryptionError, BeliefStateFormatError

MAGIC = b"FAB1"
# Numeric kinds only: bool, signed/unsigned int, float, complex. Object arrays would need pickle.
SUPPORTED_KINDS = frozenset("biufc")
_U64 = struct.Struct("<Q")


def encode_array(array: np.ndarray) -> bytes:
    """Serialise a numeric ndarray to bytes that keep dtype and shape exactly."""
    if not isinstance(array, np.ndarray):
        raise TypeError(f"expected a numpy.ndarray, got {type(array).__name__}")
    if array.dtype.kind not in SUPPORTED_KINDS:
        raise TypeError(f"dtype {array.dtype} is not supported; use a numeric dtype")
    dtype = array.dtype.str.encode("ascii")
    header = b"".join(
        (
            MAGIC,
            bytes((len(dtype),)),
            dtype,
            bytes((array.ndim,)),
            b"".join(_U64.pack(n) for n in array.shape),
        )
    )
    return header + np.ascontiguousarray(array).tobytes()


def decode_array(data: bytes) -> np.ndarray:
    """Inverse of encode_array. Raises BeliefStateFormatError on anything malformed."""
    try:
        if data[:4] != MAGIC:
            raise ValueError("missing FAB1 header")
        dtype_len = data[4]
        dtype = np.dtype(data[5 : 5 + dtype_len].decode("ascii"))
        if dtype.kind not in SUPPORTED_KINDS:
            raise ValueError(f"unsupported dtype {dtype}")
        offset = 5 + dtype_len
        ndim = data[offset]
        offset += 1
        shape = tuple(_U64.unpack_from(data, offset + 8 * i)[0] for i in range(ndim))
        offset += 8 * ndim
        expected = dtype.itemsize * int(np.prod(shape, dtype=np.int64))
        if len(data) - offset != expected:
            raise ValueError(f"expected {expected} data bytes, found {len(data) - offset}")
        # copy(): frombuffer over immutable bytes would hand callers a read-only array.
        return np.frombuffer(data, dtype=dtype, offset=offset).reshape(shape).copy()
    except (IndexError, TypeError, ValueError, struct.error) as e:
        raise BeliefStateFormatError(f"not a belief array: {e}") from e


@functools.cache
def _fernet_for(keys: tuple[str, ...]) -> tuple[MultiFernet, Fernet]:
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
    return MultiFernet(fernets), fernets[0]


def multi_fernet() -> MultiFernet:
    return _fernet_for(tuple(settings.FREEAGENTICS_ENCRYPTION_KEYS))[0]


def primary_fernet() -> Fernet:
    """The key that encrypts; a token it can decrypt needs no rotation."""
    return _fernet_for(tuple(settings.FREEAGENTICS_ENCRYPTION_KEYS))[1]


@receiver(setting_changed)
def _forget_keys(*, setting, **kwargs):
    if setting == "FREEAGENTICS_ENCRYPTION_KEYS":
        _fernet_for.cache_clear()


def encrypt_array(array: np.ndarray) -> bytes:
    return multi_fernet().encrypt(encode_array(array))


def decrypt_array(token: bytes, *, label: str = "belief state") -> np.ndarray:
    """Decrypt and decode a token. label names the model and field in errors."""
    try:
        plaintext = multi_fernet().decrypt(bytes(token))
    except InvalidToken:
        raise BeliefStateDecryptionError(
            f"Cannot decrypt {label}: no key in FREEAGENTICS_ENCRYPTION_KEYS opens it "
            "(wrong key, or corrupt ciphertext)."
        ) from None
    try:
        return decode_array(plaintext)
    except BeliefStateFormatError as e:
        raise BeliefStateFormatError(f"Cannot decode {label}: {e}") from e


def rotate_token(token: bytes) -> bytes | None:
    """Re-encrypt under the primary key, or None when the primary key already made it."""
    token = bytes(token)
    try:
        primary_fernet().decrypt(token)
        return None
    except InvalidToken:
        pass
    try:
        return multi_fernet().rotate(token)
    except InvalidToken:
        raise BeliefStateDecryptionError(
            "Cannot rotate a token no key in FREEAGENTICS_ENCRYPTION_KEYS opens."
        ) from None
