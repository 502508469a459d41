"""A master key that opens no data key is a start-up error, not a 500 on a belief page."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from cryptography.fernet import Fernet
from django.conf import settings

from tests import factories
from tests.backups.conftest import database_url_env

pytestmark = pytest.mark.django_db(transaction=True)
ROOT = Path(__file__).resolve().parents[2]


def run(keys: str, *argv: str):
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        **database_url_env(),
        "FREEAGENTICS_ENCRYPTION_KEYS": keys,
    }
    return subprocess.run(
        [sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )


@pytest.fixture
def stored_key(tenant):
    """A data key in the database, wrapped by the tests' master key."""
    factories.make_agent(tenant, belief_state=np.ones(3))


def test_check_reports_data_keys_no_master_key_opens(stored_key):
    wrong = Fernet.generate_key().decode()
    result = run(wrong, "manage.py", "check", "--database", "default")
    assert result.returncode != 0
    assert "agents.E001" in result.stderr
    assert "FREEAGENTICS_ENCRYPTION_KEYS opens 0 of 1 data keys" in result.stderr
    assert wrong not in result.stderr + result.stdout

    right = ",".join(settings.FREEAGENTICS_ENCRYPTION_KEYS)
    assert run(right, "manage.py", "check", "--database", "default").returncode == 0
    # A new master key first, the old one after it: still every key opens.
    assert run(f"{wrong},{right}", "manage.py", "check", "--database", "default").returncode == 0


def test_the_asgi_server_refuses_to_start_with_the_wrong_master_key(stored_key):
    wrong = Fernet.generate_key().decode()
    result = run(wrong, "-c", "import freeagentics.asgi")
    assert result.returncode != 0
    assert "ImproperlyConfigured" in result.stderr
    assert "opens 0 of 1 data keys" in result.stderr
    assert (
        run(
            ",".join(settings.FREEAGENTICS_ENCRYPTION_KEYS), "-c", "import freeagentics.asgi"
        ).returncode
        == 0
    )
