"""A tenant's Live page (agents/admin.py live_view) and the clients of the agent stream:
realtime/static/realtime/stream.js in headless Chromium against a real uvicorn (the page
needs websockets, which pytest-django's live_server does not serve), the same client's
protocol rules against a scripted socket, and examples/stream_client.py.

Screenshots go to test-artifacts/ at the repository root (git-ignored).
"""

import importlib.util
import json
import subprocess
import sys
import threading
import time

import h3
import pytest
from django.db import connections
from playwright.sync_api import expect

from agents.admin_scoping import OPERATOR_READ_ONLY
from agents.services import agent_create, agent_delete, agent_update_state
from agents.types import AgentStateUpdate
from realtime.services import api_token_create
from tests import factories
from tests.backoffice import ARTIFACTS, PASSWORD, TIMEOUT_MS
from tests.processes import stop_process
from tests.realtime.conftest import running_uvicorn
from tests.realtime.helpers import ROOT, server_env

STREAM_JS = ROOT / "realtime" / "static" / "realtime" / "stream.js"
STREAM_CLIENT = ROOT / "examples" / "stream_client.py"
committed = pytest.mark.django_db(transaction=True)


def _live_url(tenant) -> str:
    return f"/admin/agents/tenant/{tenant.pk}/live/"


def _config(response) -> dict:
    body = response.content.decode()
    start = body.index('<script id="live-config" type="application/json">') + len(
        '<script id="live-config" type="application/json">'
    )
    return json.loads(body[start : body.index("</script>", start)])


# The page, through Django's test client ------------------------------------------------


@pytest.mark.django_db
def test_the_tenant_list_links_to_the_live_page(editor_a, world_a):
    body = editor_a.get("/admin/agents/tenant/").content.decode()
    assert f'href="{_live_url(world_a.tenant)}" class="tenant-live-link"' in body


@pytest.mark.django_db
def test_the_live_page_draws_the_map_and_carries_only_its_tenants_agents(
    reader_a, world_a, world_b
):
    response = reader_a.get(_live_url(world_a.tenant))

    assert response.status_code == 200
    body = response.content.decode()
    assert 'id="live-map"' in body
    # The occupied cell and the ring around it, for agents to move into.
    assert body.count('class="hex-cell"') == 7
    assert 'src="/static/realtime/stream.js"' in body
    config = _config(response)
    assert config["url"] == f"/ws/agents/?tenant={world_a.tenant.slug}"
    assert config["complete"] is True
    ids = {agent["agent_id"] for agent in config["agents"]}
    assert ids == {str(world_a.agent.pk), str(world_a.idle_agent.pk)}
    data = next(a["data"] for a in config["agents"] if a["agent_id"] == str(world_a.agent.pk))
    assert data["location_h3"] == world_a.agent.location_h3
    assert (data["lat"], data["lng"]) == pytest.approx(h3.cell_to_latlng(data["location_h3"]))
    assert set(config["centres"]) == set(h3.grid_disk(world_a.agent.location_h3, 1))
    statuses = dict(response.context["agents_by_status"])
    assert statuses == {"active": 1, "inactive": 1, "suspended": 0}


@pytest.mark.django_db
def test_another_tenants_live_page_is_the_404_of_an_unknown_tenant(editor_a, world_a, world_b):
    mine = editor_a.get(_live_url(world_a.tenant))
    theirs = editor_a.get(_live_url(world_b.tenant))
    unknown = editor_a.get("/admin/agents/tenant/00000000-0000-4000-8000-000000000000/live/")

    assert mine.status_code == 200
    assert theirs.status_code == unknown.status_code == 404
    assert theirs.content == unknown.content


@pytest.mark.django_db
def test_staff_without_a_tenant_get_404_and_a_superuser_streams_the_tenant_shown(
    make_operator, superuser_client, world_a
):
    from tests.backoffice import logged_in

    no_tenant = logged_in(make_operator(None, OPERATOR_READ_ONLY))
    assert no_tenant.get(_live_url(world_a.tenant)).status_code == 404

    response = superuser_client.get(_live_url(world_a.tenant))
    assert response.status_code == 200
    assert _config(response)["url"] == f"/ws/agents/?tenant={world_a.tenant.slug}"


# The page in Chromium, against uvicorn ------------------------------------------------


@pytest.fixture
def asgi_site(django_db_setup, tmp_path):
    """A real uvicorn serving HTTP and websockets on the test database, with DEBUG on so
    it serves the static files (stream.js) as scripts/run.sh does; yields its http URL."""
    with running_uvicorn(tmp_path / "server.log", DEBUG="1") as server:
        yield server.url.replace("ws://", "http://", 1)


