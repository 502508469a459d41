"""Encryption of backup files with BACKUP_ENCRYPTION_KEY: the age format.

New files are age v1 (https://age-encryption.org/v1) encrypted to the X25519 recipient of
the configured identity, so in a disaster Debian's `age -d -i key.txt` decrypts them
without this application. BACKUP_ENCRYPTION_KEY entries are age identities
(`AGE-SECRET-KEY-1...`, from `age-keygen`): the first encrypts, all decrypt. The same
identity string keys the HMAC that authenticates every manifest (see manifest.py), so
anyone who can write to the storage but holds no key can neither forge nor alter a backup.

Entries in the old Fernet format (32 url-safe base64 bytes) still decrypt backups made
before age, in the old chunked AES-256-GCM format ("FABKENC1" files), and check their
manifests; they can no longer encrypt.

Files are streamed: writers push plaintext through a pipe to a thread running pyrage's
streaming encryptor, readers pull plaintext the same way, so no whole file is ever held
in memory and no plaintext is written to disk.

The keys are kept apart from the field keys in FREEAGENTICS_ENCRYPTION_KEYS, so a leaked
backup key opens no live data and rotating field keys never strands a backup.
"""

import base64
import binascii
import hashlib
import hmac
import io
import os
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import pyrage
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

from backups.exceptions import BackupIntegrityError

ALGORITHM = "age-v1/X25519"
AGE_MAGIC = b"age-encryption.org/v1\n"
AGE_PREFIX = "AGE-SECRET-KEY-1"
# The pre-age format, read only:
#   header = MAGIC (8) | chunk size (u32 BE) | key id (8) | salt (16)
#   chunk  = ciphertext length (u32 BE) | AES-GCM(ciphertext + 16-byte tag)
# file key HKDF-SHA256(master, salt); nonce of chunk i = i (11 bytes BE) | final flag.
LEGACY_ALGORITHM = "AES-256-GCM/STREAM/HKDF-SHA256"
MAGIC = b"FABKENC1"
_HEADER = struct.Struct(">8sI8s16s")
_LEN = struct.Struct(">I")
TAG_SIZE = 16
MAX_CHUNK_SIZE = 64 * 1024 * 1024
PIPE_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class BackupKey:
    secret: bytes  # the identity string (age) or the 32 raw bytes (old format)
    age: bool = True

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

    @property
    def identity(self):
        return pyrage.x25519.Identity.from_str(self.secret.decode("ascii"))

    @property
    def recipient(self):
        return self.identity.to_public()


def _parse_key(raw: str, index: int) -> BackupKey:
    raw = raw.strip()
    if raw.upper().startswith(AGE_PREFIX):
        try:
            pyrage.x25519.Identity.from_str(raw)
        except pyrage.IdentityError:
            raise ImproperlyConfigured(
                f"BACKUP_ENCRYPTION_KEY entry {index + 1} is not a valid age identity."
            ) from None
        return BackupKey(raw.encode("ascii"))
    try:
        secret = base64.urlsafe_b64decode(raw.encode("ascii"))
    except (binascii.Error, ValueError, UnicodeEncodeError):
        secret = b""
    if len(secret) != 32:
        raise ImproperlyConfigured(
            f"BACKUP_ENCRYPTION_KEY entry {index + 1} is neither an age identity "
            "(AGE-SECRET-KEY-1..., make one with `age-keygen`) nor an old-format Fernet key."
        )
    return BackupKey(secret, age=False)


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
    """The key new backups are encrypted with (None: not encrypted).

    Raises ImproperlyConfigured when the first key is an old-format one, which only reads.
    """
    keys = backup_keys()
    if keys and not keys[0].age:
        raise ImproperlyConfigured(
            "The first BACKUP_ENCRYPTION_KEY entry is an old-format Fernet key, which only "
            "decrypts old backups: put an age identity first (`age-keygen`), keep the old key "
            "after it."
        )
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


# ---------------------------------------------------------------------------------------
# age, streamed through a pipe and a thread


class _PipeThread:
    """Runs fn(reader or writer end) in a thread; keeps its error for the other side."""

    def __init__(self, fn):
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn,), daemon=True)

    def _run(self, fn):
        try:
            fn()
        except BaseException as e:  # handed to the caller's thread by join()
            self.error = e

    def start(self):
        self._thread.start()

    def join(self):
        self._thread.join()


