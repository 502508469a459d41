"""Streaming encryption of backup files with BACKUP_ENCRYPTION_KEY.

Fernet needs a whole message in memory and a dump can be many GiB, so files are cut
into chunks sealed with AES-256-GCM:

    header = MAGIC (8) | chunk size (u32 BE) | key id (8) | salt (16)
    chunk  = ciphertext length (u32 BE) | AES-GCM(ciphertext + 16-byte tag)

Each file gets its own key, HKDF-SHA256(master key, salt). The nonce of chunk i is i
(11 bytes, big endian) followed by a flag byte that is 1 on the last chunk only, and
the header is every chunk's associated data; so reordered, dropped, appended or
truncated chunks all fail authentication (the STREAM construction). A file always ends
with a flagged chunk, possibly empty.

The master keys are Fernet-format keys (32 url-safe base64 bytes), separate from the
field keys in FREEAGENTICS_ENCRYPTION_KEYS, so a leaked backup key opens no live data
and rotating field keys never strands a backup.
"""

import base64
import binascii
import hashlib
import hmac
import io
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

from backups.exceptions import BackupIntegrityError

MAGIC = b"FABKENC1"
_HEADER = struct.Struct(">8sI8s16s")
_LEN = struct.Struct(">I")
TAG_SIZE = 16
DEFAULT_CHUNK_SIZE = 4 * 1024 * 1024
MAX_CHUNK_SIZE = 64 * 1024 * 1024
ALGORITHM = "AES-256-GCM/STREAM/HKDF-SHA256"


@dataclass(frozen=True)
class BackupKey:
    secret: bytes

    @property
    def key_id(self) -> str:
        return hmac.new(self.secret, b"freeagentics-backup key id", hashlib.sha256).hexdigest()[:16]

    def _derive(self, salt: bytes, info: bytes) -> bytes:
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(self.secret)

    def file_key(self, salt: bytes) -> bytes:
        return self._derive(salt, b"freeagentics-backup file v1")

    def sign(self, data: bytes) -> str:
        """An HMAC of a manifest, so a swapped manifest cannot vouch for swapped files."""
        mac_key = self._derive(b"", b"freeagentics-backup manifest v1")
        return hmac.new(mac_key, data, hashlib.sha256).hexdigest()


def _parse_key(raw: str, index: int) -> BackupKey:
    try:
        secret = base64.urlsafe_b64decode(raw.encode("ascii"))
    except (binascii.Error, ValueError, UnicodeEncodeError):
        secret = b""
    if len(secret) != 32:
        raise ImproperlyConfigured(
            f"BACKUP_ENCRYPTION_KEY entry {index + 1} is not a Fernet key (32 url-safe "
            "base64-encoded bytes); make one with "
            '`python -c "from cryptography.fernet import Fernet; '
            'print(Fernet.generate_key().decode())"`.'
        )
    return BackupKey(secret)


def backup_keys() -> list[BackupKey]:
    """The configured backup keys, first one encrypting. [] means backups are not encrypted.

    Raises ImproperlyConfigured for a malformed key or one shared with the field keys.
    """
    raw_keys = list(getattr(settings, "BACKUP_ENCRYPTION_KEY", []) or [])
    field_keys = set(getattr(settings, "FREEAGENTICS_ENCRYPTION_KEYS", []))
    if field_keys.intersection(raw_keys):
        raise ImproperlyConfigured(
            "BACKUP_ENCRYPTION_KEY must differ from every FREEAGENTICS_ENCRYPTION_KEYS key: "
            "one leaked key must not open both backups and live data."
        )
    return [_parse_key(raw, i) for i, raw in enumerate(raw_keys)]


def encryption_key() -> BackupKey | None:
    keys = backup_keys()
    return keys[0] if keys else None


def key_for(key_id: str) -> BackupKey:
    """The configured key with this id; raises BackupIntegrityError when none has it."""
    keys = backup_keys()
    for key in keys:
        if key.key_id == key_id:
            return key
    if not keys:
        raise BackupIntegrityError(
            f"The backup is encrypted (key id {key_id}) and BACKUP_ENCRYPTION_KEY is not set."
        )
    raise BackupIntegrityError(
        f"The backup is encrypted with key id {key_id}; BACKUP_ENCRYPTION_KEY holds "
        f"{', '.join(k.key_id for k in keys)}. Add the key it was made with."
    )


