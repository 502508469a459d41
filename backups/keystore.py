"""The key store: tenants' wrapped data keys, kept beside the backups, not inside them.

pg_dump leaves tenant_data_keys' rows out of every dump. Each backup writes them here
instead, one file per tenant (age-encrypted when BACKUP_ENCRYPTION_KEY is set), replacing
the previous one. Files only grow: retired keys stay, because older backups hold rows
under them. Restore loads them into the restored database.

Shredding a tenant (agents.shredding) deletes its file and leaves a tombstone that names
the destroyed key ids and when, so every older backup's copy of the tenant's beliefs is
unreadable for good, and restore and the drill say so instead of failing.
"""

import base64
import datetime
import json

from django.core.files.base import ContentFile

from backups import storage
from backups.crypto import age_open_bytes, age_seal_bytes, encryption_key
from backups.exceptions import BackupIntegrityError

KEYS_DIR = storage.KEYS_DIR
TABLE = "public.tenant_data_keys"
_KEYS_SQL = (
    "SELECT tenant_id::text, id, wrapped_key, created_at, retired_at FROM tenant_data_keys "
    "WHERE wrapped_key IS NOT NULL ORDER BY tenant_id, id"
)


def _key_file(tenant_id: str, sealed: bool) -> str:
    return f"{KEYS_DIR}/{tenant_id}.json" + (".age" if sealed else "")


def _tombstone(tenant_id: str) -> str:
    return f"{KEYS_DIR}/{tenant_id}.shredded.json"


def _replace(name: str, data: bytes) -> None:
    store = storage.backup_storage()
    if store.exists(name):
        store.delete(name)
    store.save(name, ContentFile(data))


def _iso(value) -> str | None:
    return None if value is None else value.isoformat()


def keys_export(cursor) -> dict:
    """Write every tenant's live data keys, as `cursor` (the dump's snapshot) sees them,
    to the key store. Returns {"tenants": n, "keys": m} for the manifest."""
    cursor.execute("SELECT to_regclass(%s)", [TABLE])
    if cursor.fetchone()[0] is None:
        return {"tenants": 0, "keys": 0}
    cursor.execute(_KEYS_SQL)
    by_tenant: dict[str, list] = {}
    for tenant_id, key_id, wrapped, created_at, retired_at in cursor.fetchall():
        by_tenant.setdefault(tenant_id, []).append(
            {
                "id": key_id,
                "wrapped_key": base64.b64encode(bytes(wrapped)).decode("ascii"),
                "created_at": _iso(created_at),
                "retired_at": _iso(retired_at),
            }
        )
    key = encryption_key()
    store = storage.backup_storage()
    for tenant_id, keys in by_tenant.items():
        if store.exists(_tombstone(tenant_id)):
            continue  # shredded while this backup ran: never write its keys back
        # One line: the disaster-recovery recipe (README) reads one document per line.
        data = json.dumps({"tenant_id": tenant_id, "keys": keys}).encode()
        _replace(_key_file(tenant_id, bool(key)), age_seal_bytes(data, key) if key else data)
        # A file of the other kind (the backup key was set or removed since) goes.
        other = _key_file(tenant_id, not key)
        if store.exists(other):
            store.delete(other)
    return {"tenants": len(by_tenant), "keys": sum(len(k) for k in by_tenant.values())}


def _stored_files() -> list[str]:
    try:
        return storage.backup_storage().listdir(KEYS_DIR)[1]
    except FileNotFoundError:
        return []


def keys_import(cursor) -> dict:
    """Load the key store into the database `cursor` is connected to (a restored copy).
    Keys already present stay; a shredded tenant's destroyed keys come back as destroyed.
    Returns {"keys": n, "shredded": [tenant ids]}."""
    store = storage.backup_storage()
    loaded, shredded = 0, []
    for file_name in sorted(_stored_files()):
        with store.open(f"{KEYS_DIR}/{file_name}", "rb") as fh:
            raw = fh.read(16 * 1024 * 1024)
        try:
            if file_name.endswith(".shredded.json"):
                record = json.loads(raw)
                shredded.append(record["tenant_id"])
                when = record["shredded_at"]
                rows = [(k, None, when, when, when) for k in record["key_ids"]]
            elif file_name.endswith((".json", ".json.age")):
                record = json.loads(age_open_bytes(raw) if file_name.endswith(".age") else raw)
                rows = [
                    (
                        k["id"],
                        base64.b64decode(k["wrapped_key"]),
                        k["created_at"],
                        k["retired_at"],
                        None,
                    )
                    for k in record["keys"]
                ]
            else:
                continue
        except (ValueError, KeyError, TypeError) as e:
            raise BackupIntegrityError(f"Key store file {file_name} is unreadable: {e}") from e
        for row in rows:
            cursor.execute(
                "INSERT INTO tenant_data_keys (id, wrapped_key, created_at, retired_at, "
                "destroyed_at, tenant_id) VALUES (%s, %s, coalesce(%s::timestamptz, now()), "
                "%s, %s, %s) ON CONFLICT (id) DO NOTHING",
                [*row, record["tenant_id"]],
            )
            loaded += cursor.rowcount
    # Later keys must not collide with the ones just loaded.
    cursor.execute(
        "SELECT setval(pg_get_serial_sequence('tenant_data_keys', 'id'), "
        "greatest((SELECT coalesce(max(id), 0) FROM tenant_data_keys), 1))"
    )
    return {"keys": loaded, "shredded": shredded}


def tenant_keys_forget(*, tenant_id: str, shredded_at, key_ids: list[int]) -> None:
    """Delete the tenant's key file, leaving a tombstone (no key material)."""
    store = storage.backup_storage()
    when = shredded_at or datetime.datetime.now(datetime.UTC)
    tombstone = {"tenant_id": tenant_id, "shredded_at": _iso(when), "key_ids": key_ids}
    _replace(_tombstone(tenant_id), json.dumps(tombstone).encode())
    for sealed in (True, False):
        if store.exists(_key_file(tenant_id, sealed)):
            store.delete(_key_file(tenant_id, sealed))
