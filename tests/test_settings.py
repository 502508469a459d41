"""Production settings refuse to start without the variables that guard data."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.core.exceptions import ImproperlyConfigured

from freeagentics.settings import database_from_url

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


@pytest.mark.parametrize(
    "keys, position",
    [
        ("not-a-key", 1),
        ("j0BikImprDHDLmqRY3Lwqh54e7y_J3kuTUJqAnpvd1M", 1),  # padding missing
        ("j0BikImprDHDLmqRY3Lwqh54e7y/J3kuTUJqAnpvd1M=", 1),  # standard, not url-safe, base64
        ("j0BikImprDHDLmqRY3Lwqh54e7y_J3kuTUJqAnpvd1M=,MTIzNDU2Nzg5MDEyMzQ1Njc4OTAxMg==", 2),
        ("j0BikImprDHDLmqRY3Lwqh54e7y_J3kuTUJqAnpvd1M=,0123456789abcdef0123456789abcdef", 2),
    ],
)
@pytest.mark.reliability("service bad input")
def test_malformed_encryption_key_stops_start_up_naming_its_position(keys, position):
    result = load_settings({**COMPLETE, "FREEAGENTICS_ENCRYPTION_KEYS": keys})
    assert result.returncode != 0
    assert "ImproperlyConfigured" in result.stderr
    total = len(keys.split(","))
    assert f"FREEAGENTICS_ENCRYPTION_KEYS: key {position} of {total} is not a Fernet key" in (
        result.stderr
    )
    for key in keys.split(","):
        assert key not in result.stderr  # the message names the key, never shows it


@pytest.mark.parametrize(
    "name, value",
    [
        ("SECRET_KEY", "dev-only-insecure-secret-key-do-not-use-in-production"),
        ("FREEAGENTICS_ENCRYPTION_KEYS", "ZGV2LW9ubHkta2V5LWRvLW5vdC11c2UtMzItYnl0ZXM="),
        (
            "FREEAGENTICS_ENCRYPTION_KEYS",
            "j0BikImprDHDLmqRY3Lwqh54e7y_J3kuTUJqAnpvd1M=,"
            "ZGV2LW9ubHkta2V5LWRvLW5vdC11c2UtMzItYnl0ZXM=",
        ),
    ],
)
def test_development_secrets_are_refused_when_debug_is_off(name, value):
    result = load_settings({**COMPLETE, name: value})
    assert result.returncode != 0
    assert f"{name}: the development key is refused when DEBUG is off" in result.stderr
    assert load_settings({**COMPLETE, "DEBUG": "1", name: value}).returncode == 0


def test_bad_proxy_header_is_named():
    result = load_settings({**COMPLETE, "SECURE_PROXY_SSL_HEADER": "X-Forwarded-Proto"})
    assert "SECURE_PROXY_SSL_HEADER must be 'HTTP_<HEADER>,<value>'" in result.stderr


# The production environment README.md documents ("Production settings"), with secrets
# of the documented shape.
DOCUMENTED_PRODUCTION = {
    **COMPLETE,
    "SECRET_KEY": "Xq3v9Lr2Tz8Nw4Kp6Bd1Hf7Gm5Jc0Sa-Ye_Ui3Oo9Pl2Mn8Vb4Cx6Zt1Qr7Ws5Ed0",
    "ALLOWED_HOSTS": "agents.example.com",
    "CSRF_TRUSTED_ORIGINS": "https://agents.example.com",
    "SECURE_PROXY_SSL_HEADER": "HTTP_X_FORWARDED_PROTO,https",
    "SECURE_HSTS_PRELOAD": "1",
}
# Variables tests/settings.py sets for the test servers; production leaves them unset.
TEST_ONLY = ("SECURE_SSL_REDIRECT", "SESSION_COOKIE_SECURE", "CSRF_COOKIE_SECURE")


def run_production(*argv: str, env: dict | None = None):
    clean = {
        k: v
        for k, v in os.environ.items()
        if k not in DOCUMENTED_PRODUCTION and k not in TEST_ONLY and k != "DJANGO_SETTINGS_MODULE"
    }
    return subprocess.run(
        [sys.executable, *argv],
        cwd=ROOT,
        env={
            **clean,
            **(env or DOCUMENTED_PRODUCTION),
            "DJANGO_SETTINGS_MODULE": "freeagentics.settings",
        },
        capture_output=True,
        text=True,
    )


def test_check_deploy_is_clean_with_the_documented_production_environment():
    result = run_production("manage.py", "check", "--deploy", "--fail-level", "WARNING")
    assert result.returncode == 0, result.stderr
    assert "System check identified no issues" in result.stdout


def test_check_deploy_warns_without_the_https_settings():
    # The clean result above is the settings' doing: switch them off and Django complains.
    env = {
        **DOCUMENTED_PRODUCTION,
        "SECURE_HSTS_SECONDS": "0",
        "SECURE_SSL_REDIRECT": "0",
        "SESSION_COOKIE_SECURE": "0",
        "CSRF_COOKIE_SECURE": "0",
    }
    result = run_production("manage.py", "check", "--deploy", "--fail-level", "WARNING", env=env)
    assert result.returncode != 0
    for warning in ("security.W004", "security.W008", "security.W012", "security.W016"):
        assert warning in result.stderr


PROXY_PROBE = """
import django
django.setup()
from django.test import Client
client = Client(HTTP_HOST="agents.example.com")
plain = client.get("/admin/login/")
proxied = client.get("/admin/login/", HTTP_X_FORWARDED_PROTO="https")
print(plain.status_code, plain.headers.get("Location"))
print(proxied.status_code, proxied.headers.get("Strict-Transport-Security"))
"""


def test_behind_the_proxy_https_is_recognised_and_plain_http_redirected():
    result = run_production("-c", PROXY_PROBE)
    assert result.returncode == 0, result.stderr
    plain, proxied = result.stdout.splitlines()
    assert plain == "301 https://agents.example.com/admin/login/"
    status, hsts = proxied.split(" ", 1)
    # Not redirected again (no loop behind the proxy), and HSTS is sent.
    assert status != "301"
    assert hsts == "max-age=31536000; includeSubDomains; preload"


# --- DATABASE_URL naming several servers (libpq's host lists, for failover) ---


@pytest.mark.parametrize(
    "netloc, host, port",
    [
        ("h1:5432,h2:5433", "h1,h2", "5432,5433"),
        ("h1,h2:5433", "h1,h2", "5432,5433"),  # in a list, a host without a port gets 5432
        ("[::1]:5432,[fd00::2]:5433", "::1,fd00::2", "5432,5433"),
        (
            "10.0.0.1:5432,10.0.0.2:5432,10.0.0.3:6432",
            "10.0.0.1,10.0.0.2,10.0.0.3",
            "5432,5432,6432",
        ),
        ("h1", "h1", ""),  # one host without a port: libpq's default
        ("h1:6543", "h1", "6543"),
    ],
)
def test_database_url_hosts_and_ports_become_libpq_lists_in_order(netloc, host, port):
    config = database_from_url(f"postgres://u:p@{netloc}/db?target_session_attrs=read-write")

    assert (config["HOST"], config["PORT"]) == (host, port)
    assert (config["NAME"], config["USER"], config["PASSWORD"]) == ("db", "u", "p")
    assert config["OPTIONS"]["target_session_attrs"] == "read-write"


@pytest.mark.parametrize(
    "netloc, port, host",
    [
        ("h1:54x2,h2:5433", "54x2", "h1"),
        ("h1:5432,h2:abc", "abc", "h2"),
        ("h1:-1,h2:5432", "-1", "h1"),
        ("[::1]:x,h2:5432", "x", "::1"),
        ("h1:5432,h2:99999", "99999", "h2"),
        ("h1:0,h2:5432", "0", "h1"),
    ],
)
@pytest.mark.reliability("service bad input")
def test_a_bad_port_in_a_host_list_is_refused_naming_the_variable(netloc, port, host):
    for variable in ("DATABASE_URL", "DATABASE_REPLICA_URLS"):
        with pytest.raises(ImproperlyConfigured) as refused:
            database_from_url(f"postgres://u@{netloc}/db", name=variable)

        assert str(refused.value) == (
            f"{variable}: port {port!r} of host {host!r} is not a port number (1-65535)."
        )


def test_a_multi_host_database_url_configures_the_default_database_at_start_up():
    url = "postgres://u@h1:5432,h2:5433/name?target_session_attrs=read-write"
    result = load_settings({**COMPLETE, "DATABASE_URL": url})

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("h1,h2 5432,5433 name u  {'target_session_attrs': 'read-write'")


def test_a_bad_port_in_the_database_url_stops_start_up_naming_the_variable():
    result = load_settings({**COMPLETE, "DATABASE_URL": "postgres://u@h1:5432,h2:x/name"})

    assert result.returncode != 0
    refusal = "DATABASE_URL: port 'x' of host 'h2' is not a port number (1-65535)."
    assert f"ImproperlyConfigured: {refusal}" in result.stderr
