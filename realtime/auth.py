"""Who is on a websocket, and which tenant they see: an admin session or an API token.

RealtimeAuthMiddleware stores a Principal in scope["realtime"]. Refusing is left to the
consumer, because a close code only reaches the client on an accepted socket: the
consumer accepts, then closes with Principal.refusal (README "Real-time updates").

Credentials, first found wins: `Authorization: Bearer <token>`; the subprotocol
`bearer.<token>` offered next to `freeagentics.v1` (browsers cannot set headers); the
`token` query parameter (WS_TOKEN_QUERY_PARAM; RedactTokenFilter keeps it out of the
server's logs, not out of a proxy's); else the Django session cookie.
"""

import logging
import re
import uuid
from dataclasses import dataclass
from urllib.parse import parse_qs, unquote_plus, urlparse

from channels.auth import AuthMiddlewareStack
from channels.db import database_sync_to_async
from channels.middleware import BaseMiddleware
from channels.security.websocket import OriginValidator
from django.conf import settings
from django.core.exceptions import ValidationError

from agents.models import OperatorMembership, Tenant
from freeagentics import replicas
from realtime.logs import refusals
from realtime.protocol import (
    CLOSE_BAD_REQUEST,
    CLOSE_FORBIDDEN,
    CLOSE_NOT_FOUND,
    CLOSE_UNAUTHENTICATED,
)
from realtime.services import api_token_authenticate

SUBPROTOCOL = "freeagentics.v1"
TOKEN_SUBPROTOCOL_PREFIX = "bearer."

NO_CREDENTIALS = "Log in to the admin, or present an API token."
TOKEN_REJECTED = "Unknown or revoked API token."
NOT_STAFF = "Only staff users may stream with a session; use an API token."
TENANT_REQUIRED = "A superuser chooses the tenant with ?tenant=<slug>."
TENANT_UNKNOWN = "No tenant with slug {slug!r}."
NO_MEMBERSHIP = "This staff user belongs to no tenant (OperatorMembership)."
OTHER_TENANT = "This credential may not watch tenant {slug!r}."

NO_VIEW_PERMISSION = "This operator may not view agents (permission agents.view_agent)."

# Operators (staff with an OperatorMembership) need it to stream, as to see agents in the
# admin; with it they may also ask for full beliefs. Superusers always may.
VIEW_PERMISSION = "agents.view_agent"


@dataclass(frozen=True, slots=True)
class Principal:
    """The outcome of authentication: a tenant to stream, or a refusal (close code)."""

    tenant_id: uuid.UUID | None = None
    tenant_slug: str = ""
    token_id: uuid.UUID | None = None
    user_id: int | None = None
    can_read_beliefs: bool = False
    refusal: int | None = None
    reason: str = ""


def _refuse(code: int, reason: str) -> Principal:
    return Principal(refusal=code, reason=reason)


def query_param(scope, name: str) -> str | None:
    values = parse_qs(scope.get("query_string", b"").decode("latin-1")).get(name)
    return values[0] if values else None


def presented_token(scope) -> str | None:
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            scheme, _, credential = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and credential.strip():
                return credential.strip()
    for protocol in scope.get("subprotocols") or []:
        if protocol.startswith(TOKEN_SUBPROTOCOL_PREFIX):
            return protocol[len(TOKEN_SUBPROTOCOL_PREFIX) :]
    if settings.WS_TOKEN_QUERY_PARAM:
        return query_param(scope, "token")
    return None


def _authenticate(raw: str):
    try:
        return api_token_authenticate(raw)
    except ValidationError:
        if not settings.DATABASE_REPLICAS:
            raise
    # A token made moments ago may not have reached the replica that was asked.
    with replicas.primary():
        return api_token_authenticate(raw)


def _token_principal(raw: str, tenant_slug: str | None) -> Principal:
    try:
        token = _authenticate(raw)
    except ValidationError:
        return _refuse(CLOSE_UNAUTHENTICATED, TOKEN_REJECTED)
    if tenant_slug and tenant_slug != token.tenant.slug:
        return _refuse(CLOSE_FORBIDDEN, OTHER_TENANT.format(slug=tenant_slug))
    return Principal(
        tenant_id=token.tenant_id,
        tenant_slug=token.tenant.slug,
        token_id=token.pk,
        can_read_beliefs=token.can_read_beliefs,
    )


def _session_principal(user, tenant_slug: str | None) -> Principal:
    if user is None or not user.is_authenticated:
        return _refuse(CLOSE_UNAUTHENTICATED, NO_CREDENTIALS)
    if not (user.is_active and user.is_staff):
        return _refuse(CLOSE_FORBIDDEN, NOT_STAFF)
    if user.is_superuser:
        if not tenant_slug:
            return _refuse(CLOSE_BAD_REQUEST, TENANT_REQUIRED)
        tenant = Tenant.objects.filter(slug=tenant_slug).first()
        if tenant is None:
            return _refuse(CLOSE_NOT_FOUND, TENANT_UNKNOWN.format(slug=tenant_slug))
        return Principal(
            tenant_id=tenant.id, tenant_slug=tenant.slug, user_id=user.pk, can_read_beliefs=True
        )
    membership = OperatorMembership.objects.select_related("tenant").filter(user=user).first()
    if membership is None:
        return _refuse(CLOSE_FORBIDDEN, NO_MEMBERSHIP)
    if tenant_slug and tenant_slug != membership.tenant.slug:
        return _refuse(CLOSE_FORBIDDEN, OTHER_TENANT.format(slug=tenant_slug))
    # The admin's rule: an operator sees the tenant's agents with this permission only.
    if not user.has_perm(VIEW_PERMISSION):
        return _refuse(CLOSE_FORBIDDEN, NO_VIEW_PERMISSION)
    return Principal(
        tenant_id=membership.tenant_id,
        tenant_slug=membership.tenant.slug,
        user_id=user.pk,
        can_read_beliefs=True,
    )


