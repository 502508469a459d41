import pytest
from django.contrib.admin.models import LogEntry

from agents.models import ApiToken
from realtime.services import api_token_authenticate

pytestmark = pytest.mark.django_db

URL = "/admin/agents/apitoken/"


def test_a_new_token_is_made_by_the_service_and_shown_once(editor_a, world_a):
    response = editor_a.post(f"{URL}add/", {"name": "ingest", "can_read_beliefs": "on"})
    assert response.status_code == 200
    assert "no-store" in response["Cache-Control"]
    plaintext = response.context["plaintext"]
    assert '<code id="api-token-plaintext"' in response.content.decode()
    assert plaintext in response.content.decode()

    # The plaintext authenticates (so only its hash was stored), for tenant A.
    token = api_token_authenticate(plaintext)
    assert (token.name, token.tenant, token.can_read_beliefs) == ("ingest", world_a.tenant, True)
    assert token.created_by.username == "editor-a"
    assert plaintext not in str(ApiToken.objects.filter(pk=token.pk).values().get())

    # Nothing shows it again: not the token's page, the list, the history or a message.
    for url in (f"{URL}{token.pk}/change/", URL, f"{URL}{token.pk}/history/", "/admin/"):
        assert plaintext not in editor_a.get(url).content.decode()
    assert not any(plaintext in entry.change_message for entry in LogEntry.objects.all())


def test_a_refused_name_is_a_form_error(editor_a, world_a):
    response = editor_a.post(f"{URL}add/", {"name": "   "})
    assert response.status_code == 200
    assert "plaintext" not in response.context
    assert response.context["adminform"].form.errors
    assert not ApiToken.objects.filter(tenant=world_a.tenant).exclude(pk=world_a.token.pk).exists()


def test_revoking_is_an_action_and_tokens_are_never_edited_or_deleted(editor_a, world_a):
    token = world_a.token
    page = editor_a.get(f"{URL}{token.pk}/change/").content.decode()
    assert 'name="name"' not in page
    assert editor_a.get(f"{URL}{token.pk}/delete/").status_code == 403
    response = editor_a.post(
        URL, {"action": "revoke_tokens", "_selected_action": [str(token.pk)]}, follow=True
    )
    assert [str(m) for m in response.context["messages"]] == ["1 token(s) revoked."]
    token.refresh_from_db()
    assert token.revoked_at is not None
    assert not token.is_active
