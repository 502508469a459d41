"""An unusable BACKUP_DIR: one line naming it, never a traceback, and no dump started.

Tests may run as root, for whom a directory without write permission is still writable,
so the unusable directories here are a regular file and a path under a regular file.
"""

import subprocess
import sys
from io import StringIO
from pathlib import Path

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from tests.backups.conftest import manage_env

pytestmark = pytest.mark.django_db(transaction=True)
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(params=["a regular file", "a path under a regular file"])
def unusable_dir(request, tmp_path, settings) -> Path:
    """STORAGES["backups"] (as BACKUP_DIR sets it) on a location that cannot be a directory."""
    regular = tmp_path / "not-a-directory"
    regular.write_text("an operator's typo\n")
    location = regular if request.param == "a regular file" else regular / "backups"
    settings.STORAGES = {
        **settings.STORAGES,
        "backups": {
            "BACKEND": "django.core.files.storage.FileSystemStorage",
            "OPTIONS": {"location": location},
        },
    }
    settings.BACKUP_TEMP_DIR = str(tmp_path)
    return location


def run(*args) -> tuple[str, str]:
    out, err = StringIO(), StringIO()
    call_command(*args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


@pytest.mark.reliability("backup faults")
@pytest.mark.parametrize("args", [["backup"], ["backup", "--no-redis", "--dry-run"]])
def test_backup_refuses_an_unusable_backup_dir_before_dumping(unusable_dir, no_rdb, args):
    out = StringIO()
    with pytest.raises(CommandError) as excinfo:
        call_command(*args, stdout=out, stderr=out)

    message = str(excinfo.value)
    assert "\n" not in message
    assert str(unusable_dir) in message and "BACKUP_DIR" in message
    assert "is not a directory" in message
    assert "pg_dump" not in out.getvalue() and "Would" not in out.getvalue()
    assert unusable_dir.parent.is_file() or unusable_dir.is_file()  # nothing was created


@pytest.mark.reliability("backup faults")
@pytest.mark.parametrize("args", [["listbackups"], ["listbackups", "--archives"]])
def test_listbackups_on_an_unusable_backup_dir_is_one_line(unusable_dir, args):
    with pytest.raises(CommandError) as excinfo:
        run(*args)

    message = str(excinfo.value)
    assert "\n" not in message
    assert "Not a directory" in message and "BACKUP_DIR" in message


@pytest.mark.reliability("backup faults")
@pytest.mark.parametrize("command", ["backup", "listbackups"])
def test_manage_py_on_an_unusable_backup_dir_prints_no_traceback(
    tmp_path, unusable_dir, backup_key, command
):
    env = manage_env(tmp_path, BACKUP_DIR=unusable_dir)

    proc = subprocess.run(
        [sys.executable, str(ROOT / "manage.py"), command],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("CommandError: "), proc.stderr
    assert str(unusable_dir) in lines[0] and "BACKUP_DIR" in lines[0]
    assert "pg_dump" not in proc.stdout
