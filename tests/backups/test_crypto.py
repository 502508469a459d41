import io

import pytest
from cryptography.fernet import Fernet
from django.core.exceptions import ImproperlyConfigured

from backups.crypto import (
    DecryptingReader,
    EncryptingWriter,
    backup_keys,
    encryption_key,
    iter_decrypted,
)
from backups.exceptions import BackupIntegrityError


def seal(data: bytes, key, chunk_size: int = 64) -> bytes:
    out = io.BytesIO()
    writer = EncryptingWriter(out, key, chunk_size)
    for i in range(0, len(data), 50):  # writes that straddle chunk boundaries
        writer.write(data[i : i + 50])
    writer.close()
    return out.getvalue()


def open_sealed(blob: bytes, key=None) -> bytes:
    return b"".join(iter_decrypted(io.BytesIO(blob), key))


@pytest.fixture
def key(backup_key):
    """The configured backup key."""
    return encryption_key()


@pytest.mark.parametrize("size", [0, 1, 63, 64, 65, 128, 1000])
def test_round_trip_at_every_chunk_boundary(key, size):
    data = bytes(range(256)) * 4
    data = data[:size]

    blob = seal(data, key)

    assert open_sealed(blob) == data
    assert DecryptingReader(io.BytesIO(blob)).read() == data


def test_ciphertext_hides_the_plaintext_and_differs_each_time(key):
    data = b"belief " * 100
    first, second = seal(data, key), seal(data, key)
    assert b"belief" not in first
    assert first != second


@pytest.mark.parametrize("cut", [10, 40, 60, -1, -17])
def test_truncated_stream_is_refused(key, cut):
    blob = seal(b"x" * 300, key)
    with pytest.raises(BackupIntegrityError, match=r"truncated|corrupt"):
        open_sealed(blob[:cut])


def test_dropping_the_final_chunk_is_refused(key):
    blob = seal(b"x" * 100, key, chunk_size=64)
    # header 36 bytes, then chunk 0 (4 + 64 + 16) and the final chunk.
    without_final = blob[: 36 + 4 + 64 + 16]
    with pytest.raises(BackupIntegrityError, match="ends before its final chunk"):
        open_sealed(without_final)


def test_flipped_byte_is_refused(key):
    blob = bytearray(seal(b"x" * 300, key))
    blob[80] ^= 1
    with pytest.raises(BackupIntegrityError, match="fails authentication"):
        open_sealed(bytes(blob))


def test_trailing_data_is_refused(key):
    with pytest.raises(BackupIntegrityError, match="after its final chunk"):
        open_sealed(seal(b"abc", key) + b"more")


def test_other_key_is_refused_with_both_key_ids(key, settings):
    blob = seal(b"secret", key)
    settings.BACKUP_ENCRYPTION_KEY = [Fernet.generate_key().decode()]
    with pytest.raises(BackupIntegrityError, match=f"key id {key.key_id}"):
        open_sealed(blob)


def test_old_key_still_decrypts_after_rotation(key, settings, backup_key):
    blob = seal(b"secret", key)
    settings.BACKUP_ENCRYPTION_KEY = [Fernet.generate_key().decode(), backup_key]
    assert encryption_key().key_id != key.key_id
    assert open_sealed(blob) == b"secret"


def test_malformed_key_names_the_variable(settings):
    settings.BACKUP_ENCRYPTION_KEY = ["not-a-key"]
    with pytest.raises(ImproperlyConfigured, match="BACKUP_ENCRYPTION_KEY entry 1"):
        backup_keys()


def test_backup_key_must_differ_from_field_keys(settings):
    settings.BACKUP_ENCRYPTION_KEY = [settings.FREEAGENTICS_ENCRYPTION_KEYS[0]]
    with pytest.raises(ImproperlyConfigured, match="must differ from every"):
        backup_keys()


def test_no_key_means_no_encryption(settings):
    settings.BACKUP_ENCRYPTION_KEY = []
    assert encryption_key() is None
