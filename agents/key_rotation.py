"""Re-encrypt every stored belief state under the first FREEAGENTICS_ENCRYPTION_KEYS key.

Each batch commits on its own, so an interrupted run keeps what it did; a rerun skips
tokens the primary key already opens, which makes resuming cheap and idempotent.
"""

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from django.apps import apps
from django.db import connection, transaction

from agents.encryption import rotate_token
from agents.exceptions import BeliefStateDecryptionError
from agents.fields import EncryptedArrayField


@dataclass
class RotationCounts:
    scanned: int = 0
    rotated: int = 0
    current: int = 0
    by_table: dict[str, int] = field(default_factory=dict)


def encrypted_columns() -> Iterator[tuple[str, str]]:
    """(table, column) of every EncryptedArrayField in the project."""
    for model in apps.get_models():
        for f in model._meta.concrete_fields:
            if isinstance(f, EncryptedArrayField):
                yield model._meta.db_table, f.column


def count_encrypted_rows() -> int:
    total = 0
    with connection.cursor() as cursor:
        for table, column in encrypted_columns():
            cursor.execute(f'SELECT count(*) FROM "{table}" WHERE "{column}" IS NOT NULL')
            total += cursor.fetchone()[0]
    return total


def _rotate_batch(table: str, column: str, after, batch_size: int, dry_run: bool):
    with transaction.atomic(), connection.cursor() as cursor:
        # FOR UPDATE: a concurrent writer must not be overwritten with an older state.
        cursor.execute(
            f'SELECT id, "{column}" FROM "{table}" '
            f'WHERE "{column}" IS NOT NULL AND (%s::uuid IS NULL OR id > %s::uuid) '
            f"ORDER BY id LIMIT %s FOR UPDATE",
            [after, after, batch_size],
        )
        rows = cursor.fetchall()
        changed = []
        for pk, token in rows:
            try:
                new = rotate_token(token)
            except BeliefStateDecryptionError as e:
                raise BeliefStateDecryptionError(f"{table}.{column} row {pk}: {e}") from e
            if new is not None:
                changed.append((pk, new))
        if changed and not dry_run:
            cursor.execute(
                f'UPDATE "{table}" AS t SET "{column}" = v.token '
                f"FROM unnest(%s::uuid[], %s::bytea[]) AS v(id, token) WHERE t.id = v.id",
                [[pk for pk, _ in changed], [new for _, new in changed]],
            )
    return rows, len(changed)


def encryption_keys_rotate(
    *,
    batch_size: int = 1000,
    dry_run: bool = False,
    on_batch: Callable[[int], None] | None = None,
) -> RotationCounts:
    """Re-encrypt all belief states under the primary key.

    Returns counts of rows scanned, rotated (or, with dry_run, that would be) and
    already current. Raises BeliefStateDecryptionError if a row opens with no key.
    """
    counts = RotationCounts()
    for table, column in encrypted_columns():
        after = None
        counts.by_table.setdefault(table, 0)
        while True:
            rows, changed = _rotate_batch(table, column, after, batch_size, dry_run)
            if not rows:
                break
            after = rows[-1][0]
            counts.scanned += len(rows)
            counts.rotated += changed
            counts.current += len(rows) - changed
            counts.by_table[table] += changed
            if on_batch:
                on_batch(len(rows))
    return counts
