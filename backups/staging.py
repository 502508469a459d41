"""Staging folders: one private folder under BACKUP_TEMP_DIR per run, and the sweep that
removes those of runs that died."""

import contextlib
import datetime
import os
import shutil
import tempfile
import time
from pathlib import Path

from django.conf import settings

from backups.processes import pid_alive

STAGING_PREFIX = "fa-backup-"
# Staging folders without an owner pid (made before pids were recorded) count as
# leftovers once this old.
STAGING_GRACE = datetime.timedelta(hours=24)


def staging_dir():
    """A private folder for one run, named with its pid so later runs know when it is orphaned."""
    return tempfile.TemporaryDirectory(
        prefix=f"{STAGING_PREFIX}{os.getpid()}-", dir=settings.BACKUP_TEMP_DIR
    )


def _tree_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def stale_staging_dirs() -> list[tuple[Path, int]]:
    """Staging folders of runs that died (their pid is gone), with their size in bytes."""
    root = Path(settings.BACKUP_TEMP_DIR or tempfile.gettempdir())
    stale = []
    cutoff = time.time() - STAGING_GRACE.total_seconds()
    for path in sorted(root.glob(f"{STAGING_PREFIX}*")):
        if not path.is_dir() or path.is_symlink():
            continue
        owner = path.name[len(STAGING_PREFIX) :].split("-", 1)[0]
        orphaned = not pid_alive(int(owner)) if owner.isdigit() else path.stat().st_mtime < cutoff
        if orphaned:
            with contextlib.suppress(OSError):
                stale.append((path, _tree_size(path)))
    return stale


def sweep_staging(progress, *, dry_run: bool = False) -> list[str]:
    """Remove (or, dry_run, list) the staging folders of crashed runs; says what it removed."""
    removed = []
    for path, size in stale_staging_dirs():
        if dry_run:
            progress.note(f"Would remove {path} ({size:,} bytes), left by a crashed run.")
        else:
            shutil.rmtree(path, ignore_errors=True)
            progress.note(f"Removed {path} ({size:,} bytes), left by a crashed run.")
        removed.append(str(path))
    return removed
