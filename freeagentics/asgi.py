"""ASGI entry point: HTTP goes to Django, websockets to the real-time consumers.

Serve it with uvicorn (the measured choice, docs/BENCH-realtime.md):
    uvicorn freeagentics.asgi:application --host 127.0.0.1 --port 8000
"""

import gc
import logging
import os

import psycopg
from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "freeagentics.settings")
# Django must be set up before anything imports models (the websocket routes do).
django_asgi_app = get_asgi_application()

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402

from agents.data_keys import check_master_keys  # noqa: E402
from realtime.auth import (  # noqa: E402
    RealtimeAuthStack,
    RealtimeOriginValidator,
    redact_tokens_in_server_logs,
)
from realtime.routing import websocket_urlpatterns  # noqa: E402

# A wrong master key is a start-up error, not a failure on the first page that reads a
# belief. (Raises ImproperlyConfigured; a database that is not up yet is not checked.)
try:
    check_master_keys()
except psycopg.OperationalError as e:
    logging.getLogger(__name__).warning("Master keys not checked, database unreachable: %s", e)

# After django.setup() configured logging: uvicorn logs each handshake's query string,
# where a client may have put its token (?token=).
redact_tokens_in_server_logs()

# Everything imported so far lives as long as the process: keep it out of the cyclic
# garbage collector's full passes, which otherwise stall every websocket of the process
# (~100 ms per 100,000 tracked objects; docs/BENCH-realtime.md).
gc.freeze()

application = ProtocolTypeRouter(
    {
        "http": django_asgi_app,
        # Origin first: a refused browser never reaches the session or token lookups.
        "websocket": RealtimeOriginValidator(RealtimeAuthStack(URLRouter(websocket_urlpatterns))),
    }
)
