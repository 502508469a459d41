"""Reads: the backups in storage, and the partition maintenance plan. No side effects."""

import datetime
import re
from dataclasses import dataclass, field

from django.db import connection
from django.utils import timezone

from backups import storage
from backups.crypto import key_for
from backups.exceptions import BackupIntegrityError, BackupNotFound
from backups.manifest import KIND_FULL, Manifest

# ---------------------------------------------------------------------------------------
# Backups


@dataclass
class BackupSummary:
    name: str
    status: str  # complete | incomplete | unreadable
    created_at: datetime.datetime | None
    size: int | None = None
    encrypted: bool = False
    parts: tuple[str, ...] = ()
    manifest: Manifest | None = None
    error: str = ""


def backup_list(*, archives: bool = False) -> list[BackupSummary]:
    """Every backup (or partition archive) in storage, newest first.

    A backup without a manifest is "incomplete" (its writer died or is still running); one
    whose manifest does not parse is "unreadable".
    """
    summaries = []
    for name in storage.list_names(archives=archives):
        try:
            manifest = storage.read_manifest(name)
        except BackupNotFound:
            continue
        except BackupIntegrityError as e:
            incomplete = "no manifest" in str(e)
            summaries.append(
                BackupSummary(
                    name=name,
                    status="incomplete" if incomplete else "unreadable",
                    created_at=storage.stamp_of(name),
                    error=str(e),
                )
            )
            continue
        parts = tuple(f.role for f in manifest.files)
        summaries.append(
            BackupSummary(
                name=name,
                status="complete",
                created_at=manifest.created_at,
                size=manifest.size,
                encrypted=bool(manifest.encryption),
                parts=parts,
                manifest=manifest,
            )
        )
    oldest = datetime.datetime.min.replace(tzinfo=datetime.UTC)
    summaries.sort(key=lambda s: (s.created_at or oldest, s.name), reverse=True)
    return summaries


def backup_get(name: str) -> Manifest:
    """The verified manifest of a backup; name "latest" picks the newest complete full backup.

    Checks the manifest's signature when the backup is encrypted. Raises BackupNotFound,
    BackupIntegrityError, or ImproperlyConfigured for a bad BACKUP_ENCRYPTION_KEY.
    """
    if name == "latest":
        complete = [
            s for s in backup_list() if s.status == "complete" and s.manifest.kind == KIND_FULL
        ]
        if not complete:
            raise BackupNotFound("There is no complete backup in the backup storage.")
        manifest = complete[0].manifest
    else:
        manifest = storage.read_manifest(name)
    if manifest.encryption:
        manifest.check_signature(key_for(manifest.encryption["key_id"]))
    return manifest


@dataclass
class PrunePlan:
    delete: list[BackupSummary]
    keep: list[BackupSummary]


# Incomplete backups younger than this may still be being written.
INCOMPLETE_GRACE = datetime.timedelta(hours=24)


def prune_plan(
    *,
    keep: int | None,
    max_age: datetime.timedelta | None,
    now: datetime.datetime | None = None,
    protect: str | None = None,
    pending_new: bool = False,
) -> PrunePlan:
    """Which backups retention deletes.

    Complete full backups go when they are beyond the `keep` newest, or older than
    `max_age` (both limits apply); the newest complete backup and `protect` never go.
    Incomplete ones go once older than INCOMPLETE_GRACE; unreadable ones are never
    touched (an operator must look at them). Partition archives are not backups and are
    never pruned. pending_new plans for a backup about to be made (the dry run of
    `backup --keep`): it will be the newest, so every existing one counts one place later.
    """
    now = now or timezone.now()
    summaries = backup_list()
    complete = [s for s in summaries if s.status == "complete"]
    delete, kept = [], []
    offset = 1 if pending_new else 0
    for index, summary in enumerate(complete, offset):
        too_many = keep is not None and index >= keep
        too_old = max_age is not None and summary.created_at < now - max_age
        if index == 0 or summary.name == protect or not (too_many or too_old):
            kept.append(summary)
        else:
            delete.append(summary)
    for summary in summaries:
        if summary.status == "incomplete" and summary.name != protect:
            if summary.created_at and summary.created_at < now - INCOMPLETE_GRACE:
                delete.append(summary)
        elif summary.status == "unreadable":
            kept.append(summary)
    return PrunePlan(delete=delete, keep=kept)


_AGE_RE = re.compile(r"^\s*(\d+)\s*([hdw]?)\s*$")


def parse_age(value: str) -> datetime.timedelta | None:
    """'30' or '30d' days, '12h' hours, '8w' weeks; None when it is not an age."""
    match = _AGE_RE.match(value or "")
    if not match:
        return None
    amount, unit = int(match.group(1)), match.group(2) or "d"
    return {"h": datetime.timedelta(hours=amount), "d": datetime.timedelta(days=amount)}.get(
        unit, datetime.timedelta(weeks=amount)
    )


