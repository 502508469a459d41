"""The back office in a real browser: headless Debian Chromium driven by Playwright,
against pytest-django's live server, with a real InfluxDB behind the metrics chart.

Screenshots go to test-artifacts/ at the repository root (git-ignored).
"""

import h3
import pytest
from playwright.sync_api import expect

from agents.admin_scoping import OPERATOR_EDITOR
from coalitions.models import CoalitionMember
from tests import factories
from tests.backoffice import ARTIFACTS, PASSWORD, TIMEOUT_MS, record_metrics

pytestmark = pytest.mark.django_db(transaction=True)


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


def test_an_operator_sees_the_pictures_and_the_metrics_chart(
    live_server, make_operator, world_a, world_b, influx_metrics, chromium
):
    agent = world_a.agent
    for i, cell in enumerate(sorted(h3.grid_ring(agent.location_h3, 1))[:3]):
        factories.make_agent(world_a.tenant, name=f"neighbour-{i}", location_h3=cell)
    record_metrics(agent, hours=6)
    make_operator(world_a.tenant, OPERATOR_EDITOR, username="browser-a")
    with chromium() as browser:
        _check_agent_and_overview_pages(browser, live_server.url, world_a)


def _check_agent_and_overview_pages(browser, base_url: str, world_a) -> None:
    agent = world_a.agent
    page = _log_in(browser, base_url, "browser-a")
    page.goto(f"{base_url}/admin/agents/agent/{agent.pk}/change/")

    picture = page.locator("svg#agent-neighbourhood")
    expect(picture).to_be_visible()
    expect(picture.locator("polygon.hex-cell")).to_have_count(37)
    expect(picture.locator("circle.agent-nearby")).to_have_count(3)
    expect(page.locator("#agent-marker-self")).to_be_visible()
    box = picture.bounding_box()
    assert box["width"] > 200 and box["height"] > 200
    # The browser laid the hexagons out as real shapes, not zero-size elements.
    areas = picture.locator("polygon.hex-cell").evaluate_all(
        "cells => cells.map(c => { const b = c.getBBox(); return b.width * b.height; })"
    )
    assert len(areas) == 37 and min(areas) > 100

    chart = page.locator(".metrics-chart")
    expect(chart).to_be_visible()
    lines = chart.locator("svg polyline")
    expect(lines).to_have_count(2)
    lengths = lines.evaluate_all("lines => lines.map(l => l.getTotalLength())")
    assert min(lengths) > 50, lengths
    expect(chart.locator("svg circle")).to_have_count(12)
    expect(chart).to_contain_text("6 of the last 24 hours have data")

    page.screenshot(path=ARTIFACTS / "admin-agent-page.png", full_page=True)
    picture.screenshot(path=ARTIFACTS / "admin-agent-neighbourhood.png")
    chart.screenshot(path=ARTIFACTS / "admin-agent-metrics-chart.png")

    page.goto(f"{base_url}/admin/agents/tenant/{world_a.tenant.pk}/overview/")
    density = page.locator("svg#tenant-density")
    expect(density).to_be_visible()
    expect(density.locator("polygon.hex-cell")).to_have_count(4)
    page.screenshot(path=ARTIFACTS / "admin-tenant-overview.png", full_page=True)

    page.goto(f"{base_url}/admin/coalitions/coalition/{world_a.coalition.pk}/change/")
    # Roles are editable now, so the role sits in an input's value, not in the text.
    expect(page.locator("#memberships-group input[name$='-role']").first).to_have_value(
        "alpha-founder"
    )
    page.click("button.coalition-status-active")
    expect(page.locator("ul.messagelist")).to_contain_text("is now active")
    expect(page.locator("button.coalition-status-profitable")).to_be_visible()
    page.screenshot(path=ARTIFACTS / "admin-coalition-page.png", full_page=True)


def test_two_operators_side_by_side_each_see_only_their_own_world(
    live_server, make_operator, world_a, world_b, chromium
):
    make_operator(world_a.tenant, OPERATOR_EDITOR, username="side-a")
    make_operator(world_b.tenant, OPERATOR_EDITOR, username="side-b")
    base_url = live_server.url
    with chromium() as browser:
        # Separate browser contexts: separate cookie jars, as two people at two desks.
        page_a = _log_in(browser, base_url, "side-a")
        page_b = _log_in(browser, base_url, "side-b")
        for page, mine, theirs, shot in (
            (page_a, world_a, world_b, "a"),
            (page_b, world_b, world_a, "b"),
        ):
            page.goto(f"{base_url}/admin/agents/agent/")
            expect(page.locator("#result_list tbody tr")).to_have_count(2)
            expect(page.locator("#result_list")).to_contain_text(mine.agent.name)
            expect(page.locator("#result_list")).not_to_contain_text(theirs.agent.name)
            page.screenshot(path=ARTIFACTS / f"admin-side-by-side-{shot}.png", full_page=True)

            response = page.goto(f"{base_url}/admin/agents/agent/{theirs.agent.pk}/change/")
            assert response.status == 404
            response = page.goto(f"{base_url}/admin/agents/agent/{mine.agent.pk}/change/")
            assert response.status == 200


def test_saving_an_unchanged_coalition_with_members_succeeds(
    live_server, make_operator, world_a, chromium
):
    # The member rows' hidden ids must be in the rendered form: without them the saved
    # formset matched no existing member and the page said "Please correct the errors
    # below" with no field error to correct.
    coalition = world_a.coalition
    second = factories.make_agent(world_a.tenant, name="second-member")
    CoalitionMember.objects.create(coalition=coalition, agent=second, role="second")
    members_before = set(coalition.memberships.values_list("pk", "agent_id", "role"))
    make_operator(world_a.tenant, OPERATOR_EDITOR, username="saver-a")
    with chromium() as browser:
        page = _log_in(browser, live_server.url, "saver-a")
        page.goto(f"{live_server.url}/admin/coalitions/coalition/{coalition.pk}/change/")
        expect(page.locator("#memberships-group tr.has_original")).to_have_count(2)
        page.click("input[name=_continue]")
        expect(page.locator("ul.messagelist")).to_contain_text("was changed successfully")
        expect(page.locator(".errornote")).to_have_count(0)
        page.screenshot(path=ARTIFACTS / "admin-coalition-saved.png", full_page=True)
    assert set(coalition.memberships.values_list("pk", "agent_id", "role")) == members_before
