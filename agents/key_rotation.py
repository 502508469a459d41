"""Key rotation: master keys in O(tenants), data keys online, legacy tokens converted.

- Master keys (FREEAGENTICS_ENCRYPTION_KEYS) only wrap data keys: retiring one rewraps
  each tenant's few data keys under the first master key, and rewrites no belief.
- A data key is rotated by retiring it: new writes take the tenant's new key at once
  (other processes within ENCRYPTION_ACTIVE_KEY_SECONDS), and `beliefs_reencrypt` moves
  the rows still under retired keys, and tokens from before envelope encryption, to
  their tenant's active key.

Re-encryption never deadlocks with writers, because it never waits for a row lock while
holding one: each batch first takes agent_history's table lock (ROW EXCLUSIVE, the
writers' own mode, which only waits for partition maintenance), then locks its rows with
FOR UPDATE SKIP LOCKED and rewrites only those. A row a writer holds is skipped, and a
later pass over `agents` picks it up. Batches walk the primary keys, (id) and
(id, recorded_at), and each partition is updated by its full key, so a batch costs the
same at 20M rows as at 20k. Each batch commits on its own: an interrupted run keeps
what it did, and a rerun skips rows already under their tenant's active key.
"""

import uuid
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

from cryptography.fernet import InvalidToken
from django.db import connection, transaction

from agents import cache, data_keys
from agents.encryption import multi_fernet, open_token, seal, token_key_id
from agents.exceptions import BeliefStateDecryptionError, TenantShreddedError

_AGENTS_SCAN = """
SELECT id, tenant_id, belief_state FROM agents
WHERE belief_state IS NOT NULL AND id > %s::uuid {tenant} ORDER BY id LIMIT %s {lock}
"""
# The agent's tenant names the key for tokens from before envelope encryption; a token
# under a data key carries its tenant in the key.
_HISTORY_SCAN = """
SELECT h.tableoid::regclass::text, h.id, h.recorded_at, h.belief_state, a.tenant_id
FROM agent_history h LEFT JOIN agents a ON a.id = h.agent_id
WHERE h.belief_state IS NOT NULL AND (h.id, h.recorded_at) > (%s::uuid, %s::timestamptz)
ORDER BY h.id, h.recorded_at LIMIT %s {lock}
"""
_AGENTS_UPDATE = """
UPDATE agents AS t SET belief_state = v.token
FROM unnest(%s::uuid[], %s::bytea[]) AS v(id, token) WHERE t.id = v.id
"""
# Run against one partition (its name comes from tableoid): no other partition is read.
_PARTITION_UPDATE = """
UPDATE {partition} AS t SET belief_state = v.token
FROM unnest(%s::uuid[], %s::timestamptz[], %s::bytea[]) AS v(id, recorded_at, token)
WHERE t.id = v.id AND t.recorded_at = v.recorded_at
"""


def keyed_joins(cursor) -> None:
    """For the rest of the transaction, join a batch to its table by probing the primary
    key row by row. Left to itself the planner hashes the batch and scans the whole
    partition once it holds fewer than some millions of rows, so a batch's cost would
    grow with the table; probing costs the same at 20k rows as at 20M."""
    cursor.execute("SET LOCAL enable_hashjoin = off")
    cursor.execute("SET LOCAL enable_mergejoin = off")


_ZERO_UUID = uuid.UUID(int=0)
AGENT_PASSES = 5
# Agent rows are what writers wait for: batches over agents stay this small, so a writer
# waits at most one short batch (history rows are never updated by writers).
AGENT_BATCH_MAX = 100
_EPOCH = "-infinity"


@dataclass
class ReencryptCounts:
    scanned: int = 0
    reencrypted: int = 0
    current: int = 0
    skipped_locked: int = 0
    # Tokens from before envelope encryption whose agent is gone: no tenant to key them.
    orphaned: int = 0
    shredded: int = 0
    by_table: Counter = field(default_factory=Counter)
    # Rows seen under each data key after the pass (legacy tokens under None).
    under_key: Counter = field(default_factory=Counter)


