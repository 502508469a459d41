"""Production settings refuse to start without the variables that guard data."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
COMPLETE = {
    "DEBUG": "0",
    "SECRET_KEY": "s",
    "DATABASE_URL": "postgres://u:p%40ss@db.example:6543/name",
    "REDIS_URL": "redis://cache.example:6379/0",
    "FREEAGENTICS_ENCRYPTION_KEYS": "j0BikImprDHDLmqRY3Lwqh54e7y_J3kuTUJqAnpvd1M=",
}


def load_settings(env):
    clean = {k: v for k, v in os.environ.items() if k not in COMPLETE}
    return subprocess.run(
        [
            sys.executable,
            "-c",
            "import freeagentics.settings as s; d = s.DATABASES['default']; "
            "print(d['HOST'], d['PORT'], d['NAME'], d['USER'], d['PASSWORD'], d['OPTIONS'])",
        ],
        cwd=ROOT,
        env={**clean, **env},
        capture_output=True,
        text=True,
    )


@pytest.mark.parametrize(
    "missing", ["SECRET_KEY", "DATABASE_URL", "FREEAGENTICS_ENCRYPTION_KEYS", "REDIS_URL"]
)
def test_missing_variable_is_named_when_debug_is_off(missing):
    env = {k: v for k, v in COMPLETE.items() if k != missing}
    result = load_settings(env)
    assert result.returncode != 0
    assert "ImproperlyConfigured" in result.stderr
    assert f"{missing} must be set when DEBUG is off" in result.stderr


def test_complete_production_environment_loads_with_a_connection_pool():
    result = load_settings(COMPLETE)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("db.example 6543 name u p@ss {'pool': {")


def test_debug_falls_back_to_local_development_defaults():
    result = load_settings({"DEBUG": "1"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("127.0.0.1 5432 freeagentics postgres")


def test_non_postgres_database_url_is_refused():
    result = load_settings({**COMPLETE, "DATABASE_URL": "sqlite:///db.sqlite3"})
    assert "DATABASE_URL must be a postgres:// URL" in result.stderr


def test_bad_boolean_is_named():
    result = load_settings({**COMPLETE, "DEBUG": "maybe"})
    assert "DEBUG must be a boolean" in result.stderr
