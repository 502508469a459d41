"""The S3 path, against moto's S3-compatible server process on loopback."""

from io import StringIO

import boto3
import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection

from backups import storage
from tests.backups.conftest import table_rows

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

BUCKET = "fa-backups"


@pytest.fixture
def s3_backups(moto_server, settings, tmp_path):
    """STORAGES["backups"] on a fresh bucket in the moto server."""
    options = {
        "bucket_name": BUCKET,
        "location": "nightly",
        "endpoint_url": moto_server,
        "region_name": "us-east-1",
        "access_key": "test",
        "secret_key": "test",
        "file_overwrite": False,
        "max_memory_size": 1024 * 1024,
    }
    client = boto3.client(
        "s3",
        endpoint_url=moto_server,
        region_name="us-east-1",
        aws_access_key_id="test",
        aws_secret_access_key="test",
    )
    client.create_bucket(Bucket=BUCKET)
    settings.STORAGES = {
        **settings.STORAGES,
        "backups": {"BACKEND": "storages.backends.s3.S3Storage", "OPTIONS": options},
    }
    settings.BACKUP_TEMP_DIR = str(tmp_path)
    yield client
    objects = client.list_objects_v2(Bucket=BUCKET).get("Contents", [])
    for obj in objects:
        client.delete_object(Bucket=BUCKET, Key=obj["Key"])
    client.delete_bucket(Bucket=BUCKET)


def keys(client, *, key_store: bool = False) -> list[str]:
    """The bucket's objects: those of backups, or (key_store=True) of the key store."""
    found = sorted(o["Key"] for o in client.list_objects_v2(Bucket=BUCKET).get("Contents", []))
    return [k for k in found if k.startswith("nightly/keys/") == key_store]


def test_backup_list_drill_and_restore_through_s3(
    s3_backups, sample_data, redis_client, backup_key
):
    redis_client.set("session", b"abc")
    before = table_rows()
    out = StringIO()
    call_command("backup", stdout=out)
    name = out.getvalue().strip().splitlines()[-1]

    assert keys(s3_backups) == [
        f"nightly/{name}/manifest.json",
        f"nightly/{name}/postgres.dump.age",
        f"nightly/{name}/redis-keys.gz.age",
        f"nightly/{name}/redis.rdb.gz.age",
    ]
    # The tenant's data keys, sealed like the backup, beside it.
    assert keys(s3_backups, key_store=True) == [f"nightly/keys/{sample_data['tenant'].id}.json.age"]
    listing = StringIO()
    call_command("listbackups", stdout=listing)
    assert name in listing.getvalue() and "complete" in listing.getvalue()
    call_command("verify_backup", name, stdout=StringIO())

    with connection.cursor() as cursor:
        cursor.execute("TRUNCATE tenants, agent_history CASCADE")
    redis_client.flushdb()
    call_command("restore", name, "--yes", stdout=StringIO())

    assert table_rows() == before
    assert redis_client.get("session") == b"abc"


def test_corrupt_object_in_s3_is_refused(s3_backups, sample_data, no_rdb):
    out = StringIO()
    call_command("backup", "--no-redis", stdout=out)
    name = out.getvalue().strip().splitlines()[-1]
    key = f"nightly/{name}/postgres.dump"
    body = s3_backups.get_object(Bucket=BUCKET, Key=key)["Body"].read()
    s3_backups.put_object(Bucket=BUCKET, Key=key, Body=body[:-1] + bytes([body[-1] ^ 1]))
    before = table_rows()

    with pytest.raises(CommandError, match=r"postgres\.dump is corrupt"):
        call_command("restore", name, "--yes", stdout=StringIO())

    assert table_rows() == before
    storage.delete_backup(name)
    assert keys(s3_backups) == []
