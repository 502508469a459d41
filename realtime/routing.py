"""Websocket routes (README "Real-time updates"); freeagentics.asgi mounts them."""

from django.urls import path, re_path

from realtime.coalition_consumers import CoalitionConsumer
from realtime.consumers import AgentConsumer, unknown_path

websocket_urlpatterns = [
    path("ws/agents/", AgentConsumer.as_asgi()),
    # str, not uuid: a malformed id must get close code 4404, not a routing error.
    path("ws/agents/<str:agent_id>/", AgentConsumer.as_asgi()),
    path("ws/coalitions/<str:coalition_id>/", CoalitionConsumer.as_asgi()),
    re_path(r"", unknown_path),
]
