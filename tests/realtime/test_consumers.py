"""The websocket endpoints through channels' WebsocketCommunicator, on the full ASGI stack
(origin check, session and token authentication, routing) with the real channel layer."""

import json

import numpy as np
import pytest
from django.contrib.auth.models import Permission, User
from django.db import transaction

from agents.models import ApiToken, OperatorMembership
from agents.services import agent_update_state, agents_update_states
from agents.types import AgentStateUpdate
from coalitions.services import coalition_add_member, coalition_remove_member, coalition_set_status
from realtime.auth import SUBPROTOCOL
from realtime.coalition_consumers import COALITION_NOT_FOUND
from realtime.consumers import (
    AGENT_NOT_FOUND,
    AGENTS_NOT_FOUND,
    BELIEFS_FORBIDDEN,
    MALFORMED_JSON,
    NOT_AN_OBJECT,
    AgentConsumer,
)
from realtime.protocol import (
    CLOSE_BAD_REQUEST,
    CLOSE_FORBIDDEN,
    CLOSE_NOT_FOUND,
    CLOSE_UNAUTHENTICATED,
)
from realtime.services import api_token_revoke
from tests import factories
from tests.realtime.helpers import (
    bearer,
    close_code,
    communicator,
    db,
    frames_until,
    next_json,
    session_headers,
)

pytestmark = [pytest.mark.anyio, pytest.mark.django_db(transaction=True)]


def energy(agent, value):
    return AgentStateUpdate(agent.id, energy_level=value)


async def test_update_arrives_after_the_service_call_commits(tenant, token):
    agent = await db(factories.make_agent, tenant)
    _, raw = token
    async with communicator(f"/ws/agents/{agent.id}/", headers=bearer(raw)) as comm:
        await db(agent_update_state, tenant=tenant, update=energy(agent, 42))
        message = await next_json(comm)
    assert message["agent_id"] == str(agent.id)
    assert message["type"] == "agent.updated"
    assert message["data"]["energy_level"] == 42
    assert isinstance(message["timestamp"], float)


async def test_rolled_back_update_never_arrives(tenant, token):
    agent = await db(factories.make_agent, tenant)
    _, raw = token

    def update_then_fail():
        with transaction.atomic():
            agent_update_state(tenant=tenant, update=energy(agent, 13))
            raise RuntimeError("simulated failure after the update")

    async with communicator(f"/ws/agents/{agent.id}/", headers=bearer(raw)) as comm:
        with pytest.raises(RuntimeError):
            await db(update_then_fail)
        # Committed after the rollback: if the rolled-back update were published, it
        # would arrive first.
        await db(agent_update_state, tenant=tenant, update=energy(agent, 77))
        message = await next_json(comm)
    assert message["data"]["energy_level"] == 77


@pytest.mark.reliability("tenant walls")
async def test_tenant_stream_carries_every_agent_of_the_tenant_and_none_of_another(
    tenant, other_tenant, token, other_token
):
    mine = [await db(factories.make_agent, tenant) for _ in range(3)]
    theirs = await db(factories.make_agent, other_tenant)
    async with (
        communicator("/ws/agents/", headers=bearer(token[1])) as comm,
        communicator("/ws/agents/", headers=bearer(other_token[1])) as other,
    ):
        await db(agent_update_state, tenant=other_tenant, update=energy(theirs, 5))
        await db(agents_update_states, tenant=tenant, updates=[energy(a, 50) for a in mine])
        received = [await next_json(comm) for _ in mine]
        other_received = await next_json(other)
    assert [m["agent_id"] for m in received] == [str(a.id) for a in mine]
    assert other_received["agent_id"] == str(theirs.id)


@pytest.mark.reliability("tenant walls")
async def test_beliefs_by_right_shape_for_all_statistics_for_readers_arrays_when_asked(
    tenant, token, beliefs_token
):
    agent = await db(factories.make_agent, tenant)
    # Three elements: exact min, max and mean would give this array back.
    beliefs = np.array([0.125, 0.5, 0.375])
    async with (
        communicator("/ws/agents/", headers=bearer(token[1])) as plain,
        communicator("/ws/agents/", headers=bearer(beliefs_token[1])) as allowed_not_asking,
        communicator("/ws/agents/?include_beliefs=1", headers=bearer(beliefs_token[1])) as asking,
    ):
        await db(
            agent_update_state, tenant=tenant, update=AgentStateUpdate(agent.id, beliefs=beliefs)
        )
        plain_data = (await next_json(plain))["data"]
        reader_data = (await next_json(allowed_not_asking))["data"]
        asking_data = (await next_json(asking))["data"]
    assert plain_data["belief_summary"] == {"shape": [3], "dtype": "float64", "size": 3}
    assert "beliefs" not in plain_data
    assert "beliefs" not in reader_data
    assert (reader_data["belief_summary"]["min"], reader_data["belief_summary"]["max"]) == (
        0.125,
        0.5,
    )
    assert reader_data["belief_summary"]["mean"] == pytest.approx(1 / 3)
    assert asking_data["beliefs"] == beliefs.tolist()
    assert asking_data["belief_summary"] == reader_data["belief_summary"]


