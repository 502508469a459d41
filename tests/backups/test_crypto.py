import io
import subprocess

import pyrage
import pytest
from django.core.exceptions import ImproperlyConfigured

from backups.crypto import (
    AGE_MAGIC,
    AgeWriter,
    backup_keys,
    decrypting_reader,
    encryption_key,
)
from backups.exceptions import BackupIntegrityError
from tests.backups.legacy import legacy_seal


def seal(data: bytes, key) -> bytes:
    out = io.BytesIO()
    writer = AgeWriter(out, key)
    for i in range(0, len(data), 50_000):
        writer.write(data[i : i + 50_000])
    writer.close()
    return out.getvalue()


def open_sealed(blob: bytes) -> bytes:
    with decrypting_reader(io.BytesIO(blob)) as reader:
        return reader.read()


@pytest.fixture
def key(backup_key):
    """The configured backup key."""
    return encryption_key()


@pytest.mark.parametrize("size", [0, 1, 65535, 65536, 65537, 300_000])
def test_round_trip_at_every_age_chunk_boundary(key, size):
    data = (bytes(range(256)) * 1200)[:size]

    blob = seal(data, key)

    assert blob.startswith(AGE_MAGIC)
    assert open_sealed(blob) == data


def test_ciphertext_hides_the_plaintext_and_differs_each_time(key):
    data = b"belief " * 100
    first, second = seal(data, key), seal(data, key)
    assert b"belief" not in first
    assert first != second


@pytest.mark.reliability("restore faults")
@pytest.mark.parametrize("cut", [10, 200, -1, -17, -65536])
def test_truncated_age_file_is_refused(key, cut):
    blob = seal(b"x" * 200_000, key)
    with pytest.raises(BackupIntegrityError, match=r"does not decrypt|truncated"):
        open_sealed(blob[:cut])


@pytest.mark.reliability("restore faults")
def test_flipped_byte_is_refused(key):
    blob = bytearray(seal(b"x" * 200_000, key))
    blob[-1000] ^= 1
    with pytest.raises(BackupIntegrityError, match="does not decrypt"):
        open_sealed(bytes(blob))


def test_debians_age_decrypts_with_the_configured_key(key, backup_key, tmp_path):
    identity = tmp_path / "key.txt"
    identity.write_text(backup_key + "\n")
    blob = seal(b"disaster recovery" * 1000, key)

    out = subprocess.run(
        ["age", "--decrypt", "--identity", str(identity)], input=blob, capture_output=True
    )

    assert out.returncode == 0, out.stderr
    assert out.stdout == b"disaster recovery" * 1000


def test_other_key_is_refused(key, settings):
    blob = seal(b"secret", key)
    settings.BACKUP_ENCRYPTION_KEY = [str(pyrage.x25519.Identity.generate())]
    with pytest.raises(BackupIntegrityError, match="another key"):
        open_sealed(blob)


def test_old_key_still_decrypts_after_rotation(key, settings, backup_key):
    blob = seal(b"secret", key)
    settings.BACKUP_ENCRYPTION_KEY = [str(pyrage.x25519.Identity.generate()), backup_key]
    assert encryption_key().key_id != key.key_id
    assert open_sealed(blob) == b"secret"


def test_old_format_files_still_decrypt_with_the_old_key(settings, backup_key, legacy_key):
    settings.BACKUP_ENCRYPTION_KEY = [backup_key, legacy_key]
    old = backup_keys()[1]
    data = bytes(range(256)) * 3

    assert open_sealed(legacy_seal(data, old)) == data


@pytest.mark.reliability("restore faults")
def test_old_format_tampering_is_still_refused(settings, backup_key, legacy_key):
    settings.BACKUP_ENCRYPTION_KEY = [backup_key, legacy_key]
    blob = bytearray(legacy_seal(b"x" * 300, backup_keys()[1]))
    blob[80] ^= 1
    with pytest.raises(BackupIntegrityError, match="fails authentication"):
        open_sealed(bytes(blob))


def test_an_old_format_key_cannot_encrypt(settings, legacy_key):
    settings.BACKUP_ENCRYPTION_KEY = [legacy_key]
    with pytest.raises(ImproperlyConfigured, match="put an age identity first"):
        encryption_key()


def test_malformed_key_names_the_variable(settings):
    settings.BACKUP_ENCRYPTION_KEY = ["not-a-key"]
    with pytest.raises(ImproperlyConfigured, match="BACKUP_ENCRYPTION_KEY entry 1"):
        backup_keys()


def test_malformed_age_identity_names_the_variable(settings):
    settings.BACKUP_ENCRYPTION_KEY = ["AGE-SECRET-KEY-1QQQQ"]
    with pytest.raises(ImproperlyConfigured, match="entry 1 is not a valid age identity"):
        backup_keys()


def test_backup_key_must_differ_from_field_keys(settings):
    settings.BACKUP_ENCRYPTION_KEY = [settings.FREEAGENTICS_ENCRYPTION_KEYS[0]]
    with pytest.raises(ImproperlyConfigured, match="must differ from every"):
        backup_keys()


def test_no_key_means_no_encryption(settings):
    settings.BACKUP_ENCRYPTION_KEY = []
    assert encryption_key() is None
