"""Websocket endpoint for one coalition's events: /ws/coalitions/<coalition_id>/."""

import uuid

from channels.db import database_sync_to_async

from realtime.coalition_events import coalition_group, coalition_tenant
from realtime.consumers import RealtimeConsumer, Refusal
from realtime.protocol import CLOSE_NOT_FOUND

# Close reason for a coalition that does not exist or is another tenant's.
COALITION_NOT_FOUND = "No coalition {coalition_id}."


class CoalitionConsumer(RealtimeConsumer):
    """Member joined, member left and status changed events of one coalition of the
    connection's tenant. Actions: ping."""

    async def open(self) -> None:
        path_id = self.scope["url_route"]["kwargs"]["coalition_id"]
        try:
            coalition_id = uuid.UUID(path_id)
        except ValueError:
            raise Refusal(
                CLOSE_NOT_FOUND, COALITION_NOT_FOUND.format(coalition_id=path_id)
            ) from None
        # Another tenant's coalition is answered as one that does not exist.
        tenant_id = await database_sync_to_async(coalition_tenant)(coalition_id)
        if tenant_id != self.principal.tenant_id:
            raise Refusal(CLOSE_NOT_FOUND, COALITION_NOT_FOUND.format(coalition_id=coalition_id))
        await self.join_group(coalition_group(coalition_id))

    async def realtime_frame(self, event):
        self.enqueue("", event["frame"])
