"""Every admin page a newcomer reaches from the index, in headless Chromium at a desktop
width (1366x900) and a phone width (390x844), logged in as the development superuser.

Each page must:
- answer below 500, log no ERROR (nor a 404, such as the browser's favicon request);
- cut off no table column: no header or cell clips its content (scrollWidth beyond
  clientWidth) and no text input clips its value. At desktop width each list also fits
  its box, so no column is out of view. At phone width Django's admin lets a wide list
  scroll sideways inside its box, which is how a phone reaches the other columns: there
  the list only has to sit in a box that scrolls (overflow-x auto or scroll);
- print no `null`, no raw ISO time (2026-12-02T02:42) and no ciphertext (FAE1, gAAAAA),
  in its text or in its form fields.

Screenshots go to test-artifacts/tour-<width>-<page>.png (git-ignored); the few the README's
"Tour" shows are written to docs/img/ as well, so this test refreshes them.
"""

import logging
import re
from pathlib import Path

import h3
import pytest
from django.conf import settings
from django.contrib.auth.models import User
from playwright.sync_api import expect

from agents.services import agent_update_state
from agents.types import AgentStateUpdate
from coalitions.models import Coalition
from metrics.models import DroppedPoints, RejectedPoint
from tests import factories
from tests.backoffice import ARTIFACTS, PASSWORD, TIMEOUT_MS

pytestmark = pytest.mark.django_db(transaction=True)

DOCS_IMG = Path(settings.BASE_DIR) / "docs" / "img"
VIEWPORTS = {"desktop": (1366, 900), "phone": (390, 844)}
# The pictures docs/README-admin.md shows ("Tour"), at desktop width: page name ->
# (file, the element to picture, or None for the window as it opens).
TOUR = {
    "agent-list": ("tour-agent-list.png", None),
    "agent-change": ("tour-agent-page.png", "fieldset:has(#agent-neighbourhood)"),
    "coalition-configured": (
        "tour-coalition-page.png",
        "fieldset:has([name=business_config])",
    ),
    "tenant-overview": ("tour-tenant-overview.png", None),
    "outbox": ("tour-metrics-outbox.png", None),
    "health": ("tour-system-health.png", None),
}

ISO_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d")
NULL = re.compile(r"\bnull\b")
CIPHERTEXT = ("FAE1", "gAAAAA")

# Cells and inputs that clip their content; tables at desktop width wider than their box.
CUT_OFF_JS = """desktop => {
  const cut = [];
  const name = e => (e.closest('table')?.id || e.closest('fieldset, .inline-group, div')?.id || '')
      + ' ' + e.tagName + ': ' + (e.innerText || e.value || '').trim().slice(0, 40);
  for (const e of document.querySelectorAll('table th, table td')) {
    if (e.offsetParent === null) continue;  // not displayed
    if (e.scrollWidth > e.clientWidth + 1) cut.push('clipped ' + name(e));
  }
  for (const e of document.querySelectorAll('input[type=text], input:not([type])')) {
    if (e.offsetParent === null || !e.value) continue;
    if (e.scrollWidth > e.clientWidth + 1) cut.push('clipped input ' + name(e));
  }
  for (const t of document.querySelectorAll('#result_list')) {
    const box = t.parentElement;
    const style = getComputedStyle(box);
    const scrolls = ['auto', 'scroll'].includes(style.overflowX);
    if (desktop && t.getBoundingClientRect().right > box.getBoundingClientRect().right + 1)
      cut.push('list wider than its box: ' + Math.round(t.getBoundingClientRect().width)
               + ' > ' + Math.round(box.getBoundingClientRect().width));
    if (!desktop && t.scrollWidth > box.clientWidth + 1 && !scrolls)
      cut.push('list wider than the screen in a box that does not scroll');
  }
  return cut;
}"""

# What a page must say, by its path after /admin/ (this test runs without INFLUXDB_URL).
EXPECTED_TEXT = {
    "metrics/outboxpoint/": "Metrics outbox: not configured",
    "metrics/droppedpoints/": "Metrics outbox: not configured",
}

FIELD_VALUES_JS = """() => [...document.querySelectorAll(
  'input:not([type=hidden]):not([type=password]), textarea')].map(e => e.value)"""


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.WARNING)
        self.records = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture
def captured_logs():
    """WARNING and above from the live server's thread and this one, whatever the
    project's logging sends to the console (a 404 is a WARNING of django.request)."""
    handler = _Records()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield handler.records
    finally:
        root.removeHandler(handler)


