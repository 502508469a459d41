"""Reads: agent_history's monthly partitions and the maintenance plan. No side effects."""

import datetime
import re
from dataclasses import dataclass, field

from django.db import connection
from django.utils import timezone

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