async def test_asking_for_beliefs_without_permission_is_refused_with_4403(tenant, token):
    async with communicator("/ws/agents/?include_beliefs=1", headers=bearer(token[1])) as comm:
        assert await close_code(comm) == CLOSE_FORBIDDEN


async def test_subscribe_with_beliefs_without_permission_gets_an_error_frame(tenant, token):
    agent = await db(factories.make_agent, tenant)
    async with communicator(f"/ws/agents/{agent.id}/", headers=bearer(token[1])) as comm:
        await comm.send_json_to(
            {"action": "subscribe", "agent_ids": [str(agent.id)], "include_beliefs": True, "id": 7}
        )
        error = await next_json(comm)
    assert error == {
        "type": "error",
        "code": CLOSE_FORBIDDEN,
        "message": BELIEFS_FORBIDDEN,
        "id": 7,
    }


async def test_subscribe_and_unsubscribe_in_band(tenant, token):
    first, second = [await db(factories.make_agent, tenant) for _ in range(2)]
    async with communicator(f"/ws/agents/{first.id}/", headers=bearer(token[1])) as comm:
        await comm.send_json_to({"action": "subscribe", "agent_ids": [str(second.id)], "id": 1})
        assert await next_json(comm) == {
            "type": "subscribed",
            "agent_ids": [str(second.id)],
            "all": False,
            "include_beliefs": False,
            "id": 1,
        }
        await db(agent_update_state, tenant=tenant, update=energy(second, 31))
        assert (await next_json(comm))["agent_id"] == str(second.id)

        await comm.send_json_to({"action": "unsubscribe", "agent_ids": [str(first.id)]})
        assert (await next_json(comm))["type"] == "unsubscribed"
        await db(agent_update_state, tenant=tenant, update=energy(first, 32))
        await db(agent_update_state, tenant=tenant, update=energy(second, 33))
        message = await next_json(comm)
    assert (message["agent_id"], message["data"]["energy_level"]) == (str(second.id), 33)


async def test_subscribe_to_the_whole_stream_then_leave_it(tenant, token):
    watched, other = [await db(factories.make_agent, tenant) for _ in range(2)]
    async with communicator(f"/ws/agents/{watched.id}/", headers=bearer(token[1])) as comm:
        await comm.send_json_to({"action": "subscribe", "all": True})
        assert (await next_json(comm))["all"] is True
        await db(agent_update_state, tenant=tenant, update=energy(other, 1))
        assert (await next_json(comm))["agent_id"] == str(other.id)
        await comm.send_json_to({"action": "unsubscribe", "all": True})
        assert (await next_json(comm))["type"] == "unsubscribed"
        await db(agent_update_state, tenant=tenant, update=energy(other, 2))
        await db(agent_update_state, tenant=tenant, update=energy(watched, 3))
        message = await next_json(comm)
    assert message["agent_id"] == str(watched.id)


@pytest.mark.reliability("tenant walls")
async def test_subscribing_to_another_tenants_agent_answers_as_for_an_unknown_id(
    tenant, other_tenant, token
):
    mine = await db(factories.make_agent, tenant)
    theirs = await db(factories.make_agent, other_tenant)
    unknown = "00000000-0000-4000-8000-000000000000"
    answers = {}
    async with communicator("/ws/agents/", headers=bearer(token[1])) as comm:
        for name, other_id in (("unknown", unknown), ("foreign", str(theirs.id))):
            await comm.send_json_to({"action": "subscribe", "agent_ids": [str(mine.id), other_id]})
            answer = await next_json(comm)
            # The same text but for the id itself: no existence oracle.
            answers[name] = {**answer, "message": answer["message"].replace(other_id, "<id>")}
    assert answers["unknown"] == answers["foreign"]
    assert answers["unknown"] == {
        "type": "error",
        "code": CLOSE_NOT_FOUND,
        "message": AGENTS_NOT_FOUND.format(count=1, ids="<id>"),
    }


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        ("{not json", MALFORMED_JSON),
        ("[1, 2]", NOT_AN_OBJECT),
        (json.dumps({"action": "dance"}), "Unknown action 'dance'"),
        (json.dumps({"action": "subscribe", "agent_ids": "all"}), "agent_ids: must be a list"),
        (json.dumps({"action": "subscribe"}), "Give agent_ids, or all: true."),
    ],
)
async def test_bad_input_gets_an_error_frame_and_the_connection_stays_open(
    tenant, token, frame, message
):
    async with communicator("/ws/agents/", headers=bearer(token[1])) as comm:
        await comm.send_to(text_data=frame)
        error = await next_json(comm)
        await comm.send_json_to({"action": "ping", "id": "still-there"})
        pong = await next_json(comm)
    assert error["type"] == "error"
    assert error["code"] == CLOSE_BAD_REQUEST
    assert error["message"].startswith(message)
    assert (pong["type"], pong["id"]) == ("pong", "still-there")


