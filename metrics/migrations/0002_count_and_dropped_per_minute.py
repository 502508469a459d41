"""The outbox's cap counts rows; dropped points are counted per minute and reason.

metrics_outbox_count: one row per INSERT or DELETE statement on metrics_outbox (+n or
-n), written by statement-level triggers in the same transaction, so the sum is the
number of rows a snapshot sees, rolled-back inserts included as nothing. Writers only
insert here (no counter row to wait for); every 32nd row the trigger merges the rows no
transaction in progress holds into one (SKIP LOCKED: it never waits either), which keeps
the table at a few dozen rows. TRUNCATE of the outbox empties it.

metrics_outbox_dropped: one row per refused batch became one row per minute and reason,
with an acknowledged_at an operator sets from the admin. Existing rows are merged.
"""

from django.db import migrations, models

# Every this many count rows (by id) a merge runs; the sum reads them all. A merge in a
# transaction that rolls back is undone, and the next one comes 32 rows later.
MERGE_EVERY = 32

COUNT_FUNCTIONS = f"""
CREATE FUNCTION metrics_outbox_count_merge() RETURNS void LANGUAGE sql AS $$
    WITH merged AS (
        DELETE FROM metrics_outbox_count
        WHERE id IN (SELECT id FROM metrics_outbox_count FOR UPDATE SKIP LOCKED)
        RETURNING points
    )
    INSERT INTO metrics_outbox_count (points)
    SELECT sum(points) FROM merged HAVING sum(points) <> 0
$$;

CREATE FUNCTION metrics_outbox_counted() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    delta bigint;
    row_id bigint;
BEGIN
    IF TG_OP = 'INSERT' THEN
        SELECT count(*) INTO delta FROM added_rows;
    ELSIF TG_OP = 'DELETE' THEN
        SELECT -count(*) INTO delta FROM removed_rows;
    ELSE
        -- TRUNCATE: nothing is left to count.
        DELETE FROM metrics_outbox_count;
        RETURN NULL;
    END IF;
    IF delta = 0 THEN
        RETURN NULL;
    END IF;
    INSERT INTO metrics_outbox_count (points) VALUES (delta) RETURNING id INTO row_id;
    IF row_id % {MERGE_EVERY} = 0 THEN
        PERFORM metrics_outbox_count_merge();
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER metrics_outbox_count_insert AFTER INSERT ON metrics_outbox
    REFERENCING NEW TABLE AS added_rows
    FOR EACH STATEMENT EXECUTE FUNCTION metrics_outbox_counted();
CREATE TRIGGER metrics_outbox_count_delete AFTER DELETE ON metrics_outbox
    REFERENCING OLD TABLE AS removed_rows
    FOR EACH STATEMENT EXECUTE FUNCTION metrics_outbox_counted();
CREATE TRIGGER metrics_outbox_count_truncate AFTER TRUNCATE ON metrics_outbox
    FOR EACH STATEMENT EXECUTE FUNCTION metrics_outbox_counted();

-- Rows already waiting. CREATE TRIGGER locked the outbox against writers until this
-- migration commits, so none is missed or counted twice; with a large backlog, agent
-- writes wait for this count(*) (run the migration with the outbox drained).
INSERT INTO metrics_outbox_count (points)
SELECT count(*) FROM metrics_outbox HAVING count(*) > 0;

-- Deleted rows pile up at the rate of outbox statements; vacuum them by count.
ALTER TABLE metrics_outbox_count SET
    (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 1000);
"""

COUNT_FUNCTIONS_DROP = """
DROP TRIGGER metrics_outbox_count_truncate ON metrics_outbox;
DROP TRIGGER metrics_outbox_count_delete ON metrics_outbox;
DROP TRIGGER metrics_outbox_count_insert ON metrics_outbox;
DROP FUNCTION metrics_outbox_counted();
DROP FUNCTION metrics_outbox_count_merge();
"""

# One row per minute and reason out of the rows of refused batches.
MERGE_DROPPED = """
UPDATE metrics_outbox_dropped SET minute = date_trunc('minute', last_dropped_at);
WITH old AS (
    DELETE FROM metrics_outbox_dropped RETURNING minute, reason, points, last_dropped_at
)
INSERT INTO metrics_outbox_dropped (minute, reason, points, last_dropped_at)
SELECT minute, reason, sum(points), max(last_dropped_at) FROM old GROUP BY minute, reason;
"""


class Migration(migrations.Migration):
    dependencies = [("metrics", "0001_outbox")]

    operations = [
        migrations.CreateModel(
            name="OutboxCount",
            fields=[
                ("id", models.BigAutoField(primary_key=True, serialize=False)),
                ("points", models.BigIntegerField()),
            ],
            options={"db_table": "metrics_outbox_count"},
        ),
        migrations.RunSQL(COUNT_FUNCTIONS, COUNT_FUNCTIONS_DROP),
        migrations.RenameField(
            model_name="droppedpoints", old_name="dropped_at", new_name="last_dropped_at"
        ),
        migrations.AddField(
            model_name="droppedpoints",
            name="minute",
            field=models.DateTimeField(
                null=True, help_text="Start of the minute (UTC) of these drops."
            ),
        ),
        migrations.AddField(
            model_name="droppedpoints",
            name="reason",
            field=models.CharField(db_default="outbox full", max_length=64),
        ),
        migrations.AddField(
            model_name="droppedpoints",
            name="acknowledged_at",
            field=models.DateTimeField(blank=True, editable=False, null=True),
        ),
        migrations.AlterField(
            model_name="droppedpoints", name="points", field=models.BigIntegerField()
        ),
        migrations.RunSQL(MERGE_DROPPED, migrations.RunSQL.noop),
        migrations.AlterField(
            model_name="droppedpoints",
            name="minute",
            field=models.DateTimeField(help_text="Start of the minute (UTC) of these drops."),
        ),
        migrations.AlterModelOptions(
            name="droppedpoints",
            options={"ordering": ["-minute", "-id"], "verbose_name_plural": "dropped points"},
        ),
        migrations.AddIndex(
            model_name="droppedpoints",
            index=models.Index(fields=["minute", "reason"], name="metrics_dropped_minute"),
        ),
    ]