@database_sync_to_async
def _resolve(scope) -> Principal:
    # What this browser wrote through the admin, the connection's reads must see: the
    # position set here stays in the connection's context (freeagentics.replicas).
    replicas.read_after(replicas.session_position(scope.get("session")))
    tenant_slug = query_param(scope, "tenant")
    raw = presented_token(scope)
    if raw is not None:
        # An explicit credential that fails is a refusal, never a fallback to the session.
        return _token_principal(raw, tenant_slug)
    return _session_principal(scope.get("user"), tenant_slug)


class RealtimeAuthMiddleware(BaseMiddleware):
    async def __call__(self, scope, receive, send):
        scope = dict(scope)
        scope["realtime"] = await _resolve(scope)
        return await super().__call__(scope, receive, send)


# Where the server's own send callable is kept (see ServerSendMiddleware).
SERVER_SEND = "freeagentics.server_send"


class ServerSendMiddleware(BaseMiddleware):
    """Keeps the server's send in the scope, so consumers can write data frames past
    channels' SessionMiddleware. Its send wrapper acts only on accept (session saves),
    yet costs a fifth of the server's CPU per frame when streaming (BENCH-realtime.md)."""

    async def __call__(self, scope, receive, send):
        return await super().__call__({**scope, SERVER_SEND: send}, receive, send)


def RealtimeAuthStack(inner):
    """Session and auth middleware (for scope["user"]), then token or session resolution."""
    return ServerSendMiddleware(AuthMiddlewareStack(RealtimeAuthMiddleware(inner)))


def allowed_origins() -> list[str]:
    if settings.WS_ALLOWED_ORIGINS:
        return settings.WS_ALLOWED_ORIGINS
    hosts = settings.ALLOWED_HOSTS
    if settings.DEBUG and not hosts:
        return ["localhost", "127.0.0.1", "[::1]"]
    return hosts


async def deny_handshake(scope, receive, send):
    """Refuse the handshake (uvicorn answers HTTP 403) and return. channels' own
    WebsocketDenier starts a channel-layer receive first, whose cancellation could be
    lost: the task then held uvicorn's shutdown for ever (realtime.consumers docstring)."""
    message = await receive()
    if message["type"] == "websocket.connect":
        await send({"type": "websocket.close"})


class RealtimeOriginValidator(OriginValidator):
    """Refuses the handshake (HTTP 403) when a browser's Origin is not allowed
    (WS_ALLOWED_ORIGINS, default ALLOWED_HOSTS) or cannot be parsed. A handshake without
    Origin passes: cross-site websocket hijacking needs a browser, browsers always send
    Origin, and non-browser token clients often send none."""

    def __init__(self, application):
        super().__init__(application, allowed_origins=[])

    async def __call__(self, scope, receive, send):
        try:
            origins = [
                urlparse(value.decode("latin-1"))
                for name, value in scope.get("headers", [])
                if name == b"origin"
            ]
            allowed = self.valid_origin(origins[-1] if origins else None)
        except ValueError:
            # e.g. "http://[::1": urlparse raises on a malformed IPv6 host.
            allowed = False
        if allowed:
            return await self.application(scope, receive, send)
        refusals.event("websocket origin refused", "Websocket handshake refused for its Origin")
        return await deny_handshake(scope, receive, send)

    def valid_origin(self, parsed_origin) -> bool:
        if parsed_origin is None:
            return True
        return self.validate_origin(parsed_origin)

    def validate_origin(self, parsed_origin) -> bool:
        # Read per handshake, so settings overrides apply without rebuilding the app.
        return any(
            pattern == "*" or self.match_allowed_origin(parsed_origin, pattern)
            for pattern in allowed_origins()
        )


_QUERY_PARAM = re.compile(r"([?&])([^=&\s\"']*)=([^&\s\"']*)")


def _redact_token(match: re.Match) -> str:
    # The name as query_param reads it: "tok%65n" and "%74oken" are `token` too.
    if unquote_plus(match.group(2)) != "token":
        return match.group()
    return f"{match.group(1)}{match.group(2)}=[redacted]"


class RedactTokenFilter(logging.Filter):
    """Replaces the value of a `token` query parameter in log records with [redacted]:
    uvicorn logs every websocket handshake's path with its raw query string."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "=" in message:
            redacted = _QUERY_PARAM.sub(_redact_token, message)
            if redacted != message:
                record.msg, record.args = redacted, None
        return True


def redact_tokens_in_server_logs() -> None:
    """Install RedactTokenFilter on the loggers the ASGI server writes requests to."""
    for name in ("uvicorn.error", "uvicorn.access", "daphne.server", "daphne.http_protocol"):
        log = logging.getLogger(name)
        if not any(isinstance(f, RedactTokenFilter) for f in log.filters):
            log.addFilter(RedactTokenFilter())