def _nonce(index: int, final: bool) -> bytes:
    return index.to_bytes(11, "big") + (b"\x01" if final else b"\x00")


class EncryptingWriter(io.RawIOBase):
    """A write-only stream that seals what it is given into `sink`. close() writes the end."""

    def __init__(self, sink, key: BackupKey, chunk_size: int = DEFAULT_CHUNK_SIZE):
        super().__init__()
        self.sink = sink
        self.chunk_size = chunk_size
        salt = os.urandom(16)
        self.header = _HEADER.pack(MAGIC, chunk_size, bytes.fromhex(key.key_id), salt)
        self.aead = AESGCM(key.file_key(salt))
        self.index = 0
        self.buffer = bytearray()
        sink.write(self.header)

    def writable(self):
        return True

    def write(self, data) -> int:
        self.buffer += data
        # Strictly greater: the last chunk must stay buffered until close() flags it final.
        while len(self.buffer) > self.chunk_size:
            self._seal(bytes(self.buffer[: self.chunk_size]), final=False)
            del self.buffer[: self.chunk_size]
        return len(data)

    def _seal(self, plaintext: bytes, *, final: bool) -> None:
        sealed = self.aead.encrypt(_nonce(self.index, final), plaintext, self.header)
        self.sink.write(_LEN.pack(len(sealed)))
        self.sink.write(sealed)
        self.index += 1

    def close(self) -> None:
        if not self.closed:
            self._seal(bytes(self.buffer), final=True)
            self.buffer.clear()
        super().close()


def read_header(source) -> tuple[bytes, int, str, bytes]:
    header = source.read(_HEADER.size)
    if len(header) < _HEADER.size:
        raise BackupIntegrityError("Encrypted file is truncated: its header is incomplete.")
    magic, chunk_size, key_id, salt = _HEADER.unpack(header)
    if magic != MAGIC:
        raise BackupIntegrityError("Not an encrypted backup file (bad magic bytes).")
    if not 0 < chunk_size <= MAX_CHUNK_SIZE:
        raise BackupIntegrityError(f"Encrypted file declares a bad chunk size {chunk_size}.")
    return header, chunk_size, key_id.hex(), salt


def iter_decrypted(source, key: BackupKey | None = None) -> Iterator[bytes]:
    """Yield the plaintext chunks of an encrypted stream, authenticating each.

    key defaults to the configured key whose id the header names. Raises
    BackupIntegrityError on a wrong key, tampering or truncation.
    """
    header, chunk_size, key_id, salt = read_header(source)
    if key is None:
        key = key_for(key_id)
    elif key.key_id != key_id:
        raise BackupIntegrityError(f"File is encrypted with key id {key_id}, not {key.key_id}.")
    aead = AESGCM(key.file_key(salt))
    index = 0
    while True:
        raw_len = source.read(_LEN.size)
        if len(raw_len) < _LEN.size:
            raise BackupIntegrityError(
                "Encrypted file is truncated: it ends before its final chunk."
            )
        (length,) = _LEN.unpack(raw_len)
        if not TAG_SIZE <= length <= chunk_size + TAG_SIZE:
            raise BackupIntegrityError(f"Encrypted file is corrupt: chunk {index} length.")
        sealed = source.read(length)
        if len(sealed) < length:
            raise BackupIntegrityError(f"Encrypted file is truncated inside chunk {index}.")
        # A chunk opens under exactly one flag; trying "not final" first costs one
        # failed tag check on the last chunk only.
        for final in (False, True):
            try:
                plaintext = aead.decrypt(_nonce(index, final), sealed, header)
                break
            except InvalidTag:
                continue
        else:
            raise BackupIntegrityError(
                f"Encrypted file is corrupt or was tampered with (chunk {index} fails "
                "authentication)."
            )
        index += 1
        if plaintext:
            yield plaintext
        if final:
            if source.read(1):
                raise BackupIntegrityError("Encrypted file has data after its final chunk.")
            return


class DecryptingReader(io.RawIOBase):
    """A readable stream over iter_decrypted, for consumers such as gzip.GzipFile."""

    def __init__(self, source, key: BackupKey | None = None):
        super().__init__()
        self._chunks = iter_decrypted(source, key)
        self._pending = memoryview(b"")

    def readable(self):
        return True

    def readinto(self, buffer) -> int:
        while not self._pending:
            try:
                self._pending = memoryview(next(self._chunks))
            except StopIteration:
                return 0
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n
