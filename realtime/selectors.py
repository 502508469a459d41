"""Reads of the real-time layer: which API tokens are still good."""

import uuid
from collections.abc import Iterable

from agents.models import ApiToken


def api_tokens_active(token_ids: Iterable[uuid.UUID]) -> set[uuid.UUID]:
    """Those of token_ids that still exist and are not revoked."""
    token_ids = list(token_ids)
    if not token_ids:
        return set()
    return set(
        ApiToken.objects.filter(pk__in=token_ids, revoked_at__isnull=True).values_list(
            "pk", flat=True
        )
    )