class AgeWriter(io.RawIOBase):
    """A write-only stream that age-encrypts what it is given into `sink`.

    close() finishes the file and raises what the encryptor raised; abort() discards.
    """

    def __init__(self, sink, key: BackupKey):
        super().__init__()
        read_fd, write_fd = os.pipe()
        self._pipe = os.fdopen(write_fd, "wb", buffering=0)
        source = os.fdopen(read_fd, "rb", buffering=PIPE_CHUNK)

        def encrypt():
            with source:
                pyrage.encrypt_io(source, sink, [key.recipient])

        self._worker = _PipeThread(encrypt)
        self._worker.start()

    def writable(self):
        return True

    def write(self, data) -> int:
        try:
            self._pipe.write(data)
        except BrokenPipeError:
            self._pipe.close()
            self._worker.join()
            raise BackupIntegrityError(f"age encryption failed: {self._worker.error}") from None
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._pipe.close()
            self._worker.join()
            super().close()
            if self._worker.error is not None:
                raise BackupIntegrityError(f"age encryption failed: {self._worker.error}")

    def abort(self) -> None:
        """Stop the encryptor without raising: the file is being thrown away."""
        if not self.closed:
            self._pipe.close()
            self._worker.join()
            super().close()


def _age_identities() -> list:
    return [k.identity for k in backup_keys() if k.age]


def _age_error(e: BaseException) -> BackupIntegrityError:
    if not _age_identities():
        return BackupIntegrityError(
            "The file is age-encrypted and BACKUP_ENCRYPTION_KEY holds no age identity."
        )
    return BackupIntegrityError(
        f"The age-encrypted file does not decrypt with BACKUP_ENCRYPTION_KEY: it is corrupt, "
        f"truncated, tampered with, or made with another key ({e})."
    )


def age_decrypt_to(source, sink) -> None:
    """Decrypt an age stream into sink (something with write()); BackupIntegrityError on failure."""
    identities = _age_identities()
    if not identities:
        raise _age_error(None)
    try:
        pyrage.decrypt_io(source, sink, identities)
    except pyrage.DecryptError as e:
        raise _age_error(e) from e


class AgeReader(io.RawIOBase):
    """A readable stream of an age file's plaintext (for gzip.GzipFile and the like).

    Reaching the end raises BackupIntegrityError if the file failed authentication, so a
    consumer never mistakes a cut-off stream for a whole one.
    """

    def __init__(self, source):
        super().__init__()
        read_fd, write_fd = os.pipe()
        self._pipe = os.fdopen(read_fd, "rb", buffering=0)
        sink = os.fdopen(write_fd, "wb", buffering=0)

        def decrypt():
            with sink:
                age_decrypt_to(source, sink)

        self._worker = _PipeThread(decrypt)
        self._worker.start()

    def readable(self):
        return True

    def readinto(self, buffer) -> int:
        n = self._pipe.readinto(buffer)
        if not n:
            self._worker.join()
            if self._worker.error is not None:
                error = self._worker.error
                if isinstance(error, BackupIntegrityError):
                    raise error
                raise _age_error(error)
        return n

    def close(self) -> None:
        if not self.closed:
            self._pipe.close()  # a blocked writer gets EPIPE and ends
            self._worker.join()
        super().close()


def decrypting_reader(source) -> io.RawIOBase:
    """A readable stream of an encrypted file's plaintext, age or the old format."""
    head = source.read(len(AGE_MAGIC))
    source.seek(0)
    if head == AGE_MAGIC:
        return AgeReader(source)
    return DecryptingReader(source)


# ---------------------------------------------------------------------------------------
# The old format, read only
def _nonce(index: int, final: bool) -> bytes:
    return index.to_bytes(11, "big") + (b"\x01" if final else b"\x00")


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


def age_seal_bytes(data: bytes, key: BackupKey) -> bytes:
    """A small file's content as age ciphertext (the key store's files)."""
    return pyrage.encrypt(data, [key.recipient])


def age_open_bytes(data: bytes) -> bytes:
    identities = _age_identities()
    if not identities:
        raise _age_error(None)
    try:
        return pyrage.decrypt(data, identities)
    except pyrage.DecryptError as e:
        raise _age_error(e) from e