# ---------------------------------------------------------------------------------------
# Partitions

MARK = "freeagentics:partition:"
MARK_MONTHLY = MARK + "monthly"
MARK_DEFAULT = MARK + "default"
MARK_DETACHED = MARK + "detached"
MARK_ARCHIVED = MARK + "archived"  # + " <archive name>"
# Deliberately outside MARK: a partition brought back from an archive is the operator's,
# and maintenance must not retire it again.
MARK_RESTORED = "freeagentics:restored"


@dataclass(frozen=True)
class PartitionedTable:
    """A table partitioned by month of `column`, whose partitions are named <table>_YYYY_MM."""

    table: str
    column: str
    schema: str = "public"

    @property
    def default_name(self) -> str:
        return f"{self.table}_default"

    def month_name(self, month: datetime.date) -> str:
        return f"{self.table}_{month:%Y_%m}"


PARTITIONED_TABLES = (PartitionedTable("agent_history", "recorded_at"),)


@dataclass
class Partition:
    name: str
    comment: str | None
    is_default: bool
    start: datetime.datetime | None = None
    end: datetime.datetime | None = None

    @property
    def managed(self) -> bool:
        return bool(self.comment and self.comment.startswith(MARK))

    @property
    def month(self) -> datetime.date | None:
        """The month this partition holds exactly, or None for any other range."""
        if self.start is None or self.end is None:
            return None
        first = self.start.astimezone(datetime.UTC).date().replace(day=1)
        is_month = self.start == _utc_midnight(first) and self.end == _utc_midnight(
            month_start(first, 1)
        )
        return first if is_month else None


@dataclass
class PartitionAction:
    kind: str  # create_default | create | detach | archive | drop | skip
    parent: str
    table: str
    month: datetime.date | None = None
    rows: int | None = None
    note: str = ""

    def describe(self) -> str:
        text = {
            "create_default": f"create default partition {self.table}",
            "create": f"create {self.table}",
            "detach": f"detach {self.table} (past retention)",
            "archive": f"archive {self.table} to backup storage",
            "drop": f"drop {self.table}",
            "skip": f"leave {self.table} alone",
        }[self.kind]
        if self.kind == "create" and self.rows:
            text += f", moving {self.rows} rows out of the default partition"
        if self.note:
            text += f": {self.note}"
        return text


@dataclass
class PartitionPlan:
    today: datetime.date
    premake: int
    retention_months: int
    actions: list[PartitionAction] = field(default_factory=list)

    @property
    def drops(self) -> list[str]:
        return [a.table for a in self.actions if a.kind == "drop"]

    @property
    def changes(self) -> list[PartitionAction]:
        return [a for a in self.actions if a.kind != "skip"]


def month_start(day: datetime.date, months_ahead: int = 0) -> datetime.date:
    index = day.year * 12 + day.month - 1 + months_ahead
    return datetime.date(index // 12, index % 12 + 1, 1)


def _utc_midnight(day: datetime.date) -> datetime.datetime:
    return datetime.datetime(day.year, day.month, day.day, tzinfo=datetime.UTC)


_BOUNDS_RE = re.compile(r"FOR VALUES FROM \('([^']+)'\) TO \('([^']+)'\)")


def _parse_bound(text: str) -> datetime.datetime | None:
    try:
        value = datetime.datetime.fromisoformat(text)
    except ValueError:
        return None
    return value if value.tzinfo else value.replace(tzinfo=datetime.UTC)


def partitions_of(spec: PartitionedTable) -> list[Partition] | None:
    """The partitions attached to spec.table, or None when it is not a partitioned table."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT c.relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = %s AND c.relname = %s",
            [spec.schema, spec.table],
        )
        row = cursor.fetchone()
        if row is None or row[0] != "p":
            return None
        cursor.execute(
            "SELECT c.relname, obj_description(c.oid, 'pg_class'), "
            "pg_get_expr(c.relpartbound, c.oid) "
            "FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "JOIN pg_class p ON p.oid = i.inhparent JOIN pg_namespace n ON n.oid = p.relnamespace "
            "WHERE n.nspname = %s AND p.relname = %s ORDER BY c.relname",
            [spec.schema, spec.table],
        )
        rows = cursor.fetchall()
    partitions = []
    for name, comment, bound in rows:
        partition = Partition(name=name, comment=comment, is_default=bound == "DEFAULT")
        match = _BOUNDS_RE.match(bound or "")
        if match:
            partition.start = _parse_bound(match.group(1))
            partition.end = _parse_bound(match.group(2))
        partitions.append(partition)
    return partitions


def detached_tables(spec: PartitionedTable) -> list[tuple[str, str]]:
    """(name, comment) of former partitions this project detached and has not dropped."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT c.relname, obj_description(c.oid, 'pg_class') FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = %s AND c.relkind = 'r' AND NOT c.relispartition "
            "AND c.relname ~ %s AND (obj_description(c.oid, 'pg_class') = %s "
            "OR obj_description(c.oid, 'pg_class') LIKE %s) ORDER BY c.relname",
            [
                spec.schema,
                f"^{spec.table}_[0-9]{{4}}_[0-9]{{2}}$",
                MARK_DETACHED,
                MARK_ARCHIVED + " %",
            ],
        )
        return cursor.fetchall()