def master_keys_rotate() -> int:
    """Rewrap every live data key under the first master key, in one transaction of
    the key store's own. Returns how many."""
    master = multi_fernet()
    with data_keys.key_connection() as conn, conn.transaction():
        rows = conn.execute(
            f"SELECT id, wrapped_key FROM {data_keys.TABLE} "
            "WHERE wrapped_key IS NOT NULL ORDER BY id FOR UPDATE"
        ).fetchall()
        rewrapped = []
        for key_id, wrapped in rows:
            try:
                rewrapped.append((key_id, master.rotate(bytes(wrapped))))
            except InvalidToken:
                raise BeliefStateDecryptionError(
                    f"Data key {key_id} cannot be unwrapped: no key in "
                    "FREEAGENTICS_ENCRYPTION_KEYS opens it (was its master key removed?)."
                ) from None
        if rewrapped:
            conn.execute(
                f"UPDATE {data_keys.TABLE} AS k SET wrapped_key = v.wrapped "
                "FROM unnest(%s::int[], %s::bytea[]) AS v(id, wrapped) WHERE k.id = v.id",
                [[k for k, _ in rewrapped], [w for _, w in rewrapped]],
            )
    data_keys.forget_cached_keys()
    return len(rewrapped)


def data_keys_rotate(tenant_ids) -> dict:
    """Retire the active data key of each tenant and give it a new one, committed at
    once on the key store's own connection (whatever transaction the caller is in).
    Returns {tenant_id: new key id}."""
    new_ids = {}
    with data_keys.key_connection() as conn, conn.transaction():
        for tenant_id in sorted(str(t) for t in tenant_ids):
            if conn.execute(
                f"SELECT 1 FROM {data_keys.TABLE} "
                "WHERE tenant_id = %s AND destroyed_at IS NOT NULL LIMIT 1",
                [tenant_id],
            ).fetchone():
                raise TenantShreddedError(f"Tenant {tenant_id} was shredded: it has no keys.")
            conn.execute(
                f"UPDATE {data_keys.TABLE} SET retired_at = now() "
                "WHERE tenant_id = %s AND retired_at IS NULL",
                [tenant_id],
            )
            new_ids[uuid.UUID(tenant_id)] = conn.execute(
                f"INSERT INTO {data_keys.TABLE} (tenant_id, wrapped_key, created_at) "
                "VALUES (%s, %s, now()) RETURNING id",
                [tenant_id, data_keys.wrap(data_keys.Fernet.generate_key())],
            ).fetchone()[0]
    data_keys.forget_cached_keys()
    return new_ids


class _Rekeyer:
    """Decides, row by row, whether a token must move to its tenant's active key."""

    def __init__(self, tenant_ids, counts: ReencryptCounts, dry_run: bool):
        self.tenant_ids = None if tenant_ids is None else {str(t) for t in tenant_ids}
        self.counts = counts
        self.dry_run = dry_run

    def new_token(self, token: bytes, row_tenant, where: str) -> bytes | None:
        """The token under the active key, or None when it stays as it is. `where`
        names the row in errors."""
        try:
            return self._new_token(token, row_tenant)
        except TenantShreddedError:
            self.counts.shredded += 1
            return None
        except BeliefStateDecryptionError as e:
            raise BeliefStateDecryptionError(f"{where}: {e}") from e

    def _new_token(self, token: bytes, row_tenant) -> bytes | None:
        key_id = token_key_id(token)
        tenant = data_keys.key_by_id(key_id).tenant_id if key_id else row_tenant
        if tenant is None:
            self.counts.orphaned += 1
            self.counts.under_key[None] += 1
            return None
        if self.tenant_ids is not None and str(tenant) not in self.tenant_ids:
            return None
        active = data_keys.active_key(tenant)
        if key_id == active.id:
            self.counts.current += 1
            self.counts.under_key[key_id] += 1
            return None
        plaintext = open_token(token, tenant_id=tenant)
        self.counts.under_key[active.id] += 1
        # A dry run still opens the token: it proves the row is readable.
        return token if self.dry_run else seal(plaintext, active)


def beliefs_reencrypt(
    *,
    tenant_ids=None,
    batch_size: int = 1000,
    dry_run: bool = False,
    on_batch: Callable[[int], None] | None = None,
) -> ReencryptCounts:
    """Move every belief not under its tenant's active data key (of `tenant_ids`, or of
    every tenant) to that key. With dry_run, count them and take no lock."""
    counts = ReencryptCounts()
    rekeyer = _Rekeyer(tenant_ids, counts, dry_run)
    _history_pass(rekeyer, batch_size, dry_run, on_batch)
    # Agents last, and again while a pass skipped rows a writer held (a writer writes
    # with the active key, so its rows usually need nothing by the next pass).
    for _ in range(AGENT_PASSES):
        counts.skipped_locked = _agents_pass(rekeyer, batch_size, dry_run, on_batch)
        if not counts.skipped_locked or dry_run:
            break
    if not dry_run:
        _record_remaining(counts, tenant_ids)
    return counts


