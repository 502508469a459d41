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


class DroppedPoints(models.Model):
    """Points refused because the outbox was full: one row per refused batch."""

    dropped_at = models.DateTimeField(db_default=Now(), editable=False)
    points = models.IntegerField()

    class Meta:
        db_table = "metrics_outbox_dropped"
        ordering = ["-dropped_at"]
        verbose_name_plural = "dropped points"

    def __str__(self):
        return f"{self.points} point(s) at {self.dropped_at:%Y-%m-%d %H:%M:%S}"


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
