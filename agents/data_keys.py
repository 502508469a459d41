"""Per-tenant data keys: the envelope around every belief state.

Beliefs are encrypted with a data key of their tenant (a Fernet key). Data keys are
stored in tenant_data_keys wrapped by the master keys (MultiFernet over
FREEAGENTICS_ENCRYPTION_KEYS), so retiring a master key rewraps a few rows per tenant
instead of re-encrypting every belief, and destroying a tenant's data keys makes every
belief it wrote unreadable (crypto-shredding).

Key rows are read and created on short connections of their own, never on the caller's:
a key created inside a transaction that later rolls back would otherwise vanish while
this process kept encrypting with it, and an async consumer may need a key where
Django's connection may not be used. Unwrapped keys are cached in memory, bounded, and
never logged; a tenant's active key is re-read after ENCRYPTION_ACTIVE_KEY_SECONDS, so
other processes switch to a rotated key within that time.
"""

import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass

import psycopg
from cryptography.fernet import Fernet, InvalidToken
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.signals import setting_changed
from django.db import DEFAULT_DB_ALIAS, connections
from django.dispatch import receiver

from agents.exceptions import BeliefStateDecryptionError, TenantShreddedError

TABLE = "tenant_data_keys"
# Unwrapped keys held per process; a miss costs one short query.
CACHE_SIZE = 4096
KEY_LOCK_TIMEOUT_MS = 10_000


@dataclass(frozen=True, slots=True)
class DataKey:
    id: int
    tenant_id: uuid.UUID
    fernet: Fernet

    def __repr__(self):  # never the key material
        return f"DataKey(id={self.id}, tenant_id={self.tenant_id})"


class _Cache:
    def __init__(self):
        self.lock = threading.Lock()
        self.by_id: OrderedDict[int, DataKey] = OrderedDict()
        self.active: dict[uuid.UUID, tuple[DataKey, float]] = {}

    def clear(self) -> None:
        with self.lock:
            self.by_id.clear()
            self.active.clear()

    def remember(self, key: DataKey) -> None:
        with self.lock:
            self.by_id[key.id] = key
            self.by_id.move_to_end(key.id)
            while len(self.by_id) > CACHE_SIZE:
                self.by_id.popitem(last=False)


_cache = _Cache()


@receiver(setting_changed)
def _forget_keys(*, setting, **kwargs):
    if setting in {"FREEAGENTICS_ENCRYPTION_KEYS", "DATABASES"}:
        _cache.clear()


def forget_cached_keys() -> None:
    """Drop every unwrapped key this process holds (after rotation or shredding)."""
    _cache.clear()


def key_connection() -> psycopg.Connection:
    """A short connection to the default database, outside Django's, whose `with` block
    is one transaction: committed when the block ends, rolled back on an error. Its
    lock waits are bounded: a key row held by a stuck transaction is an error, not a
    writer hanging forever."""
    params = connections[DEFAULT_DB_ALIAS].get_connection_params()
    params.pop("cursor_factory", None)
    params.pop("context", None)
    conn = psycopg.connect(**params, autocommit=False)
    try:
        # SET LOCAL, not `-c lock_timeout` in the startup packet: PgBouncer 1.18 refuses
        # the options parameter, and behind a pooler in transaction mode nothing may
        # outlive the transaction (a session SET would stay on the server connection).
        conn.execute(f"SET LOCAL lock_timeout = {int(KEY_LOCK_TIMEOUT_MS)}")
    except BaseException:
        conn.close()
        raise
    return conn


def _master():
    # Imported here: agents.encryption imports this module.
    from agents.encryption import multi_fernet

    return multi_fernet()


def wrap(raw_key: bytes) -> bytes:
    return _master().encrypt(raw_key)


def unwrap(key_id: int, wrapped: bytes) -> Fernet:
    try:
        return Fernet(_master().decrypt(bytes(wrapped)))
    except InvalidToken:
        raise BeliefStateDecryptionError(
            f"Data key {key_id} cannot be unwrapped: no key in FREEAGENTICS_ENCRYPTION_KEYS "
            "opens it (wrong or retired master key)."
        ) from None


