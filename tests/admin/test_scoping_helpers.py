import pytest
from django.core.exceptions import ImproperlyConfigured

from agents.admin_scoping import tenant_path_for
from agents.models import Agent, ApiToken, OperatorMembership, Tenant
from coalitions.models import Coalition, CoalitionMember


def test_tenant_owned_models_scope_through_their_tenant_key():
    assert tenant_path_for(Tenant) == "pk"
    for model in (Agent, Coalition, ApiToken, OperatorMembership):
        assert tenant_path_for(model) == "tenant"


def test_a_model_without_a_tenant_key_is_refused_loudly():
    # Scoping such a relation needs an explicit path; guessing could leak rows.
    with pytest.raises(ImproperlyConfigured, match=r"coalitions\.CoalitionMember has no"):
        tenant_path_for(CoalitionMember)
