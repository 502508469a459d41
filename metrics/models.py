from django.db import models

from agents.fields import DatabaseNow as Now


class OutboxPoint(models.Model):
    """One InfluxDB point waiting to be shipped, stored as ready line protocol.

    Rows are inserted in the same transaction as the state change they describe and
    deleted by the flusher only after InfluxDB acknowledged them. The line carries its
    own nanosecond timestamp, so a re-sent point overwrites itself in InfluxDB.
    """

    id = models.BigAutoField(primary_key=True)
    line = models.TextField()
    created_at = models.DateTimeField(db_default=Now(), editable=False)

    class Meta:
        db_table = "metrics_outbox"
        ordering = ["id"]
        verbose_name = "metrics outbox point"

    def __str__(self):
        return self.line[:80]

    @property
    def measurement(self) -> str:
        return self.line.split(",", 1)[0].split(" ", 1)[0]


class OutboxCount(models.Model):
    """A change in the number of rows of metrics_outbox; their sum is the backlog.

    Triggers on metrics_outbox insert one row per INSERT or DELETE statement (+n or -n),
    in that statement's transaction, so a rolled-back insert rolls back its count, and
    merge older rows into one now and then (migration 0002). Writers only ever insert
    here, so no agent write waits for another on a counter row.
    """

    id = models.BigAutoField(primary_key=True)
    points = models.BigIntegerField()

    class Meta:
        db_table = "metrics_outbox_count"

    def __str__(self):
        return f"{self.points:+d} point(s)"


class DroppedPoints(models.Model):
    """Points refused because the outbox was full, counted per minute and reason.

    Writers add to the minute's unacknowledged row, or open another one when that row is
    held by a transaction still in progress (they never wait for it), so the table grows
    with time and concurrency, not with the number of refused writes.
    """

    OUTBOX_FULL = "outbox full"

    minute = models.DateTimeField(help_text="Start of the minute (UTC) of these drops.")
    reason = models.CharField(max_length=64, db_default=OUTBOX_FULL)
    points = models.BigIntegerField()
    last_dropped_at = models.DateTimeField(db_default=Now(), editable=False)
    acknowledged_at = models.DateTimeField(null=True, blank=True, editable=False)

    class Meta:
        db_table = "metrics_outbox_dropped"
        ordering = ["-minute", "-id"]
        verbose_name_plural = "dropped points"
        indexes = [models.Index(fields=["minute", "reason"], name="metrics_dropped_minute")]

    def __str__(self):
        return f"{self.points} point(s) dropped ({self.reason}) at {self.minute:%Y-%m-%d %H:%M}"


class RejectedPoint(models.Model):
    """A point InfluxDB refused as invalid (HTTP 400/413/422), kept for inspection
    instead of blocking the outbox or vanishing."""

    line = models.TextField()
    error = models.TextField()
    rejected_at = models.DateTimeField(db_default=Now(), editable=False)

    class Meta:
        db_table = "metrics_outbox_rejected"
        ordering = ["-rejected_at"]

    def __str__(self):
        return self.line[:80]
