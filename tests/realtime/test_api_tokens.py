import datetime

import pytest
from django.core.exceptions import ValidationError
from django.utils import timezone

from agents.models import ApiToken
from realtime.selectors import api_tokens_active
from realtime.services import (
    LAST_USED_RESOLUTION,
    NAME_REQUIRED,
    TOKEN_INVALID,
    api_token_authenticate,
    api_token_create,
    api_token_revoke,
    hash_token,
)

pytestmark = pytest.mark.django_db


def test_create_returns_the_plaintext_once_and_stores_only_its_hash(tenant):
    token, raw = api_token_create(tenant=tenant, name="dashboard", can_read_beliefs=True)
    stored = ApiToken.objects.get(pk=token.pk)
    assert stored.key_hash == hash_token(raw)
    assert raw not in {stored.key_hash, stored.prefix, stored.name}
    assert raw.startswith(stored.prefix)
    assert stored.can_read_beliefs is True
    assert stored.tenant == tenant


def test_tokens_are_unique(tenant):
    _, first = api_token_create(tenant=tenant, name="a")
    _, second = api_token_create(tenant=tenant, name="a")
    assert first != second


@pytest.mark.parametrize("name", ["", "   ", "x" * 101, None])
def test_create_refuses_a_bad_name(tenant, name):
    with pytest.raises(ValidationError) as e:
        api_token_create(tenant=tenant, name=name)
    assert e.value.message_dict == {"name": [NAME_REQUIRED]}


def test_authenticate_returns_the_token_with_its_tenant(tenant):
    token, raw = api_token_create(tenant=tenant, name="sim")
    found = api_token_authenticate(raw)
    assert found.pk == token.pk
    assert found.tenant == tenant


@pytest.mark.parametrize("raw", ["", "fa_unknown", "not-our-format", "fa_" + "x" * 200, None])
def test_authenticate_refuses_unknown_or_malformed_tokens(tenant, raw):
    api_token_create(tenant=tenant, name="sim")
    with pytest.raises(ValidationError) as e:
        api_token_authenticate(raw)
    assert e.value.message_dict == {"token": [TOKEN_INVALID]}


def test_revoked_token_no_longer_authenticates(tenant):
    token, raw = api_token_create(tenant=tenant, name="sim")
    api_token_revoke(token=token)
    with pytest.raises(ValidationError) as e:
        api_token_authenticate(raw)
    assert e.value.message_dict == {"token": [TOKEN_INVALID]}
    assert api_tokens_active([token.pk]) == set()


def test_revoking_twice_keeps_the_first_revocation_time(tenant):
    token, _ = api_token_create(tenant=tenant, name="sim")
    first = api_token_revoke(token=token).revoked_at
    again = api_token_revoke(token=ApiToken.objects.get(pk=token.pk)).revoked_at
    assert first is not None
    assert again == first


def test_last_used_is_recorded_at_most_once_per_resolution(tenant):
    token, raw = api_token_create(tenant=tenant, name="sim")
    api_token_authenticate(raw)
    first = ApiToken.objects.get(pk=token.pk).last_used_at
    api_token_authenticate(raw)
    assert ApiToken.objects.get(pk=token.pk).last_used_at == first
    stale = timezone.now() - LAST_USED_RESOLUTION - datetime.timedelta(seconds=1)
    ApiToken.objects.filter(pk=token.pk).update(last_used_at=stale)
    api_token_authenticate(raw)
    assert ApiToken.objects.get(pk=token.pk).last_used_at > stale


def test_active_lists_only_unrevoked_existing_tokens(tenant):
    kept, _ = api_token_create(tenant=tenant, name="kept")
    revoked, _ = api_token_create(tenant=tenant, name="revoked")
    deleted, _ = api_token_create(tenant=tenant, name="deleted")
    api_token_revoke(token=revoked)
    deleted_id = deleted.pk
    deleted.delete()
    assert api_tokens_active([kept.pk, revoked.pk, deleted_id]) == {kept.pk}
