from django.contrib.postgres.operations import AddIndexConcurrently
from django.db import migrations, models


class Migration(migrations.Migration):
    # CREATE INDEX CONCURRENTLY cannot run inside a transaction.
    atomic = False

    dependencies = [("agents", "0002_updated_at_trigger_and_history")]

    operations = [
        AddIndexConcurrently(
            model_name="agent",
            index=models.Index(
                condition=models.Q(("status", "active")),
                fields=["tenant", "status", "last_active_at"],
                name="idx_agents_composite",
            ),
        ),
    ]
