import datetime
import random
import threading
import uuid

import pytest
from django import db
from django.core.exceptions import ValidationError
from django.db import connection

from backups import partitions, pgtools
from backups.exceptions import PARTITION_TABLE_BUSY
from backups.partition_selectors import MARK_MONTHLY
from backups.partitions import partitions_maintain
from tests.backups.test_partitions import at, drop_leftovers, layout, name

pytestmark = pytest.mark.django_db(transaction=True)

RUNS = 5
MONTHS_PER_RUN = 8
WRITERS = 3


@pytest.fixture
def no_leftovers(django_db_blocker):
    """Drops archived or restored tables and empties the quarantine after the test."""
    yield
    with django_db_blocker.unblock():
        drop_leftovers()


class Writers:
    """Threads inserting into agent_history through the parent, each on its own connection,
    in single-row autocommits and in three-row transactions, until stopped. Rows go to the
    months maintenance is splitting out of the default partition right now (`target`),
    the current month, and months not partitioned yet."""

    def __init__(self, count: int):
        self.target: list[int] = []
        self.stop = threading.Event()
        self.inserted = 0
        self.errors: list[str] = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.write, args=(i,)) for i in range(count)]

    def months(self, rng: random.Random) -> list[datetime.datetime]:
        choices = []
        for _ in range(rng.choice((1, 3))):
            pick = rng.random()
            if pick < 0.7 and self.target:
                k = rng.choice(self.target)
            elif pick < 0.85:
                k = 0
            else:
                k = -rng.randint(1, RUNS * MONTHS_PER_RUN)
            choices.append(at(k, rng.randint(1, 28)))
        return choices

    def write(self, seed: int) -> None:
        rng = random.Random(seed)
        with pgtools.connect("default") as conn:
            while not self.stop.is_set():
                rows = self.months(rng)
                try:
                    with conn.transaction():
                        for recorded_at in rows:
                            conn.execute(
                                "INSERT INTO agent_history (agent_id, recorded_at, energy_level) "
                                "VALUES (%s, %s, %s)",
                                [uuid.uuid4(), recorded_at, seed],
                            )
                except Exception as e:  # every failure counts, whatever its kind
                    with self.lock:
                        self.errors.append(f"{type(e).__name__}: {e}")
                else:
                    with self.lock:
                        self.inserted += len(rows)

    def __enter__(self):
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for thread in self.threads:
            thread.join(60)


def count(table: str = "agent_history") -> int:
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT count(*) FROM {table}")
        return cursor.fetchone()[0]


def seed(months: list[int]) -> None:
    with connection.cursor() as cursor:
        for k in months:
            cursor.execute(
                "INSERT INTO agent_history (agent_id, recorded_at) VALUES (%s, %s)",
                [uuid.uuid4(), at(k)],
            )


@pytest.mark.reliability("maintenance under load")
def test_inserts_never_fail_while_maintenance_moves_rows_out_of_default(
    history_layout, backup_dir, no_leftovers
):
    seeded = 0
    with Writers(WRITERS) as writers:
        for r in range(RUNS):
            # Each run splits fresh months out of the default partition while the writers
            # keep adding rows to exactly those months.
            months = [-(1 + r * MONTHS_PER_RUN + i) for i in range(MONTHS_PER_RUN)]
            seed(months)
            seeded += len(months)
            writers.target = months
            partitions_maintain(retention_months=0, archive=False, drop=False)
            tables = layout()
            assert all(tables[name(k)][0] for k in months)  # attached (by this run or one before)
    assert writers.errors == []
    assert writers.inserted > 0
    # No row lost: what was seeded and inserted is there, and the default partition holds
    # only rows that arrived after the last run planned (for months no run had seen).
    assert count() == seeded + writers.inserted
    partitions_maintain(retention_months=0, archive=False, drop=False)
    assert count() == seeded + writers.inserted
    assert layout()["agent_history_default"][2] == 0


@pytest.mark.reliability("maintenance under load")
def test_a_long_transaction_makes_maintenance_give_up_not_block_writers(
    history_layout, backup_dir, no_leftovers, monkeypatch
):
    monkeypatch.setattr(partitions, "LOCK_TIMEOUT_MS", 300)
    monkeypatch.setattr(partitions, "LOCK_TRIES", 2)
    seed([-2])
    outcome = {}

    def maintain():
        try:
            partitions_maintain(retention_months=0, archive=False, drop=False)
        except ValidationError as e:
            outcome["error"] = e.messages[0]
        finally:
            db.connections.close_all()

    with pgtools.connect("default") as long_txn, pgtools.connect("default") as writer:
        writer.execute("SET statement_timeout = '60s'")  # a hang fails the test instead
        long_txn.execute("BEGIN")
        long_txn.execute(
            "INSERT INTO agent_history (agent_id, recorded_at) VALUES (%s, %s)",
            [uuid.uuid4(), at(0)],
        )
        thread = threading.Thread(target=maintain)
        thread.start()
        with pgtools.connect("default") as probe:
            pids = []
            while thread.is_alive() and not pids:
                pids = [
                    row[0]
                    for row in probe.execute(
                        "SELECT pid FROM pg_locks WHERE relation = 'agent_history'::regclass "
                        "AND mode = 'ShareRowExclusiveLock' AND NOT granted"
                    ).fetchall()
                ]
        assert pids, "maintenance never waited for the parent's lock"
        # Queued behind maintenance's lock request, this insert waits out at most its lock
        # timeouts, not the long transaction, which is still open.
        writer.execute(
            "INSERT INTO agent_history (agent_id, recorded_at) VALUES (%s, %s)",
            [uuid.uuid4(), at(-2)],
        )
        thread.join(60)
        assert long_txn.info.transaction_status.name == "INTRANS"
        long_txn.execute("COMMIT")

    assert outcome["error"] == PARTITION_TABLE_BUSY.format(table="agent_history", tries=2)
    assert name(-2) not in layout()
    partitions_maintain(retention_months=0, archive=False, drop=False)
    assert layout()[name(-2)] == (True, MARK_MONTHLY, 2)
    assert count() == 3


@pytest.mark.reliability("maintenance under load")
def test_a_transaction_that_reads_then_writes_is_not_deadlocked_by_maintenance(
    history_layout, backup_dir, no_leftovers
):
    seed([-2])
    outcome = {}

    def maintain():
        try:
            outcome["report"] = partitions_maintain(retention_months=0, archive=False, drop=False)
        except Exception as e:
            outcome["error"] = e
        finally:
            db.connections.close_all()

    with pgtools.connect("default") as app:
        app.execute("SET statement_timeout = '60s'")
        app.execute("BEGIN")
        # Reading the whole table locks every partition, the default one included.
        assert app.execute("SELECT count(*) FROM agent_history").fetchone()[0] == 1
        thread = threading.Thread(target=maintain)
        thread.start()
        with pgtools.connect("default") as probe:
            waiting = False
            while thread.is_alive() and not waiting:
                waiting = probe.execute(
                    "SELECT count(*) FROM pg_locks WHERE NOT granted "
                    "AND relation = 'agent_history_default'::regclass"
                ).fetchone()[0]
        # Maintenance holds the parent and waits for the default partition; this insert
        # waits for the parent. Maintenance gives way (lock timeout), the insert goes on.
        app.execute(
            "INSERT INTO agent_history (agent_id, recorded_at) VALUES (%s, %s)",
            [uuid.uuid4(), at(-2)],
        )
        app.execute("COMMIT")
        thread.join(120)

    assert "error" not in outcome, outcome.get("error")
    assert layout()[name(-2)] == (True, MARK_MONTHLY, 2)
    assert count() == 2
