"""Operators, tenant worlds (A and B, which must never see each other), InfluxDB for the
agent page's chart, and headless Chromium: the fixtures of every app's admin tests."""

import contextlib
import importlib
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from django.apps import apps as django_apps
from django.conf import settings
from django.contrib.auth.models import Group
from django.test import Client
from playwright.sync_api import sync_playwright

from agents.admin_scoping import OPERATOR_EDITOR, OPERATOR_READ_ONLY
from agents.models import Agent, ApiToken, OperatorMembership, Tenant
from coalitions.models import Coalition, CoalitionMember
from metrics import charts, points
from metrics.services import outbox_add, outbox_flush
from tests import factories

# The metrics tests' own InfluxDB 1.6.7 runner: one way to start the server in the suite.
from tests.metrics.conftest import InfluxDB

PASSWORD = "operator-pw"


@pytest.fixture
def operator_groups(db):
    """The operator groups, re-made by the data migrations' own functions (a transactional
    test's flush deletes the rows the migrations made)."""
    migration = importlib.import_module("agents.migrations.0005_operator_groups")
    migration.create_operator_groups(django_apps, None)
    importlib.import_module("agents.migrations.0007_editors_change_members").grant(
        django_apps, None
    )
    return {name: Group.objects.get(name=name) for name in (OPERATOR_READ_ONLY, OPERATOR_EDITOR)}


@pytest.fixture
def make_operator(operator_groups, django_user_model):
    """Makes a staff user in an operator group, tied to a tenant (or to none)."""

    def make(tenant: Tenant | None, role: str = OPERATOR_EDITOR, username: str | None = None):
        user = django_user_model.objects.create_user(
            username or f"op-{secrets.token_hex(4)}", password=PASSWORD, is_staff=True
        )
        user.groups.add(operator_groups[role])
        if tenant is not None:
            OperatorMembership.objects.create(user=user, tenant=tenant)
        return user

    return make


def logged_in(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


def coalition_form(coalition, rows=(), new=(), delete=()) -> dict:
    """POST data for a coalition's change form as it stands, with the members inline:
    existing `rows` (those in `delete` marked for deletion), `new` (agent, role, score)."""
    coalition.refresh_from_db()
    data = {
        "name": coalition.name,
        "business_model": coalition.business_model,
        "current_capital": coalition.current_capital,
        "total_revenue": coalition.total_revenue,
        "formation_criteria": "null",
        "business_config": "null",
        "memberships-TOTAL_FORMS": len(rows) + len(new),
        "memberships-INITIAL_FORMS": len(rows),
    }
    for i, member in enumerate(rows):
        data[f"memberships-{i}-id"] = member.pk
        data[f"memberships-{i}-coalition"] = coalition.pk
        data[f"memberships-{i}-agent"] = member.agent_id
        data[f"memberships-{i}-role"] = member.role
        data[f"memberships-{i}-contribution_score"] = member.contribution_score
        if member in delete:
            data[f"memberships-{i}-DELETE"] = "on"
    for j, (agent, role, score) in enumerate(new, start=len(rows)):
        data[f"memberships-{j}-coalition"] = coalition.pk
        data[f"memberships-{j}-agent"] = agent.pk
        data[f"memberships-{j}-role"] = role
        data[f"memberships-{j}-contribution_score"] = score
    return data


@dataclass
class TenantWorld:
    tenant: Tenant
    agent: Agent
    idle_agent: Agent
    coalition: Coalition
    token: ApiToken


def _world(tenant: Tenant, tag: str) -> TenantWorld:
    agent = factories.make_agent(tenant, name=f"{tag}-agent", agent_type=f"{tag}-type")
    idle = factories.make_agent(tenant, name=f"{tag}-idle", status="inactive")
    coalition = factories.make_coalition(tenant, name=f"{tag}-coalition")
    CoalitionMember.objects.create(coalition=coalition, agent=agent, role=f"{tag}-founder")
    token = ApiToken.objects.create(
        tenant=tenant,
        name=f"{tag}-token",
        prefix=secrets.token_hex(4),
        key_hash=secrets.token_hex(32),
    )
    return TenantWorld(tenant, agent, idle, coalition, token)


@pytest.fixture
def world_a(tenant):
    """Tenant A: two agents (one inactive), a coalition with one member, an API token."""
    return _world(tenant, "alpha")


@pytest.fixture
def world_b(other_tenant):
    """Tenant B, shaped like A and in the same H3 cell, which A's operators must never see."""
    return _world(other_tenant, "bravo")


@pytest.fixture
def editor_a(make_operator, world_a):
    """A client logged in as an editor of tenant A."""
    return logged_in(make_operator(world_a.tenant, OPERATOR_EDITOR, "editor-a"))


@pytest.fixture
def reader_a(make_operator, world_a):
    """A client logged in as a read-only operator of tenant A."""
    return logged_in(make_operator(world_a.tenant, OPERATOR_READ_ONLY, "reader-a"))


@pytest.fixture
def superuser_client(db, django_user_model):
    """A client logged in as a superuser."""
    return logged_in(django_user_model.objects.create_superuser("root", "root@example.com", "pw"))


@pytest.fixture(scope="session")
def admin_influxd(tmp_path_factory):
    """A real InfluxDB 1.6.7 on a free loopback port, for the agent page's chart."""
    with InfluxDB(tmp_path_factory.mktemp("admin-influxd")) as server:
        yield server


@pytest.fixture
def influx_metrics(settings, admin_influxd, monkeypatch):
    """Settings pointing at a fresh database in admin_influxd, which charts consider up."""
    database = admin_influxd.configure_v1(settings)
    monkeypatch.setattr(charts, "outage", charts._Outage())
    return database


def record_metrics(agent: Agent, hours: int) -> None:
    """Queue one agent_beliefs point per hour for the last `hours` hours through the
    metrics outbox, then flush it to InfluxDB, as the flush_metrics command would."""
    now = time.time_ns()
    lines = []
    for hour in range(hours):
        moment = now - hour * 3600 * 10**9
        lines.append(
            points.agent_line(
                agent_id=agent.pk,
                tenant_id=agent.tenant_id,
                time_ns=moment,
                free_energy=1.0 + 0.25 * hour,
                stats=(2.0 - 0.1 * hour, 0.125 + 0.01 * hour, 0.001 * hour),
                energy_level=100 - hour,
            )
        )
    outbox_add(lines)
    report = outbox_flush()
    assert report.sent >= hours, report


# Headless Chromium for the browser tests (test_browser.py, test_screenshots.py).
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = Path(settings.BASE_DIR) / "test-artifacts"
# Generous: two cores are shared with other test runs; a passing page takes far less.
TIMEOUT_MS = 30_000


@pytest.fixture
def chromium(monkeypatch):
    """Starts headless Chromium: `with chromium() as browser:`, after the test's data exists.

    Playwright's sync API runs an event loop, and its greenlet sees its own Django
    connection: data made inside the block would go through a connection nothing ever
    returns to the pool. Django's async-safety check is off for this test only."""
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(
            f"{CHROMIUM} is missing: the browser tests need Debian's 'chromium' package "
            "(apt-get install chromium; scripts/test.sh installs it when run as root)."
        )
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    ARTIFACTS.mkdir(exist_ok=True)

    @contextlib.contextmanager
    def launch():
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True
            )
            try:
                yield browser
            finally:
                browser.close()

    return launch
