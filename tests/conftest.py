import pytest
from django.core.cache import cache

from tests import factories


@pytest.fixture(autouse=True)
def _clean_cache():
    """Every test starts with an empty Redis test database."""
    cache.clear()
    yield


@pytest.fixture
def tenant(db):
    """A tenant to own the test's agents and coalitions."""
    return factories.make_tenant()


@pytest.fixture
def other_tenant(db):
    """A second tenant, whose rows the first must never see."""
    return factories.make_tenant(name="Other")