async def test_binary_frames_get_an_error_frame(tenant, token):
    async with communicator("/ws/agents/", headers=bearer(token[1])) as comm:
        await comm.send_to(bytes_data=b"\x00\x01")
        assert (await next_json(comm))["type"] == "error"


# Close codes --------------------------------------------------------------------------


async def test_no_credentials_closes_with_4401(tenant):
    async with communicator("/ws/agents/") as comm:
        assert await close_code(comm) == CLOSE_UNAUTHENTICATED


async def test_unknown_token_closes_with_4401(tenant):
    async with communicator("/ws/agents/", headers=bearer("fa_not-a-real-token")) as comm:
        assert await close_code(comm) == CLOSE_UNAUTHENTICATED


async def test_revoked_token_closes_with_4401(tenant, token):
    await db(api_token_revoke, token=token[0])
    async with communicator("/ws/agents/", headers=bearer(token[1])) as comm:
        assert await close_code(comm) == CLOSE_UNAUTHENTICATED


async def close_frame(comm) -> tuple[int, str]:
    message = await comm.receive_output(5)
    assert message["type"] == "websocket.close", message
    return message["code"], message["reason"]


@pytest.mark.reliability("tenant walls")
@pytest.mark.parametrize(
    ("kind", "make", "not_found"),
    [
        ("agents", factories.make_agent, AGENT_NOT_FOUND.format(agent_id="<id>")),
        ("coalitions", factories.make_coalition, COALITION_NOT_FOUND.format(coalition_id="<id>")),
    ],
)
@pytest.mark.reliability("tenant walls")
async def test_another_tenants_id_closes_exactly_as_an_unknown_id(
    tenant, other_tenant, token, kind, make, not_found
):
    theirs = str((await db(make, other_tenant)).id)
    unknown = "00000000-0000-4000-8000-000000000000"
    answers = []
    for other_id in (theirs, unknown):
        async with communicator(f"/ws/{kind}/{other_id}/", headers=bearer(token[1])) as comm:
            code, reason = await close_frame(comm)
            answers.append((code, reason.replace(other_id, "<id>")))
    assert answers == [(CLOSE_NOT_FOUND, not_found)] * 2


@pytest.mark.parametrize("agent_id", ["00000000-0000-4000-8000-000000000000", "not-a-uuid"])
async def test_unknown_agent_closes_with_4404(tenant, token, agent_id):
    async with communicator(f"/ws/agents/{agent_id}/", headers=bearer(token[1])) as comm:
        assert await close_code(comm) == CLOSE_NOT_FOUND


@pytest.mark.parametrize("coalition_id", ["00000000-0000-4000-8000-000000000000", "x"])
async def test_unknown_coalition_closes_with_4404(tenant, token, coalition_id):
    async with communicator(f"/ws/coalitions/{coalition_id}/", headers=bearer(token[1])) as comm:
        assert await close_code(comm) == CLOSE_NOT_FOUND


async def test_unknown_path_closes_with_4404(tenant, token):
    async with communicator("/ws/nothing-here/", headers=bearer(token[1])) as comm:
        assert await close_code(comm) == CLOSE_NOT_FOUND


async def test_bad_conflate_parameter_closes_with_4400(tenant, token):
    async with communicator("/ws/agents/?conflate=1", headers=bearer(token[1])) as comm:
        assert await close_code(comm) == CLOSE_BAD_REQUEST


# Revocation -----------------------------------------------------------------------------


