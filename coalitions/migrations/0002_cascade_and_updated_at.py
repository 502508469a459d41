from django.db import migrations

# Django 5.2 emulates on_delete in Python only; ADR-012 wants the database itself to
# cascade, so a raw DELETE FROM coalitions (or agents) removes the memberships too.
CASCADE = """
DO $$
DECLARE r record;
BEGIN
    FOR r IN
        SELECT conname FROM pg_constraint
        WHERE conrelid = 'coalition_members'::regclass AND contype = 'f'
    LOOP
        EXECUTE format('ALTER TABLE coalition_members DROP CONSTRAINT %I', r.conname);
    END LOOP;
END
$$;
ALTER TABLE coalition_members
    ADD CONSTRAINT coalition_members_coalition_id_fkey FOREIGN KEY (coalition_id)
        REFERENCES coalitions (id) ON DELETE CASCADE DEFERRABLE INITIALLY DEFERRED,
    ADD CONSTRAINT coalition_members_agent_id_fkey FOREIGN KEY (agent_id)
        REFERENCES agents (id) ON DELETE CASCADE DEFERRABLE INITIALLY DEFERRED;
"""

TOUCH = """
CREATE TRIGGER coalitions_touch_updated_at BEFORE UPDATE ON coalitions
    FOR EACH ROW EXECUTE FUNCTION freeagentics_touch_updated_at();
"""


class Migration(migrations.Migration):
    dependencies = [
        ("coalitions", "0001_initial"),
        ("agents", "0002_updated_at_trigger_and_history"),
    ]

    operations = [
        migrations.RunSQL(CASCADE, migrations.RunSQL.noop),
        migrations.RunSQL(
            TOUCH, "DROP TRIGGER IF EXISTS coalitions_touch_updated_at ON coalitions;"
        ),
    ]
