"""`/metrics` for Prometheus, `/healthz` for "is the process alive", `/readyz` for "can it
serve": thin views over monitoring.access and monitoring.readiness."""

from django.http import HttpResponse, HttpResponseForbidden, JsonResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from freeagentics.telemetry import ENABLED
from monitoring.access import metrics_allowed
from monitoring.readiness import readiness

METRICS_DISABLED = "Prometheus metrics are off (PROMETHEUS_METRICS_ENABLED=false).\n"
METRICS_REFUSED = (
    "Forbidden: /metrics answers PROMETHEUS_METRICS_ALLOWED_NETWORKS or a request with "
    "'Authorization: Bearer <PROMETHEUS_METRICS_TOKEN>'.\n"
)


@never_cache
@require_GET
def metrics(request):
    if not metrics_allowed(request):
        return HttpResponseForbidden(METRICS_REFUSED, content_type="text/plain")
    if not ENABLED:
        return HttpResponse(METRICS_DISABLED, status=404, content_type="text/plain")
    return HttpResponse(generate_latest(REGISTRY), content_type=CONTENT_TYPE_LATEST)


@never_cache
def healthz(request):
    # Touches nothing: a process that can run a view is alive.
    return JsonResponse({"status": "ok"})


@never_cache
def readyz(request):
    report = readiness()
    return JsonResponse(report.as_json(), status=200 if report.ready else 503)