def in_thread(fn, *args, **kwargs):
    """Run a database call in a thread of its own, its connection closed afterwards.
    Playwright's sync API runs an event loop in this thread, where Django's ORM refuses
    to run (and a connection made there would be left open)."""
    outcome = {}

    def target():
        try:
            outcome["value"] = fn(*args, **kwargs)
        except BaseException as e:
            outcome["error"] = e
        finally:
            connections.close_all()

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def _log_in(browser, base_url: str, username: str):
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    page.goto(f"{base_url}/admin/login/?next=/admin/")
    page.fill("#id_username", username)
    page.fill("#id_password", PASSWORD)
    page.click("input[type=submit]")
    expect(page).to_have_url(f"{base_url}/admin/")
    return page


@committed
@pytest.mark.slow
def test_the_live_page_moves_markers_and_counts_as_updates_arrive(
    asgi_site, make_operator, world_a, world_b, chromium
):
    tenant, agent = world_a.tenant, world_a.agent
    start = agent.location_h3
    target = sorted(h3.grid_ring(start, 1))[0]
    make_operator(tenant, OPERATOR_READ_ONLY, username="live-a")
    with chromium() as browser:
        page = _log_in(browser, asgi_site, "live-a")
        page.goto(f"{asgi_site}{_live_url(tenant)}")
        status = page.locator("#live-status")
        expect(status).to_have_attribute("data-state", "live")
        marker = page.locator(f'circle.live-marker[data-agent-id="{agent.pk}"]')
        expect(marker).to_have_attribute("data-cell", start)
        expect(page.locator("circle.live-marker")).to_have_count(2)
        suspended = page.locator('#live-agents-by-status td.count[data-status="suspended"]')
        active = page.locator('#live-agents-by-status td.count[data-status="active"]')
        expect(suspended).to_have_text("0")
        expect(active).to_have_text("1")
        before = (marker.get_attribute("cx"), marker.get_attribute("cy"))
        frames_before = int(page.locator("#live-frames").get_attribute("data-count"))

        update = AgentStateUpdate(agent.pk, location_h3=target, status="suspended")
        in_thread(agent_update_state, tenant=tenant, update=update)

        expect(marker).to_have_attribute("data-cell", target)
        expect(marker).to_have_attribute("data-status", "suspended")
        expect(suspended).to_have_text("1")
        expect(active).to_have_text("0")
        after = (marker.get_attribute("cx"), marker.get_attribute("cy"))
        assert after != before
        assert int(page.locator("#live-frames").get_attribute("data-count")) > frames_before
        # The cell it left is lighter, the one it entered darker.
        expect(page.locator(f'polygon.hex-cell[data-cell="{target}"]')).to_have_attribute(
            "data-count", "1"
        )
        expect(page.locator(f'polygon.hex-cell[data-cell="{start}"]')).to_have_attribute(
            "data-count", "1"
        )

        newcomer = in_thread(
            agent_create,
            tenant=tenant,
            spec=factories.agent_spec(name="newcomer", location_h3=target),
        )
        expect(page.locator(f'circle[data-agent-id="{newcomer.id}"]')).to_have_count(1)
        expect(page.locator("#live-agent-count")).to_have_text("3")
        expect(page.locator(f'polygon.hex-cell[data-cell="{target}"]')).to_have_attribute(
            "data-count", "2"
        )
        page.screenshot(path=ARTIFACTS / "admin-tenant-live.png", full_page=True)

        in_thread(agent_delete, tenant=tenant, agent_id=newcomer.id)
        expect(page.locator(f'circle[data-agent-id="{newcomer.id}"]')).to_have_count(0)
        expect(page.locator("#live-agent-count")).to_have_text("2")

        # The other tenant's agents never reach this page, moved or not.
        theirs = AgentStateUpdate(world_b.agent.pk, location_h3=target)
        in_thread(agent_update_state, tenant=world_b.tenant, update=theirs)
        in_thread(
            agent_update_state,
            tenant=tenant,
            update=AgentStateUpdate(world_a.idle_agent.pk, energy_level=7),
        )
        expect(
            page.locator(f'circle[data-agent-id="{world_a.idle_agent.pk}"] title')
        ).to_contain_text("energy 7")
        expect(page.locator(f'circle[data-agent-id="{world_b.agent.pk}"]')).to_have_count(0)


# stream.js's rules, against a scripted socket ------------------------------------------

