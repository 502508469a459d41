from django.contrib.postgres.operations import AddIndexConcurrently
from django.db import migrations, models


class Migration(migrations.Migration):
    # CREATE INDEX CONCURRENTLY cannot run inside a transaction.
    atomic = False

    dependencies = [("coalitions", "0002_cascade_and_updated_at")]

    operations = [
        AddIndexConcurrently(
            model_name="coalitionmember",
            index=models.Index(
                models.F("coalition"),
                models.OrderBy(models.F("contribution_score"), descending=True),
                name="idx_coalition_members_performance",
            ),
        ),
    ]