def _lock_clause(dry_run: bool, of: str = "") -> str:
    return "" if dry_run else f"FOR UPDATE {of} SKIP LOCKED"


def _agents_pass(rekeyer: _Rekeyer, batch_size: int, dry_run: bool, on_batch) -> int:
    """One pass over agents; returns how many rows were skipped for a writer's lock."""
    counts = rekeyer.counts
    tenant_filter = ""
    params_tenant = []
    if rekeyer.tenant_ids is not None:
        tenant_filter = "AND tenant_id = ANY(%s::uuid[])"
        params_tenant = [sorted(rekeyer.tenant_ids)]
    sql = _AGENTS_SCAN.format(tenant=tenant_filter, lock=_lock_clause(dry_run))
    after, skipped = _ZERO_UUID, 0
    batch_size = min(batch_size, AGENT_BATCH_MAX)
    while True:
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute(sql, [after, *params_tenant, batch_size])
            rows = cursor.fetchall()
            if not rows:
                break
            if not dry_run:
                # Rows inside this batch's id range that SKIP LOCKED passed over.
                cursor.execute(
                    f"SELECT count(*) FROM agents WHERE belief_state IS NOT NULL "
                    f"AND id > %s AND id <= %s {tenant_filter}",
                    [after, rows[-1][0], *params_tenant],
                )
                skipped += cursor.fetchone()[0] - len(rows)
            changed = []
            for agent_id, tenant_id, token in rows:
                new = rekeyer.new_token(bytes(token), tenant_id, f"agents row {agent_id}")
                if new is not None:
                    changed.append((agent_id, new))
            if changed and not dry_run:
                cursor.execute(_AGENTS_UPDATE, [[a for a, _ in changed], [t for _, t in changed]])
                ids = [a for a, _ in changed]
                transaction.on_commit(lambda ids=ids: cache.agents_forget(ids))
        after = rows[-1][0]
        counts.scanned += len(rows)
        counts.reencrypted += len(changed)
        counts.by_table["agents"] += len(changed)
        if on_batch:
            on_batch(len(rows))
    return skipped


def _history_pass(rekeyer: _Rekeyer, batch_size: int, dry_run: bool, on_batch) -> None:
    counts = rekeyer.counts
    sql = _HISTORY_SCAN.format(lock=_lock_clause(dry_run, "OF h"))
    after = (_ZERO_UUID, _EPOCH)
    while True:
        with transaction.atomic(), connection.cursor() as cursor:
            if not dry_run:
                # The writers' own lock mode: waits only for partition maintenance, and
                # is taken before any row lock, so no wait ever holds one.
                cursor.execute("LOCK TABLE agent_history IN ROW EXCLUSIVE MODE")
            cursor.execute(sql, [*after, batch_size])
            rows = cursor.fetchall()
            if not rows:
                break
            by_partition = defaultdict(list)
            for partition, row_id, recorded_at, token, tenant_id in rows:
                where = f"{partition} row {row_id}"
                new = rekeyer.new_token(bytes(token), tenant_id, where)
                if new is not None:
                    by_partition[partition].append((row_id, recorded_at, new))
            changed = sum(len(v) for v in by_partition.values())
            if by_partition and not dry_run:
                keyed_joins(cursor)
                for partition, items in by_partition.items():
                    cursor.execute(
                        _PARTITION_UPDATE.format(partition=partition),
                        [[i[0] for i in items], [i[1] for i in items], [i[2] for i in items]],
                    )
        after = (rows[-1][1], rows[-1][2])
        counts.scanned += len(rows)
        counts.reencrypted += changed
        counts.by_table["agent_history"] += changed
        if on_batch:
            on_batch(len(rows))


def _record_remaining(counts: ReencryptCounts, tenant_ids) -> None:
    """Store, per data key, the rows the pass left under it (the admin shows it)."""
    seen = {k: n for k, n in counts.under_key.items() if k is not None}
    scope, params = "", []
    if tenant_ids is not None:
        scope, params = "WHERE tenant_id = ANY(%s::uuid[])", [[str(t) for t in tenant_ids]]
    with data_keys.key_connection() as conn:
        conn.execute(
            f"UPDATE {data_keys.TABLE} AS k SET rows_remaining = coalesce(v.n, 0), "
            f"counted_at = now() FROM (SELECT id FROM {data_keys.TABLE} {scope}) AS s "
            "LEFT JOIN unnest(%s::int[], %s::bigint[]) AS v(id, n) ON v.id = s.id "
            "WHERE k.id = s.id",
            [*params, list(seen), list(seen.values())],
        )
