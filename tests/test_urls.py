import warnings
from pathlib import Path

import django
from asgiref.sync import async_to_sync
from django.test import AsyncRequestFactory, RequestFactory

from freeagentics.urls import serve_static


def test_static_files_served_over_asgi_stream_an_async_iterator(settings):
    """The dev stack (uvicorn, DEBUG) serves the admin's CSS through Django: each page
    load used to send a FileResponse's synchronous iterator through the ASGI handler."""
    settings.DEBUG = True  # staticfiles' view refuses to serve otherwise
    request = AsyncRequestFactory().get("/static/admin/css/base.css")

    async def body(response):
        return b"".join([part async for part in response])

    response = serve_static(request, "admin/css/base.css")
    assert response.status_code == 200 and response.is_async
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        served = async_to_sync(body)(response)
    response.close()
    expected = (
        Path(django.__file__).parent / "contrib/admin/static/admin/css/base.css"
    ).read_bytes()
    assert served == expected

    # A WSGI request keeps the plain FileResponse.
    wsgi = serve_static(RequestFactory().get("/static/admin/css/base.css"), "admin/css/base.css")
    assert not wsgi.is_async
    assert b"".join(wsgi.streaming_content) == expected
    wsgi.close()
