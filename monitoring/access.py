"""Who may read /metrics: the figures name views, tenants' traffic and backlogs, so they
are not public. A loopback scraper needs nothing; any other needs the bearer token."""

import functools
import hmac
import ipaddress

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured


@functools.cache
def _networks(spec: tuple[str, ...]) -> tuple:
    try:
        return tuple(ipaddress.ip_network(item, strict=False) for item in spec)
    except ValueError as e:
        raise ImproperlyConfigured(
            f"PROMETHEUS_METRICS_ALLOWED_NETWORKS: {e} (expected addresses or CIDR "
            "networks separated by commas)"
        ) from e


def _bearer(request) -> str | None:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


def metrics_allowed(request) -> bool:
    expected = settings.PROMETHEUS_METRICS_TOKEN
    given = _bearer(request)
    if expected and given is not None:
        return hmac.compare_digest(given.encode(), expected.encode())
    try:
        address = ipaddress.ip_address(request.META.get("REMOTE_ADDR", ""))
    except ValueError:
        return False
    return any(
        address in network
        for network in _networks(tuple(settings.PROMETHEUS_METRICS_ALLOWED_NETWORKS))
    )