@pytest.fixture
def tour_world(world_a, settings):
    """What a newcomer's demo has: agents with history, coalitions with and without
    configuration, metrics points waiting (InfluxDB not configured), one dropped and
    one rejected."""
    settings.INFLUXDB_URL = ""
    agent = world_a.agent
    for energy in (90, 80, 70):
        agent_update_state(
            tenant=world_a.tenant,
            update=AgentStateUpdate(agent_id=agent.pk, energy_level=energy),
        )
    # Spread over a few cells, so the tenant overview's map has shades to show.
    cells = sorted(h3.grid_disk(agent.location_h3, 2))
    for i in range(9):
        factories.make_agent(
            world_a.tenant,
            name=f"scout-with-a-rather-long-name-{i}",
            agent_type="explorer",
            location_h3=cells[(i * i) % len(cells)],
            personality_traits={"curiosity": 0.8, "caution": 0.3},
        )
    Coalition.objects.filter(pk=world_a.coalition.pk).update(
        business_config=None, formation_criteria=None
    )
    config = {
        "formation_criteria": {"min_members": 2, "regions": ["berlin", "potsdam"]},
        "business_config": {"pricing": {"base": 10, "surge": 1.5}, "currency": "EUR"},
    }
    world_a.configured = factories.make_coalition(
        world_a.tenant, name="configured-coalition", **config
    )
    # Dissolved: every field read-only, the JSON shown through json_display.
    world_a.dissolved = factories.make_coalition(
        world_a.tenant,
        name="dissolved-coalition",
        status="dissolved",
        dissolved_at=agent.created_at,
        **config,
    )
    DroppedPoints.objects.create(minute=agent.created_at.replace(second=0), points=3)
    RejectedPoint.objects.create(line="agent_beliefs,agent=x entropy=bad", error="bad field")
    User.objects.create_superuser("tour-admin", "tour@example.com", PASSWORD)
    return world_a


def _pages(world) -> dict[str, str]:
    t, a, c = world.tenant.pk, world.agent.pk, world.coalition.pk
    return {
        "index": "/admin/",
        "tenant-list": "/admin/agents/tenant/",
        "tenant-change": f"/admin/agents/tenant/{t}/change/",
        "tenant-overview": f"/admin/agents/tenant/{t}/overview/",
        "agent-list": "/admin/agents/agent/",
        "agent-change": f"/admin/agents/agent/{a}/change/",
        "coalition-list": "/admin/coalitions/coalition/",
        "coalition-change": f"/admin/coalitions/coalition/{c}/change/",
        "coalition-configured": f"/admin/coalitions/coalition/{world.configured.pk}/change/",
        "coalition-dissolved": f"/admin/coalitions/coalition/{world.dissolved.pk}/change/",
        "apitoken-list": "/admin/agents/apitoken/",
        "apitoken-add": "/admin/agents/apitoken/add/",
        "outbox": "/admin/metrics/outboxpoint/",
        "rejected": "/admin/metrics/rejectedpoint/",
        "dropped": "/admin/metrics/droppedpoints/",
        "health": "/admin/health/",
    }


def _problems_on(page, url: str, desktop: bool) -> list[str]:
    problems = []
    response = page.goto(url)
    if response is None or response.status >= 500:
        problems.append(f"status {response and response.status}")
    text = page.locator("body").inner_text()
    values = page.evaluate(FIELD_VALUES_JS)
    for where, content in [("text", text), *(("field", v) for v in values)]:
        if NULL.search(content):
            problems.append(f"{where} shows null: {content[:80]!r}")
        if match := ISO_TIME.search(content):
            problems.append(f"{where} shows a raw ISO time: {match.group()}")
        for marker in CIPHERTEXT:
            if marker in content:
                problems.append(f"{where} shows ciphertext ({marker})")
    problems += page.evaluate(CUT_OFF_JS, desktop)
    if (expected := EXPECTED_TEXT.get(url.rsplit("/admin/", 1)[-1])) and expected not in text:
        problems.append(f"does not say {expected!r}")
    return problems


def test_every_page_a_newcomer_reaches_reads_well_at_both_widths(
    live_server, tour_world, chromium, captured_logs
):
    pages = _pages(tour_world)
    DOCS_IMG.mkdir(parents=True, exist_ok=True)
    problems, failed_requests = {}, []
    with chromium() as browser:
        for width_name, (width, height) in VIEWPORTS.items():
            context = browser.new_context(viewport={"width": width, "height": height})
            context.set_default_timeout(TIMEOUT_MS)
            page = context.new_page()
            page.on(
                "response",
                lambda r: r.status >= 400 and failed_requests.append(f"{r.status} {r.url}"),
            )
            page.goto(f"{live_server.url}/admin/login/?next=/admin/")
            page.fill("#id_username", "tour-admin")
            page.fill("#id_password", PASSWORD)
            page.click("input[type=submit]")
            expect(page).to_have_url(f"{live_server.url}/admin/")
            for name, path in pages.items():
                found = _problems_on(page, live_server.url + path, width_name == "desktop")
                if found:
                    problems[f"{width_name} {name}"] = found
                shot = ARTIFACTS / f"tour-{width_name}-{name}.png"
                page.screenshot(path=shot, full_page=True)
                if width_name == "desktop" and name in TOUR:
                    filename, element = TOUR[name]
                    target = page.locator(element) if element else page
                    target.screenshot(path=DOCS_IMG / filename)
            context.close()
    logged = [f"{r.levelname} {r.name}: {r.getMessage()}" for r in captured_logs]
    errors = [line for line in logged if line.startswith(("ERROR", "CRITICAL"))]
    not_found = [line for line in logged if "Not Found" in line]
    assert (problems, failed_requests, errors, not_found) == ({}, [], [], [])