async def test_token_revoked_mid_session_closes_the_connection_with_4401(tenant, token):
    agent = await db(factories.make_agent, tenant)
    async with communicator(f"/ws/agents/{agent.id}/", headers=bearer(token[1])) as comm:
        await db(agent_update_state, tenant=tenant, update=energy(agent, 1))
        assert (await next_json(comm))["data"]["energy_level"] == 1
        await db(api_token_revoke, token=token[0])
        assert await close_code(comm) == CLOSE_UNAUTHENTICATED
        # Nothing reaches a closed connection any more.
        await db(agent_update_state, tenant=tenant, update=energy(agent, 2))
        assert await comm.receive_nothing(timeout=0.5)


async def test_revocation_without_the_notice_is_caught_by_the_periodic_recheck(
    tenant, token, settings
):
    settings.WS_TOKEN_RECHECK_SECONDS = 0
    async with communicator("/ws/agents/", headers=bearer(token[1])) as comm:
        # Revoked behind the service's back (no notice published), e.g. by raw SQL.
        await db(ApiToken.objects.filter(pk=token[0].pk).delete)
        assert await close_code(comm) == CLOSE_UNAUTHENTICATED


# Token transports and sessions ----------------------------------------------------------


async def test_token_in_the_subprotocol_for_browsers(tenant, token):
    from channels.testing import WebsocketCommunicator

    from freeagentics.asgi import application

    agent = await db(factories.make_agent, tenant)
    comm = WebsocketCommunicator(
        application, "/ws/agents/", subprotocols=[SUBPROTOCOL, f"bearer.{token[1]}"]
    )
    connected, subprotocol = await comm.connect()
    try:
        assert (connected, subprotocol) == (True, SUBPROTOCOL)
        assert (await next_json(comm))["type"] == "ready"
        await db(agent_update_state, tenant=tenant, update=energy(agent, 9))
        assert (await next_json(comm))["agent_id"] == str(agent.id)
    finally:
        await comm.disconnect()


async def test_token_in_the_query_string_unless_switched_off(tenant, token, settings):
    async with communicator(f"/ws/agents/?token={token[1]}") as comm:
        await comm.send_json_to({"action": "ping"})
        assert (await next_json(comm))["type"] == "pong"
    settings.WS_TOKEN_QUERY_PARAM = False
    async with communicator(f"/ws/agents/?token={token[1]}") as comm:
        assert await close_code(comm) == CLOSE_UNAUTHENTICATED


def make_user(**fields) -> User:
    n = User.objects.count() + 1
    return User.objects.create_user(username=f"user{n}", password="x", **fields)


async def test_superuser_session_picks_the_tenant(tenant):
    agent = await db(factories.make_agent, tenant)
    user = await db(make_user, is_staff=True, is_superuser=True)
    headers = await db(session_headers, user)
    async with communicator(f"/ws/agents/?tenant={tenant.slug}", headers=headers) as comm:
        await db(agent_update_state, tenant=tenant, update=energy(agent, 4))
        assert (await next_json(comm))["agent_id"] == str(agent.id)
    async with communicator("/ws/agents/", headers=headers) as comm:
        assert await close_code(comm) == CLOSE_BAD_REQUEST
    async with communicator("/ws/agents/?tenant=no-such-tenant", headers=headers) as comm:
        assert await close_code(comm) == CLOSE_NOT_FOUND


async def make_operator(tenant, *, can_view: bool = True) -> User:
    user = await db(make_user, is_staff=True)
    await db(OperatorMembership.objects.create, user=user, tenant=tenant)
    if can_view:
        permission = await db(
            Permission.objects.get, codename="view_agent", content_type__app_label="agents"
        )
        await db(user.user_permissions.add, permission)
    return user


@pytest.mark.reliability("tenant walls")
async def test_operator_session_sees_only_its_tenant(tenant, other_tenant):
    agent = await db(factories.make_agent, tenant)
    headers = await db(session_headers, await make_operator(tenant))
    async with communicator("/ws/agents/?include_beliefs=1", headers=headers) as comm:
        beliefs = np.array([0.25, 0.75])
        await db(
            agent_update_state, tenant=tenant, update=AgentStateUpdate(agent.id, beliefs=beliefs)
        )
        message = await next_json(comm)
    assert message["agent_id"] == str(agent.id)
    assert message["data"]["beliefs"] == [0.25, 0.75]
    async with communicator(f"/ws/agents/?tenant={other_tenant.slug}", headers=headers) as comm:
        assert await close_code(comm) == CLOSE_FORBIDDEN


async def test_operator_without_view_agent_permission_closes_with_4403(tenant):
    headers = await db(session_headers, await make_operator(tenant, can_view=False))
    async with communicator("/ws/agents/", headers=headers) as comm:
        assert await close_code(comm) == CLOSE_FORBIDDEN


