"""Reads: the backups in storage. No side effects."""

import datetime
import re
from dataclasses import dataclass

from django.utils import timezone

from backups import storage
from backups.crypto import key_for
from backups.exceptions import BackupIntegrityError, BackupNotFound
from backups.manifest import KIND_FULL, Manifest


@dataclass
class BackupSummary:
    name: str
    status: str  # complete | incomplete | unreadable
    created_at: datetime.datetime | None
    size: int | None = None
    encrypted: bool = False
    parts: tuple[str, ...] = ()
    manifest: Manifest | None = None
    error: str = ""


def backup_list(*, archives: bool = False) -> list[BackupSummary]:
    """Every backup (or partition archive) in storage, newest first.

    A backup without a manifest is "incomplete" (its writer died or is still running); one
    whose manifest does not parse is "unreadable".
    """
    summaries = []
    for name in storage.list_names(archives=archives):
        try:
            manifest = storage.read_manifest(name)
        except BackupNotFound:
            continue
        except BackupIntegrityError as e:
            incomplete = "no manifest" in str(e)
            summaries.append(
                BackupSummary(
                    name=name,
                    status="incomplete" if incomplete else "unreadable",
                    created_at=storage.stamp_of(name),
                    error=str(e),
                )
            )
            continue
        parts = tuple(f.role for f in manifest.files)
        summaries.append(
            BackupSummary(
                name=name,
                status="complete",
                created_at=manifest.created_at,
                size=manifest.size,
                encrypted=bool(manifest.encryption),
                parts=parts,
                manifest=manifest,
            )
        )
    oldest = datetime.datetime.min.replace(tzinfo=datetime.UTC)
    summaries.sort(key=lambda s: (s.created_at or oldest, s.name), reverse=True)
    return summaries


def backup_get(name: str) -> Manifest:
    """The verified manifest of a backup; name "latest" picks the newest complete full backup.

    Checks the manifest's signature when the backup is encrypted. Raises BackupNotFound,
    BackupIntegrityError, or ImproperlyConfigured for a bad BACKUP_ENCRYPTION_KEY.
    """
    if name == "latest":
        complete = [
            s for s in backup_list() if s.status == "complete" and s.manifest.kind == KIND_FULL
        ]
        if not complete:
            raise BackupNotFound("There is no complete backup in the backup storage.")
        manifest = complete[0].manifest
    else:
        manifest = storage.read_manifest(name)
    if manifest.encryption:
        manifest.check_signature(key_for(manifest.encryption["key_id"]))
    return manifest


@dataclass
class PrunePlan:
    delete: list[BackupSummary]
    keep: list[BackupSummary]


# Incomplete backups younger than this may still be being written.
INCOMPLETE_GRACE = datetime.timedelta(hours=24)


def prune_plan(
    *,
    keep: int | None,
    max_age: datetime.timedelta | None,
    now: datetime.datetime | None = None,
    protect: str | None = None,
    pending_new: bool = False,
) -> PrunePlan:
    """Which backups retention deletes.

    Complete full backups go when they are beyond the `keep` newest, or older than
    `max_age` (both limits apply); the newest complete backup and `protect` never go.
    Incomplete ones go once older than INCOMPLETE_GRACE; unreadable ones are never
    touched (an operator must look at them). Partition archives are not backups and are
    never pruned. pending_new plans for a backup about to be made (the dry run of
    `backup --keep`): it will be the newest, so every existing one counts one place later.
    """
    now = now or timezone.now()
    summaries = backup_list()
    complete = [s for s in summaries if s.status == "complete"]
    delete, kept = [], []
    offset = 1 if pending_new else 0
    for index, summary in enumerate(complete, offset):
        too_many = keep is not None and index >= keep
        too_old = max_age is not None and summary.created_at < now - max_age
        if index == 0 or summary.name == protect or not (too_many or too_old):
            kept.append(summary)
        else:
            delete.append(summary)
    for summary in summaries:
        if summary.status == "incomplete" and summary.name != protect:
            if summary.created_at and summary.created_at < now - INCOMPLETE_GRACE:
                delete.append(summary)
        elif summary.status == "unreadable":
            kept.append(summary)
    return PrunePlan(delete=delete, keep=kept)


_AGE_RE = re.compile(r"^\s*(\d+)\s*([hdw]?)\s*$")


def parse_age(value: str) -> datetime.timedelta | None:
    """'30' or '30d' days, '12h' hours, '8w' weeks; None when it is not an age."""
    match = _AGE_RE.match(value or "")
    if not match:
        return None
    amount, unit = int(match.group(1)), match.group(2) or "d"
    return {"h": datetime.timedelta(hours=amount), "d": datetime.timedelta(days=amount)}.get(
        unit, datetime.timedelta(weeks=amount)
    )
