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

# The months a partition may hold: 1900-01 to 9999-11. Partition names carry a 4-digit
# year and a month's upper bound must be a Python date (which ends in 9999); before 1900
# no agent recorded anything, while year 1 is the zero time of Go and .NET, what a broken
# client sends. Rows outside go to the quarantine table instead.
EARLIEST_BOUND = "1900-01-01 00:00:00+00"
LATEST_BOUND = "9999-12-01 00:00:00+00"  # exclusive
REASON_NOT_FINITE = "not a finite time"
REASON_TOO_EARLY = "before 1900"
REASON_TOO_LATE = "after November 9999"

# Maintenance renames a table before archiving it (see partitions._archive_partition), so
# a month archived twice restores as two tables: <table>_YYYY_MM, then any suffix.
PG_NAME_MAX = 63


@dataclass(frozen=True)
class PartitionedTable:
    """A table partitioned by month of `column`, whose partitions are named <table>_YYYY_MM."""

    table: str
    column: str
    schema: str = "public"

    @property
    def default_name(self) -> str:
        return f"{self.table}_default"

    @property
    def quarantine_name(self) -> str:
        return f"{self.table}_quarantine"

    def month_name(self, month: datetime.date) -> str:
        return f"{self.table}_{month.year:04d}_{month.month:02d}"

    def month_of_name(self, name: str) -> datetime.date | None:
        """The month of a table named <table>_YYYY_MM or <table>_YYYY_MM_<suffix>."""
        match = re.fullmatch(
            re.escape(self.table) + r"_([0-9]{4})_([0-9]{2})(?:_[a-z0-9_]+)?", name
        )
        if match is None or not 1 <= int(match.group(2)) <= 12:
            return None
        return datetime.date(int(match.group(1)), int(match.group(2)), 1)


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
    kind: str  # create_default | quarantine | create | detach | archive | drop | skip
    parent: str
    table: str
    month: datetime.date | None = None
    rows: int | None = None
    note: str = ""

    def describe(self) -> str:
        text = {
            "create_default": f"create default partition {self.table}",
            "quarantine": f"quarantine {self.rows} rows of the default partition into {self.table}",
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


def month_bounds(month: datetime.date) -> tuple[datetime.datetime, datetime.datetime]:
    return _utc_midnight(month), _utc_midnight(month_start(month, 1))


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
            "AND (obj_description(c.oid, 'pg_class') = %s "
            "OR obj_description(c.oid, 'pg_class') LIKE %s) ORDER BY c.relname",
            [spec.schema, MARK_DETACHED, MARK_ARCHIVED + " %"],
        )
        return [(n, c) for n, c in cursor.fetchall() if spec.month_of_name(n) is not None]


def table_exists(schema: str, name: str) -> bool:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = %s AND c.relname = %s",
            [schema, name],
        )
        return cursor.fetchone() is not None


def holdable_sql(spec: PartitionedTable) -> str:
    """A condition true for the rows some month partition can hold."""
    column = _q(spec.column)
    return f"({column} >= '{EARLIEST_BOUND}' AND {column} < '{LATEST_BOUND}')"


def unholdable_reason_sql(spec: PartitionedTable) -> str:
    """Why a row fails holdable_sql(), as text."""
    column = _q(spec.column)
    return (
        f"CASE WHEN NOT isfinite({column}) THEN '{REASON_NOT_FINITE}' "
        f"WHEN {column} < '{EARLIEST_BOUND}' THEN '{REASON_TOO_EARLY}' "
        f"ELSE '{REASON_TOO_LATE}' END"
    )


def _count_default_rows(spec: PartitionedTable, group: str, where: str) -> dict:
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT {group}, count(*) FROM {_q(spec.schema)}.{_q(spec.default_name)} "
            f"WHERE {where} GROUP BY 1 ORDER BY 1"
        )
        return dict(cursor.fetchall())


def default_rows_by_month(spec: PartitionedTable) -> dict[datetime.date, int]:
    """Rows of the default partition per month, for the months a partition can hold."""
    # The filter comes first: 'infinity' or year 12000 would not even convert to a date.
    month = f"date_trunc('month', {_q(spec.column)} AT TIME ZONE 'UTC')::date"
    return _count_default_rows(spec, month, holdable_sql(spec))


def default_rows_unholdable(spec: PartitionedTable) -> dict[str, int]:
    """Rows of the default partition no month partition can hold: {reason: count}."""
    return _count_default_rows(spec, unholdable_reason_sql(spec), f"NOT {holdable_sql(spec)}")


def index_names(schema: str, table: str) -> list[str]:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT i.relname FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid "
            "JOIN pg_class t ON t.oid = x.indrelid JOIN pg_namespace n ON n.oid = t.relnamespace "
            "WHERE n.nspname = %s AND t.relname = %s ORDER BY i.relname",
            [schema, table],
        )
        return [row[0] for row in cursor.fetchall()]


def rename_statements(spec: PartitionedTable, table: str, new: str) -> list[str]:
    """SQL that renames table and its indexes after new, so that an archive of the old name
    restores beside it (index names, the primary key's included, are unique per schema)."""
    schema = _q(spec.schema)
    statements = [f"ALTER TABLE {schema}.{_q(table)} RENAME TO {_q(new)};"]
    taken = set()
    for index in index_names(spec.schema, table):
        rest = index[len(table) :] if index.startswith(table) else "_" + index
        renamed = (new + rest)[:PG_NAME_MAX]
        n = 1
        while renamed in taken:
            tail = f"_{n}"
            renamed = (new + rest)[: PG_NAME_MAX - len(tail)] + tail
            n += 1
        taken.add(renamed)
        statements.append(f"ALTER INDEX {schema}.{_q(index)} RENAME TO {_q(renamed)};")
    return statements


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
        else:
            # Rows no month can hold would make every run fail: set them aside, report them.
            unholdable = default_rows_unholdable(spec)
            if unholdable:
                rows = sum(unholdable.values())
                why = ", ".join(f"{n} {reason}" for reason, n in unholdable.items())
                if table_exists(spec.schema, spec.quarantine_name):
                    action = PartitionAction(
                        "quarantine", spec.table, spec.quarantine_name, rows=rows, note=why
                    )
                else:
                    action = PartitionAction(
                        "skip",
                        spec.table,
                        spec.default_name,
                        rows=rows,
                        note=f"{rows} rows no partition can hold ({why}); "
                        f"{spec.quarantine_name} is missing: run manage.py migrate",
                    )
                plan.actions.append(action)
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
                why_not = f"{overlap.name} overlaps {month:%Y-%m}"
            elif table_exists(spec.schema, name):
                why_not = "a table of that name exists and is not a partition"
            else:
                plan.actions.append(PartitionAction("create", spec.table, name, month, rows))
                created.append(month)
                continue
            plan.actions.append(PartitionAction("skip", spec.table, name, month, rows, why_not))

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
            month = spec.month_of_name(name)
            # A detached table is one whose archive (or drop) failed or was switched off.
            if comment == MARK_DETACHED and archive:
                plan.actions.append(PartitionAction("archive", spec.table, name, month))
            if drop:
                plan.actions.append(PartitionAction("drop", spec.table, name, month))
    return plan