FAKE_SOCKET = """
window.sockets = [];
class FakeSocket {
  constructor(url, protocols) {
    this.url = url; this.sent = []; this.readyState = 0; window.sockets.push(this);
  }
  send(text) { this.sent.push(JSON.parse(text)); }
  close(code, reason) {
    if (this.readyState >= 2) return;
    this.readyState = 3; this.closedWith = code;
    setTimeout(() => this.onclose && this.onclose({code: code, reason: reason || ""}), 0);
  }
  // The server's side.
  open() { this.readyState = 1; this.onopen && this.onopen({}); }
  deliver(frame) { this.onmessage && this.onmessage({data: JSON.stringify(frame)}); }
  drop(code, reason) {
    this.readyState = 3; this.onclose && this.onclose({code: code, reason: reason || ""});
  }
}
window.FakeSocket = FakeSocket;
window.sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
window.makeStream = (options) => {
  const events = [];
  const stream = new AgentStream("ws://example.test/ws/agents/?tenant=t", Object.assign({
    WebSocket: FakeSocket, initialDelay: 10, maxDelay: 40, random: () => 1, pingInterval: 0,
    onState: (c) => events.push({kind: c.kind, changed: c.changed, removed: c.removed}),
    onStatus: (status, detail) => events.push({status: status, detail: detail}),
  }, options || {}));
  stream.events = events;
  return stream;
};
window.agent = (id, version, extra) => Object.assign({agent_id: id, data: Object.assign(
  {name: id, status: "active", location_h3: "891f1d48947ffff", version: version}, extra || {})});
window.update = (seq, id, version, extra) => Object.assign(
  {type: "agent.updated", timestamp: 1}, seq === null ? {} : {seq: seq}, agent(id, version, extra));
window.held = (stream) => Object.fromEntries(
  Array.from(stream.agents, ([id, data]) => [id, data.version]));
"""


@pytest.fixture
def stream_page(chromium):
    """A blank page in headless Chromium with stream.js and a scripted WebSocket loaded."""
    with chromium() as browser:
        page = browser.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.set_content("<!doctype html><title>stream.js</title>")
        page.add_script_tag(path=str(STREAM_JS))
        page.add_script_tag(content=FAKE_SOCKET)
        yield page


def test_stream_js_asks_for_a_snapshot_skips_duplicates_and_keeps_the_newest_version(
    stream_page,
):
    result = stream_page.evaluate(
        """async () => {
      const s = makeStream();
      s.seed([agent("a", 100), agent("b", 100)]);
      s.start();
      const ws = sockets[0];
      ws.open();
      const asked = ws.sent.slice();
      ws.deliver({type: "ready", seq: 5});
      ws.deliver(update(6, "a", 200));
      ws.deliver(update(6, "a", 300));          // the same seq again: a duplicate
      ws.deliver(update(4, "b", 400));          // older than the last seq
      ws.deliver(update(7, "b", 50));           // a lower version than held: stale
      ws.deliver(update(null, "c", 10));        // no seq (a server before sequence numbers)
      ws.deliver({type: "agent.deleted", seq: 8, agent_id: "c", data: {}, timestamp: 1});
      return {url: ws.url, asked: asked, held: held(s), lastSeq: s.lastSeq, stats: s.stats,
              status: s.status};
    }"""
    )
    assert result["url"] == "ws://example.test/ws/agents/?tenant=t"
    assert result["asked"] == [{"action": "snapshot", "id": 1}]
    assert result["held"] == {"a": 200, "b": 100}
    assert result["lastSeq"] == 8
    assert (result["stats"]["duplicates"], result["stats"]["stale"]) == (2, 1)
    assert result["status"] == "live"


def test_stream_js_snapshot_sets_the_state_and_keeps_what_came_after_it(stream_page):
    result = stream_page.evaluate(
        """async () => {
      const s = makeStream();
      s.seed([agent("gone", 1), agent("a", 1)]);
      s.start();
      const ws = sockets[0];
      ws.open();
      ws.deliver({type: "ready", seq: 10});
      ws.deliver(update(12, "b", 500));         // after the snapshot's point: it stays
      ws.deliver({type: "agent.deleted", seq: 13, agent_id: "x", data: {}, timestamp: 1});
      ws.deliver({type: "snapshot", seq: 11, id: 1,
                  agents: [agent("a", 5), agent("b", 400), agent("x", 400)]});
      const afterSnapshot = {held: held(s), lastSeq: s.lastSeq};
      ws.deliver(update(11, "a", 9));           // included in the snapshot: a duplicate
      ws.deliver(update(14, "a", 9));
      return {afterSnapshot: afterSnapshot, held: held(s), lastSeq: s.lastSeq,
              resets: s.events.filter((e) => e.kind === "reset").length};
    }"""
    )
    # "gone" is not in the snapshot; "x" was deleted after it; "b" changed after it.
    assert result["afterSnapshot"] == {"held": {"a": 5, "b": 500}, "lastSeq": 13}
    assert result["held"] == {"a": 9, "b": 500}
    assert result["lastSeq"] == 14
    assert result["resets"] == 2  # the seed, the snapshot


