from asgiref.sync import sync_to_async
from django.conf import settings
from django.conf.urls.static import static
from django.contrib import admin
from django.contrib.staticfiles.views import serve
from django.core.handlers.asgi import ASGIRequest
from django.urls import include, path
from django.views.generic import RedirectView


async def _read_async(chunks):
    """A file response's blocks as an async iterator, each read off the event loop."""
    chunks = iter(chunks)
    while chunk := await sync_to_async(next, thread_sensitive=False)(chunks, b""):
        yield chunk


def serve_static(request, path, **kwargs):
    """staticfiles' development view, fit for ASGI. It answers with a FileResponse, whose
    synchronous iterator Django's ASGI handler reads whole into memory with the warning
    "StreamingHttpResponse must consume synchronous iterators" (uvicorn under
    scripts/run.sh serves every page's CSS this way). Under ASGI the same blocks go out
    through an async iterator; the file is still closed by the response."""
    response = serve(request, path, **kwargs)
    if isinstance(request, ASGIRequest) and response.streaming and not response.is_async:
        response.streaming_content = _read_async(response.streaming_content)
    return response


urlpatterns = [
    path("", include("monitoring.urls")),
    path("", RedirectView.as_view(url="/admin/", permanent=False)),
    path("admin/", admin.site.urls),
]

# Serves the admin's CSS/JS under DEBUG only (an empty list otherwise); production runs
# collectstatic behind a static file server.
urlpatterns += static(settings.STATIC_URL, view=serve_static)
