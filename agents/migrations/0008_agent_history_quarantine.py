"""agent_history_quarantine: where partition maintenance puts rows of the default partition
that no monthly partition can hold (recorded_at 'infinity', year 12000, year 1...), so
they stop blocking maintenance and an operator can look at them."""

from django.db import migrations

# Same columns as agent_history (belief_state stays the encrypted bytes), plus when and why.
# Not partitioned, and no unique key on id: a row may be quarantined, put back, and
# quarantined again.
QUARANTINE_TABLE = """
CREATE TABLE agent_history_quarantine (
    id UUID NOT NULL,
    agent_id UUID NOT NULL,
    recorded_at TIMESTAMP WITH TIME ZONE NOT NULL,
    belief_state BYTEA,
    energy_level INTEGER,
    quarantined_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT NOW(),
    reason TEXT NOT NULL
);
CREATE INDEX agent_history_quarantine_quarantined_at ON agent_history_quarantine (quarantined_at);
COMMENT ON TABLE agent_history_quarantine IS 'freeagentics:quarantine';
"""


class Migration(migrations.Migration):
    dependencies = [("agents", "0007_editors_change_members")]

    operations = [
        migrations.RunSQL(QUARANTINE_TABLE, "DROP TABLE IF EXISTS agent_history_quarantine;"),
    ]