def test_stream_js_resync_asks_for_a_snapshot_and_ignores_an_older_answer(stream_page):
    result = stream_page.evaluate(
        """async () => {
      const s = makeStream();
      s.start();
      const ws = sockets[0];
      ws.open();
      ws.deliver({type: "resync", seq: 40, reason: "too old"});
      const statusAfterResync = s.status;
      ws.deliver({type: "snapshot", seq: 30, id: 1, agents: [agent("old", 1)]});
      ws.deliver({type: "snapshot", seq: 40, id: 2, agents: [agent("new", 1)]});
      return {sent: ws.sent, status: statusAfterResync, held: held(s), lastSeq: s.lastSeq};
    }"""
    )
    assert result["sent"] == [{"action": "snapshot", "id": 1}, {"action": "snapshot", "id": 2}]
    assert result["status"] == "resyncing"
    assert result["held"] == {"new": 1}
    assert result["lastSeq"] == 40


def test_stream_js_reconnects_with_backoff_and_resume_after(stream_page):
    result = stream_page.evaluate(
        """async () => {
      const s = makeStream();
      s.start();
      sockets[0].open();
      sockets[0].deliver({type: "snapshot", seq: 3, id: 1, agents: []});
      sockets[0].deliver(update(4, "a", 1));
      const delays = [];
      for (let i = 0; i < 4; i++) {
        sockets[sockets.length - 1].drop(1006);
        delays.push(s.events[s.events.length - 1].detail.delay);
        const count = sockets.length;
        while (sockets.length === count) await sleep(5);
      }
      const last = sockets[sockets.length - 1];
      last.open();
      return {delays: delays, urls: sockets.map((w) => w.url), sentOnResume: last.sent};
    }"""
    )
    # Doubling from 10 ms up to the 40 ms cap (random() is 1 here: the whole ceiling).
    assert result["delays"] == [10, 20, 40, 40]
    assert result["urls"][1:] == ["ws://example.test/ws/agents/?tenant=t&resume_after=4"] * 4
    # It has a snapshot already: resuming fetches only what it missed.
    assert result["sentOnResume"] == []


@pytest.mark.parametrize("code", [4401, 4403])
def test_stream_js_stops_for_good_on_refusal(stream_page, code):
    result = stream_page.evaluate(
        """async (code) => {
      const s = makeStream();
      s.start();
      sockets[0].open();
      sockets[0].drop(code, "refused");
      await sleep(100);
      return {sockets: sockets.length, status: s.status, last: s.events[s.events.length - 1]};
    }""",
        code,
    )
    assert result["sockets"] == 1
    assert result["status"] == "stopped"
    assert result["last"]["detail"] == {"code": code, "reason": "refused"}


def test_stream_js_overflow_resumes_at_once_and_conflated_frames_apply(stream_page):
    result = stream_page.evaluate(
        """async () => {
      const s = makeStream({initialDelay: 5000});
      s.start();
      sockets[0].open();
      sockets[0].deliver({type: "ready", seq: 20});
      sockets[0].deliver({type: "conflated", seq: 22, messages: [
        update(21, "a", 1), update(22, "b", 1)]});
      sockets[0].deliver({type: "conflated", seq: 22, messages: [update(22, "b", 9)]});
      sockets[0].deliver({type: "overflow", dropped: 3});
      while (sockets.length === 1) await sleep(5);
      return {closedWith: sockets[0].closedWith, url: sockets[1].url, held: held(s),
              duplicates: s.stats.duplicates};
    }"""
    )
    assert result["closedWith"] == 4000
    # No backoff (the initial delay is 5 s here): the dropped frames are fetched at once.
    assert result["url"] == "ws://example.test/ws/agents/?tenant=t&resume_after=22"
    assert result["held"] == {"a": 1, "b": 1}
    assert result["duplicates"] == 1


