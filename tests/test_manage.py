"""manage.py as a newcomer meets it: before any environment variable is set."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def manage(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        # Nothing inherited: no DEBUG, SECRET_KEY, DATABASE_URL or DJANGO_SETTINGS_MODULE.
        env={"PATH": os.environ["PATH"], **env},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_manage_without_environment_says_in_one_line_what_to_set():
    result = manage("check")

    assert result.returncode == 1
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("manage.py: SECRET_KEY must be set when DEBUG is off. ")
    assert ".env.example" in lines[0]
    assert "bash scripts/run.sh" in lines[0]


def test_manage_reports_a_bad_variable_in_one_line_too():
    result = manage("migrate", DEBUG="maybe")

    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("manage.py: DEBUG must be a boolean (true/false), got 'maybe'. ")


def test_manage_keeps_the_traceback_for_errors_that_are_not_configuration():
    result = manage("check", DJANGO_SETTINGS_MODULE="no_such_settings_module")

    assert result.returncode == 1
    assert "Traceback" in result.stderr
    assert "ModuleNotFoundError: No module named 'no_such_settings_module'" in result.stderr
