"""API tokens for programmatic websocket clients: create, revoke, authenticate.

A token is shown once, when it is created; only its SHA-256 is stored (see ApiToken).
The admin calls these functions too, so hashing and the revocation notice to open
connections hold wherever tokens are managed.
"""

import datetime
import hashlib
import secrets

from django.contrib.auth.models import User
from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils import timezone

from agents.models import ApiToken, Tenant
from realtime.publisher import publish_token_revoked

TOKEN_INVALID = "token: unknown or revoked API token."
NAME_REQUIRED = "name: must be a non-empty string of at most 100 characters."

# Recognisable in logs and secret scanners; the random part carries 256 bits.
TOKEN_PREFIX = "fa_"
# Characters of the token kept in clear so operators can tell tokens apart.
VISIBLE_PREFIX_LENGTH = 11
# last_used_at is written at most this often per token: a reconnect storm of thousands
# of clients must not become thousands of UPDATEs of one row.
LAST_USED_RESOLUTION = datetime.timedelta(minutes=1)
_MAX_TOKEN_LENGTH = 128


def hash_token(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


def api_token_create(
    *,
    tenant: Tenant,
    name: str,
    created_by: User | None = None,
    can_read_beliefs: bool = False,
) -> tuple[ApiToken, str]:
    """Create a token for the tenant. Returns (token, plaintext): show the plaintext to
    the user now, it cannot be recovered later. Raises ValidationError for a bad name."""
    if not isinstance(name, str) or not 0 < len(name.strip()) <= 100:
        raise ValidationError({"name": NAME_REQUIRED})
    raw = TOKEN_PREFIX + secrets.token_urlsafe(32)
    token = ApiToken.objects.create(
        tenant=tenant,
        name=name.strip(),
        prefix=raw[:VISIBLE_PREFIX_LENGTH],
        key_hash=hash_token(raw),
        can_read_beliefs=bool(can_read_beliefs),
        created_by=created_by,
    )
    return token, raw


def api_token_revoke(*, token: ApiToken) -> ApiToken:
    """Revoke the token. Once the revocation commits, websocket connections using it
    close with 4401. Revoking a revoked token changes nothing (revoked_at keeps its
    first value). Returns the token with revoked_at set."""
    with transaction.atomic():
        changed = ApiToken.objects.filter(pk=token.pk, revoked_at__isnull=True).update(
            revoked_at=timezone.now()
        )
        token.refresh_from_db(fields=["revoked_at"])
        if changed:
            publish_token_revoked(token.pk)
    return token


def api_token_authenticate(raw: str) -> ApiToken:
    """The active token whose plaintext is `raw`, with its tenant loaded. Records when it
    was last used (to the minute). Raises ValidationError(TOKEN_INVALID) for anything
    else: malformed, unknown or revoked tokens are indistinguishable to the caller."""
    if not isinstance(raw, str) or not raw.startswith(TOKEN_PREFIX) or len(raw) > _MAX_TOKEN_LENGTH:
        raise ValidationError({"token": TOKEN_INVALID})
    token = (
        ApiToken.objects.select_related("tenant")
        .filter(key_hash=hash_token(raw), revoked_at__isnull=True)
        .first()
    )
    if token is None:
        raise ValidationError({"token": TOKEN_INVALID})
    now = timezone.now()
    if token.last_used_at is None or now - token.last_used_at >= LAST_USED_RESOLUTION:
        ApiToken.objects.filter(pk=token.pk).update(last_used_at=now)
        token.last_used_at = now
    return token