def test_stream_js_works_with_a_server_without_snapshots(stream_page):
    result = stream_page.evaluate(
        """async () => {
      const s = makeStream();
      s.seed([agent("a", 1)]);
      s.start();
      const ws = sockets[0];
      ws.open();
      ws.deliver({type: "error", code: 4400, message: "Unknown action 'snapshot'", id: 1});
      ws.deliver(update(null, "a", 2));
      ws.drop(1006);
      while (sockets.length === 1) await sleep(5);
      sockets[1].open();
      return {status: s.status, held: held(s), url: sockets[1].url, resent: sockets[1].sent};
    }"""
    )
    assert result["held"] == {"a": 2}
    # No seq to resume from, and no snapshot to ask for again.
    assert result["url"] == "ws://example.test/ws/agents/?tenant=t"
    assert result["resent"] == []


# examples/stream_client.py ------------------------------------------------------------


def _load_stream_client():
    spec = importlib.util.spec_from_file_location("stream_client", STREAM_CLIENT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


stream_client = _load_stream_client()


def _update(seq, agent_id, version, **data):
    frame = {"type": "agent.updated", "agent_id": agent_id, "data": {"version": version, **data}}
    return frame if seq is None else {**frame, "seq": seq}


def test_the_python_client_follows_the_same_rules():
    state = stream_client.StreamState()
    state.request_snapshot()
    state.handle({"type": "ready", "seq": 5})
    state.handle(_update(6, "a", 200))
    state.handle(_update(6, "a", 300))  # duplicate
    state.handle(_update(7, "a", 100))  # stale
    state.handle(_update(None, "b", 1))  # no seq: applied
    state.handle(_update(9, "c", 1))
    state.handle({"type": "agent.deleted", "seq": 10, "agent_id": "c", "data": {}})
    change = state.handle(
        {
            "type": "snapshot",
            "seq": 8,
            "id": 1,
            "agents": [
                {"agent_id": "a", "data": {"version": 150}},
                {"agent_id": "c", "data": {"version": 1}},
            ],
        }
    )
    # The deletion of "c" came after the snapshot's point (8), "b" is not in it, and the
    # "a" held is a higher version than the snapshot's.
    assert {k: v["version"] for k, v in state.agents.items()} == {"a": 200}
    assert change.reset and change.removed == {"b"}
    assert state.last_seq == 10
    assert (state.stats["duplicates"], state.stats["stale"]) == (1, 1)

    state.handle({"type": "resync", "seq": 50, "reason": "too old"})
    assert state.outbox[-1] == {"action": "snapshot", "id": 2}
    state.handle({"type": "overflow", "dropped": 2})
    assert state.resume_now
    assert (
        stream_client.with_resume("ws://h/ws/agents/?conflate=50&resume_after=1", state.last_seq)
        == "ws://h/ws/agents/?conflate=50&resume_after=10"
    )
    delays = [stream_client.backoff(n, initial=0.5, cap=10) for n in range(20)]
    assert all(0.5 * min(10, 0.5 * 2**n) <= d <= min(10, 0.5 * 2**n) for n, d in enumerate(delays))


def _client(url: str, token: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, STREAM_CLIENT, "--url", url, *args],
        cwd=ROOT,
        env={**server_env({}), "FREEAGENTICS_TOKEN": token},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for_line(stream, text: str, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    lines = []
    while time.monotonic() < deadline:
        line = stream.readline()
        lines.append(line)
        if text in line:
            return line
    raise AssertionError(f"{text!r} never came: {lines}")


@committed
@pytest.mark.slow
def test_the_python_client_prints_updates_from_a_real_server(asgi_site, tenant):
    agent = factories.make_agent(tenant, name="watched")
    _, token = api_token_create(tenant=tenant, name="example")
    url = asgi_site.replace("http://", "ws://", 1) + "/ws/agents/"
    proc = _client(url, token, "--json", "--changes", "1")
    try:
        _wait_for_line(proc.stderr, "connected to /ws/agents/")
        agent_update_state(tenant=tenant, update=AgentStateUpdate(agent.pk, energy_level=42))
        line = _wait_for_line(proc.stdout, '"event": "updated"')
        assert proc.wait(20) == 0
    finally:
        stop_process(proc, 10)
    event = json.loads(line)
    assert (event["agent_id"], event["data"]["energy_level"]) == (str(agent.pk), 42)


@committed
@pytest.mark.slow
def test_the_python_client_stops_on_a_refused_token(asgi_site, tenant):
    url = asgi_site.replace("http://", "ws://", 1) + "/ws/agents/"
    proc = _client(url, "fa_wrong")
    try:
        _, err = proc.communicate(timeout=30)
    finally:
        stop_process(proc, 10)
    assert proc.returncode == 1
    assert "stopped: 4401" in err
