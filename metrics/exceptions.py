"""Errors of the metrics app. Bad settings, and credentials or targets InfluxDB refuses,
raise django's ImproperlyConfigured instead, naming the variable to fix."""


class MetricsError(Exception):
    """Base class of the errors below."""


class InfluxDBUnavailable(MetricsError):
    """InfluxDB could not be reached or failed transiently (timeout, 5xx, 429): retry."""


class InfluxDBRejected(MetricsError):
    """InfluxDB refused the points themselves (HTTP 400, 413 or 422): retrying the same
    body cannot succeed. `refused`: how many of the request's points InfluxDB says it did
    not store (a partial write stores the others), None when it does not say."""

    def __init__(self, message: str, *, status: int, refused: int | None = None):
        super().__init__(message)
        self.status = status
        self.refused = refused


class InfluxDBQueryError(MetricsError):
    """InfluxDB answered a query with an error."""