def table_exists(schema: str, name: str) -> bool:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = %s AND c.relname = %s",
            [schema, name],
        )
        return cursor.fetchone() is not None


def default_rows_by_month(spec: PartitionedTable) -> dict[datetime.date, int]:
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT date_trunc('month', {_q(spec.column)} AT TIME ZONE 'UTC')::date, count(*) "
            f"FROM {_q(spec.schema)}.{_q(spec.default_name)} GROUP BY 1 ORDER BY 1"
        )
        return dict(cursor.fetchall())


def _q(name: str) -> str:
    return connection.ops.quote_name(name)


def partition_plan(
    *,
    today: datetime.date | None = None,
    premake: int,
    retention_months: int,
    archive: bool,
    drop: bool,
    tables: tuple[PartitionedTable, ...] = PARTITIONED_TABLES,
) -> PartitionPlan:
    """What maintenance would do now, in the order it must be done.

    Per table: create a missing default partition; give every month that has rows in the
    default partition its own partition (moving the rows); premake the current and the
    next `premake` months; then for months that ended `retention_months` or more months
    before the current one (retention 0 = keep forever): detach, archive (if `archive`),
    drop (if `drop`; never before a successful archive when `archive` is on). Only
    partitions marked with a freeagentics:partition comment are ever detached or dropped.
    """
    today = today or timezone.now().date()
    plan = PartitionPlan(today=today, premake=premake, retention_months=retention_months)
    current = month_start(today)
    cutoff = month_start(today, -retention_months) if retention_months > 0 else None
    for spec in tables:
        partitions = partitions_of(spec)
        if partitions is None:
            plan.actions.append(
                PartitionAction("skip", spec.table, spec.table, note="not a partitioned table")
            )
            continue
        default = next((p for p in partitions if p.is_default), None)
        if default is None:
            plan.actions.append(PartitionAction("create_default", spec.table, spec.default_name))
        by_month = {p.month: p for p in partitions if p.month is not None}
        odd_ranges = [p for p in partitions if not p.is_default and p.month is None]

        wanted: dict[datetime.date, int] = {}
        if default is not None:
            wanted.update(default_rows_by_month(spec))
        for ahead in range(premake + 1):
            wanted.setdefault(month_start(current, ahead), 0)
        created = []
        for month, rows in sorted(wanted.items()):
            if month in by_month:
                continue
            name = spec.month_name(month)
            start, end = _utc_midnight(month), _utc_midnight(month_start(month, 1))
            overlap = next(
                (
                    p
                    for p in odd_ranges
                    if p.start is None or p.end is None or (p.start < end and start < p.end)
                ),
                None,
            )
            if overlap is not None:
                plan.actions.append(
                    PartitionAction(
                        "skip",
                        spec.table,
                        name,
                        month,
                        rows,
                        f"{overlap.name} overlaps {month:%Y-%m}",
                    )
                )
            elif table_exists(spec.schema, name):
                plan.actions.append(
                    PartitionAction(
                        "skip",
                        spec.table,
                        name,
                        month,
                        rows,
                        "a table of that name exists and is not a partition",
                    )
                )
            else:
                plan.actions.append(PartitionAction("create", spec.table, name, month, rows))
                created.append(month)

        if cutoff is None:
            continue
        expiring = sorted(
            [(m, p.name, p.comment) for m, p in by_month.items()]
            + [(m, spec.month_name(m), MARK_MONTHLY) for m in created],
        )
        for month, name, comment in expiring:
            if month_start(month, 1) > cutoff:
                continue
            if comment != MARK_MONTHLY:
                restored = (comment or "").startswith(MARK_RESTORED)
                note = (
                    "past retention, but restored from an archive: retire it by hand"
                    if restored
                    else "past retention, but not created by freeagentics (no marker comment)"
                )
                plan.actions.append(PartitionAction("skip", spec.table, name, month, note=note))
                continue
            plan.actions.append(PartitionAction("detach", spec.table, name, month))
            if archive:
                plan.actions.append(PartitionAction("archive", spec.table, name, month))
            if drop:
                plan.actions.append(PartitionAction("drop", spec.table, name, month))
        for name, comment in detached_tables(spec):
            month = datetime.date(int(name[-7:-3]), int(name[-2:]), 1)
            # A detached table is one whose archive (or drop) failed or was switched off.
            if comment == MARK_DETACHED and archive:
                plan.actions.append(PartitionAction("archive", spec.table, name, month))
            if drop:
                plan.actions.append(PartitionAction("drop", spec.table, name, month))
    return plan