def key_by_id(key_id: int) -> DataKey:
    """The data key a token names. Raises BeliefStateDecryptionError when it does not
    exist, and TenantShreddedError when it was destroyed."""
    key = _cache.by_id.get(key_id)
    if key is not None:
        return key
    with key_connection() as conn:
        row = conn.execute(
            f"SELECT tenant_id, wrapped_key FROM {TABLE} WHERE id = %s", [key_id]
        ).fetchone()
    if row is None:
        raise BeliefStateDecryptionError(f"Data key {key_id} does not exist.")
    tenant_id, wrapped = row
    if wrapped is None:
        raise TenantShreddedError(
            f"Data key {key_id} was destroyed: tenant {tenant_id} was shredded, and what "
            "the key encrypted is gone for good."
        )
    key = DataKey(key_id, tenant_id, unwrap(key_id, wrapped))
    _cache.remember(key)
    return key


def active_key(tenant_id) -> DataKey:
    """The key new beliefs of the tenant are encrypted with; created on first use."""
    tenant_id = tenant_id if isinstance(tenant_id, uuid.UUID) else uuid.UUID(str(tenant_id))
    now = time.monotonic()
    cached = _cache.active.get(tenant_id)
    if cached is not None and cached[1] > now:
        return cached[0]
    key = _load_or_create_active(tenant_id)
    _cache.remember(key)
    with _cache.lock:
        _cache.active[tenant_id] = (key, now + settings.ENCRYPTION_ACTIVE_KEY_SECONDS)
    return key


_ACTIVE_SQL = f"""
SELECT id, wrapped_key FROM {TABLE} WHERE tenant_id = %s AND retired_at IS NULL
"""
_SHREDDED_SQL = f"SELECT 1 FROM {TABLE} WHERE tenant_id = %s AND destroyed_at IS NOT NULL LIMIT 1"
_CREATE_SQL = f"""
INSERT INTO {TABLE} (tenant_id, wrapped_key, created_at) VALUES (%s, %s, now())
ON CONFLICT (tenant_id) WHERE retired_at IS NULL DO NOTHING
RETURNING id, wrapped_key
"""


def _load_or_create_active(tenant_id: uuid.UUID) -> DataKey:
    with key_connection() as conn:
        row = conn.execute(_ACTIVE_SQL, [tenant_id]).fetchone()
        if row is None:
            if conn.execute(_SHREDDED_SQL, [tenant_id]).fetchone():
                raise TenantShreddedError(
                    f"Tenant {tenant_id} was shredded: it gets no new data key."
                )
            row = conn.execute(_CREATE_SQL, [tenant_id, wrap(Fernet.generate_key())]).fetchone()
            # Another process created it between the two statements.
            row = row or conn.execute(_ACTIVE_SQL, [tenant_id]).fetchone()
    key_id, wrapped = row
    # Already unwrapped in this process: a rewrap by a master-key rotation changes the
    # wrapping, not the key.
    known = _cache.by_id.get(key_id)
    return known or DataKey(key_id, tenant_id, unwrap(key_id, wrapped))


def check_master_keys() -> None:
    """Start-up check: every live data key must open with a configured master key.
    Raises ImproperlyConfigured naming how many do not (never the keys); does nothing
    before the migrations made the table."""
    with key_connection() as conn:
        if conn.execute("SELECT to_regclass(%s)", [TABLE]).fetchone()[0] is None:
            return
        rows = conn.execute(
            f"SELECT id, wrapped_key FROM {TABLE} WHERE wrapped_key IS NOT NULL"
        ).fetchall()
    master = _master()
    unopened = []
    for key_id, wrapped in rows:
        try:
            master.decrypt(bytes(wrapped))
        except InvalidToken:
            unopened.append(key_id)
    if unopened:
        raise ImproperlyConfigured(
            f"FREEAGENTICS_ENCRYPTION_KEYS opens {len(rows) - len(unopened)} of {len(rows)} "
            f"data keys (first that does not: {unopened[0]}). The master key that wrapped "
            "them is missing: add it back (after the new first key) and run "
            "manage.py rotate_encryption_keys."
        )
