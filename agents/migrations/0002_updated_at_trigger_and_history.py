import datetime

from django.db import migrations

# clock_timestamp(), not now(): now() is fixed for the whole transaction, so two updates
# in one transaction would leave updated_at where the first put it.
TOUCH_FUNCTION = """
CREATE OR REPLACE FUNCTION freeagentics_touch_updated_at() RETURNS trigger AS $$
BEGIN
    NEW.updated_at := clock_timestamp();
    RETURN NEW;
END
$$ LANGUAGE plpgsql;
CREATE TRIGGER agents_touch_updated_at BEFORE UPDATE ON agents
    FOR EACH ROW EXECUTE FUNCTION freeagentics_touch_updated_at();
"""
DROP_TOUCH = """
DROP TRIGGER IF EXISTS agents_touch_updated_at ON agents;
DROP FUNCTION IF EXISTS freeagentics_touch_updated_at() CASCADE;
"""

# PostgreSQL requires the partition key in the primary key. No foreign key to agents:
# history outlives deleted agents, and FKs on partitioned tables slow COPY loads.
HISTORY_TABLE = """
CREATE TABLE agent_history (
    id UUID NOT NULL DEFAULT gen_random_uuid(),
    agent_id UUID NOT NULL,
    recorded_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT NOW(),
    belief_state BYTEA,
    energy_level INTEGER,
    PRIMARY KEY (id, recorded_at)
) PARTITION BY RANGE (recorded_at);
CREATE INDEX idx_agent_history_agent_recorded ON agent_history (agent_id, recorded_at DESC);
CREATE TABLE agent_history_default PARTITION OF agent_history DEFAULT;
COMMENT ON TABLE agent_history_default IS 'freeagentics:partition:default';
"""


def month_start(day: datetime.date, months_ahead: int) -> datetime.date:
    index = day.year * 12 + day.month - 1 + months_ahead
    return datetime.date(index // 12, index % 12 + 1, 1)


def create_month_partitions(apps, schema_editor):
    """The current and next month; manage_partitions keeps the rest ahead."""
    today = datetime.date.today()
    for ahead in (0, 1):
        start, end = month_start(today, ahead), month_start(today, ahead + 1)
        name = f"agent_history_{start:%Y_%m}"
        schema_editor.execute(
            f"CREATE TABLE {name} PARTITION OF agent_history "
            f"FOR VALUES FROM ('{start.isoformat()}') TO ('{end.isoformat()}')"
        )
        schema_editor.execute(f"COMMENT ON TABLE {name} IS 'freeagentics:partition:monthly'")


class Migration(migrations.Migration):
    dependencies = [("agents", "0001_initial")]

    operations = [
        migrations.RunSQL(TOUCH_FUNCTION, DROP_TOUCH),
        migrations.RunSQL(HISTORY_TABLE, "DROP TABLE IF EXISTS agent_history CASCADE;"),
        migrations.RunPython(create_month_partitions, migrations.RunPython.noop),
    ]