@pytest.mark.parametrize("fields", [{}, {"is_staff": True}])
async def test_session_without_tenant_access_closes_with_4403(tenant, fields):
    # A non-staff user, and a staff user with no OperatorMembership.
    user = await db(make_user, **fields)
    headers = await db(session_headers, user)
    async with communicator("/ws/agents/", headers=headers) as comm:
        assert await close_code(comm) == CLOSE_FORBIDDEN


# Origin -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("origin", "accepted"),
    [(None, True), (b"http://localhost:8000", True), (b"https://evil.example", False)],
)
async def test_browser_origins_are_checked_and_originless_clients_pass(
    tenant, token, settings, origin, accepted
):
    from channels.testing import WebsocketCommunicator

    from freeagentics.asgi import application

    settings.ALLOWED_HOSTS = ["localhost"]
    headers = bearer(token[1]) + ([(b"origin", origin)] if origin else [])
    comm = WebsocketCommunicator(application, "/ws/agents/", headers=headers)
    connected, _ = await comm.connect()
    await comm.disconnect()
    assert connected is accepted


# Coalitions -----------------------------------------------------------------------------


async def test_coalition_events_reach_the_coalitions_watchers(tenant, token):
    coalition = await db(factories.make_coalition, tenant)
    agent = await db(factories.make_agent, tenant)
    async with communicator(f"/ws/coalitions/{coalition.id}/", headers=bearer(token[1])) as comm:
        await db(coalition_add_member, tenant=tenant, coalition_id=coalition.id, agent_id=agent.id)
        joined = await next_json(comm)
        await db(coalition_set_status, tenant=tenant, coalition_id=coalition.id, status="active")
        status = await next_json(comm)
        await db(
            coalition_remove_member, tenant=tenant, coalition_id=coalition.id, agent_id=agent.id
        )
        left = await next_json(comm)
    assert joined["coalition_id"] == str(coalition.id)
    assert (joined["type"], joined["data"]["agent_id"]) == (
        "coalition.member_joined",
        str(agent.id),
    )
    assert (status["type"], status["data"]["status"]) == ("coalition.status_changed", "active")
    assert (left["type"], left["data"]["agent_id"]) == ("coalition.member_left", str(agent.id))


async def test_rolled_back_coalition_change_never_arrives(tenant, token):
    coalition = await db(factories.make_coalition, tenant)

    def activate_then_fail():
        with transaction.atomic():
            coalition_set_status(tenant=tenant, coalition_id=coalition.id, status="active")
            raise RuntimeError("simulated failure")

    async with communicator(f"/ws/coalitions/{coalition.id}/", headers=bearer(token[1])) as comm:
        with pytest.raises(RuntimeError):
            await db(activate_then_fail)
        await db(coalition_set_status, tenant=tenant, coalition_id=coalition.id, status="dissolved")
        message = await next_json(comm)
    assert message["data"]["status"] == "dissolved"


# Conflation and the outbound queue --------------------------------------------------------


async def test_conflated_stream_sends_latest_state_per_agent(tenant, token):
    first, second = [await db(factories.make_agent, tenant) for _ in range(2)]
    async with communicator("/ws/agents/?conflate=100", headers=bearer(token[1])) as comm:
        for value in (1, 2, 3):
            await db(
                agents_update_states,
                tenant=tenant,
                updates=[energy(first, value), energy(second, value)],
            )
        received = await frames_until(
            comm,
            lambda frame: any(m["data"]["energy_level"] == 3 for m in frame["messages"]),
        )
    for frame in received:
        assert frame["type"] == "conflated"
        ids = [m["agent_id"] for m in frame["messages"]]
        assert len(ids) == len(set(ids))
    last = {m["agent_id"]: m["data"]["energy_level"] for f in received for m in f["messages"]}
    assert last[str(first.id)] == 3


def test_conflation_keeps_only_the_latest_frame_per_agent():
    consumer = AgentConsumer()
    consumer._latest = {}
    for seq, frame in enumerate(("a1", "b1", "a2"), start=1):
        consumer.push(frame[0], frame, None, seq)
    assert consumer._latest == {"a": "a2", "b": "b1"}


def test_full_queue_drops_the_oldest_frames_and_announces_how_many(settings):
    settings.WS_QUEUE_SIZE = 3
    consumer = AgentConsumer()
    for n in range(5):
        consumer.push("a", f"frame-{n}", None, n + 1)
    sent = [consumer._next_update() for _ in range(4)]
    assert json.loads(sent[0]) == {"type": "overflow", "dropped": 2}
    assert sent[1:] == ["frame-2", "frame-3", "frame-4"]
