"""The pre-age backup file format's writer, kept only to prove old backups still read."""

import os

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from backups.crypto import _HEADER, _LEN, MAGIC, BackupKey


def legacy_seal(data: bytes, key: BackupKey, chunk_size: int = 64) -> bytes:
    """data in the old chunked AES-256-GCM format, as backups made before age hold it."""
    salt = os.urandom(16)
    header = _HEADER.pack(MAGIC, chunk_size, bytes.fromhex(key.key_id), salt)
    aead = AESGCM(key.file_key(salt))
    out = bytearray(header)
    chunks = [data[i : i + chunk_size] for i in range(0, len(data), chunk_size)]
    if not chunks or len(chunks[-1]) == chunk_size:
        chunks.append(b"")
    for index, chunk in enumerate(chunks):
        final = index == len(chunks) - 1
        nonce = index.to_bytes(11, "big") + (b"\x01" if final else b"\x00")
        sealed = aead.encrypt(nonce, chunk, header)
        out += _LEN.pack(len(sealed)) + sealed
    return bytes(out)
