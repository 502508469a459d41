import time

from freeagentics.telemetry import HTTP_REQUEST_SECONDS, NOOP
from monitoring import views

# Answered before Django's host validation and HTTPS redirect: load balancers and
# Prometheus call them by address over plain HTTP (Host: 10.0.0.5:8000), and these
# views build no URL from the Host header. /metrics has its own access check.
PROBES = {"/healthz": views.healthz, "/readyz": views.readyz, "/metrics": views.metrics}


class RequestTimingMiddleware:
    """Times each request by view: the URL pattern's name, never the raw path, so label
    values stay bounded whatever URLs clients make up. First in MIDDLEWARE, so the
    time includes every other middleware."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        if HTTP_REQUEST_SECONDS is NOOP:
            return self.get_response(request)
        start = time.perf_counter()
        response = self.get_response(request)
        HTTP_REQUEST_SECONDS.labels(_view_name(request), request.method).observe(
            time.perf_counter() - start
        )
        return response


def _view_name(request) -> str:
    probe = getattr(request, "monitoring_probe", None)
    if probe is not None:
        return probe
    match = request.resolver_match
    return (match.view_name or match._func_path) if match else "unresolved"


class ProbeMiddleware:
    """Serves /healthz, /readyz and /metrics ahead of the rest of the stack (PROBES)."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        view = PROBES.get(request.path_info)
        if view is None:
            return self.get_response(request)
        request.monitoring_probe = request.path_info.lstrip("/")
        return view(request)
