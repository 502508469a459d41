"""The README's Reliability table, counted from the test suite itself.

A test joins a row with ``@pytest.mark.reliability("<category>")``; each collected case
(every parametrisation) counts once. A full run of the test command writes the counts and
outcomes to docs/README-reliability.md, which scripts/build_readme.py puts into README.md,
so the table can only say what the suite actually tried.
"""

import runpy
from collections import Counter
from pathlib import Path

import pytest

CATEGORIES = {
    "backup faults": "crashes, kills, forged or damaged files while backing up",
    "restore faults": "damaged, forged or foreign backups; kills during restore and drills",
    "maintenance under load": "partition maintenance with concurrent writers and odd rows",
    "metrics outages": "InfluxDB down, slow or refusing points; the outbox cap",
    "websocket bad input": "hostile frames, origins, ids and mass disconnects",
    "websocket resume": "servers killed mid-stream, lost history, dropped batches, resync",
    "service bad input": "invalid values through the services, the admin and settings",
    "tenant walls": "one tenant reaching another's rows, sockets or existence",
}
ROOT = Path(__file__).resolve().parent.parent
REPORT = ROOT / "docs" / "README-reliability.md"


def category_of(item) -> str | None:
    marker = item.get_closest_marker("reliability")
    return marker.args[0] if marker else None


class ReliabilityReport:
    """A pytest plugin: checks categories at collection and tallies outcomes per category."""

    def __init__(self):
        self.tried: Counter = Counter()
        self.failed: Counter = Counter()
        self.categories: dict[str, str] = {}

    def pytest_collection_modifyitems(self, items):
        for item in items:
            category = category_of(item)
            if category is None:
                continue
            if category not in CATEGORIES:
                raise pytest.UsageError(
                    f"{item.nodeid}: reliability category {category!r} is not one of "
                    f"{sorted(CATEGORIES)} (tests/reliability.py)"
                )
            self.categories[item.nodeid] = category

    def pytest_runtest_logreport(self, report):
        category = self.categories.get(report.nodeid)
        if category is None:
            return
        if report.when == "call" or (report.when == "setup" and not report.passed):
            self.tried[category] += 1
            if report.failed or report.skipped:
                self.failed[category] += 1

    def table(self) -> str:
        lines = [
            "| category | what the cases do | cases tried | cases failed |",
            "|---|---|---:|---:|",
        ]
        for category, meaning in CATEGORIES.items():
            lines.append(
                f"| {category} | {meaning} | {self.tried[category]} | {self.failed[category]} |"
            )
        total_tried, total_failed = sum(self.tried.values()), sum(self.failed.values())
        lines.append(f"| **all** | | **{total_tried}** | **{total_failed}** |")
        return "\n".join(lines)

    def write(self, path: Path = REPORT) -> None:
        path.write_text(
            "## Reliability\n\n"
            "Adversarial cases the test suite tries, by category, as counted by the last full\n"
            "run of the test command (`tests/reliability.py` writes this table; a skipped case\n"
            "counts as failed). Each case is a test marked\n"
            '`@pytest.mark.reliability("<category>")`; `pytest -m reliability` runs them all.\n\n'
            + self.table()
            + "\n"
        )
        runpy.run_path(str(ROOT / "scripts" / "build_readme.py"), run_name="__main__")
