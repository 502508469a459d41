"""Reads: the backups in storage. No side effects."""

import datetime
import re
from dataclasses import dataclass

from django.utils import timezone

from backups import storage
from backups.crypto import backup_keys, key_for
from backups.exceptions import (
    MANIFEST_FORGED,
    MANIFEST_UNSIGNED,
    BackupIntegrityError,
    BackupNotFound,
    UnsignedBackupError,
)
from backups.manifest import KIND_FULL, Manifest, drill_passed


@dataclass
class BackupSummary:
    name: str
    status: str  # complete | incomplete | unreadable | damaged | unsigned | forged
    created_at: datetime.datetime | None
    size: int | None = None
    encrypted: bool = False
    parts: tuple[str, ...] = ()
    manifest: Manifest | None = None
    error: str = ""


def authenticate(manifest: Manifest, *, allow_unsigned: bool = False) -> None:
    """Check that the backup key vouches for this manifest.

    With BACKUP_ENCRYPTION_KEY set, a manifest must carry a valid signature by one of its
    keys: an unsigned one raises UnsignedBackupError unless allow_unsigned, a wrong or
    unknown signature always raises BackupIntegrityError. Without a key there is nothing
    to check against (an encrypted backup then fails on its key id).
    """
    if manifest.encryption:
        key = key_for(manifest.encryption["key_id"])
        if not manifest.check_signature(key):
            raise BackupIntegrityError(MANIFEST_FORGED.format(name=manifest.name))
    elif manifest.signature is not None or (backup_keys() and not allow_unsigned):
        if manifest.signature is not None:
            raise BackupIntegrityError(MANIFEST_FORGED.format(name=manifest.name))
        raise UnsignedBackupError(MANIFEST_UNSIGNED.format(name=manifest.name))


def damage(manifest: Manifest) -> list[str]:
    """What is wrong with the stored files of a backup: missing ones, wrong sizes.

    Sizes only (one stat or HEAD per file); checksums are for restore and verify_backup.
    """
    problems = []
    present = set(storage.stored_files(manifest.name))
    for entry in manifest.files:
        if entry.name not in present:
            problems.append(f"{entry.name} is missing")
            continue
        size = storage.size(manifest.name, entry.name)
        if size != entry.size:
            problems.append(f"{entry.name} has {size} bytes, the manifest says {entry.size}")
    return problems


def _status(manifest: Manifest) -> tuple[str, str]:
    try:
        authenticate(manifest)
    except UnsignedBackupError as e:
        return "unsigned", str(e)
    except BackupIntegrityError as e:
        return "forged", str(e)
    problems = damage(manifest)
    if problems:
        return "damaged", f"{manifest.name}: " + "; ".join(problems)
    return "complete", ""


def backup_list(*, archives: bool = False) -> list[BackupSummary]:
    """Every backup (or partition archive) in storage, newest first.

    "complete" is a backup whose manifest is authentic (when a backup key is set) and
    whose every file is present with its recorded size. Otherwise: "incomplete" (no
    manifest: its writer died or is still running), "unreadable" (the manifest does not
    parse), "damaged" (a file is missing or of the wrong size), "unsigned" (a key is set
    and the manifest is not signed), "forged" (the signature does not match).
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
        status, error = _status(manifest)
        summaries.append(
            BackupSummary(
                name=name,
                status=status,
                created_at=manifest.created_at,
                size=manifest.size,
                encrypted=bool(manifest.encryption),
                parts=tuple(f.role for f in manifest.files),
                manifest=manifest,
                error=error,
            )
        )
    oldest = datetime.datetime.min.replace(tzinfo=datetime.UTC)
    summaries.sort(key=lambda s: (s.created_at or oldest, s.name), reverse=True)
    return summaries


def backup_get(name: str, *, allow_unsigned: bool = False) -> Manifest:
    """The authenticated manifest of a backup (see authenticate()).

    Name "latest" picks the newest complete full backup, skipping damaged, forged and
    (unless allow_unsigned) unsigned ones. Raises BackupNotFound, BackupIntegrityError
    (UnsignedBackupError for an unsigned one), or ImproperlyConfigured for a bad
    BACKUP_ENCRYPTION_KEY.
    """
    if name == "latest":
        usable = {"complete", "unsigned"} if allow_unsigned else {"complete"}
        complete = [s for s in backup_list() if s.status in usable and s.manifest.kind == KIND_FULL]
        if not complete:
            raise BackupNotFound("There is no complete backup in the backup storage.")
        manifest = complete[0].manifest
    else:
        manifest = storage.read_manifest(name)
    authenticate(manifest, allow_unsigned=allow_unsigned)
    return manifest


def drilled(manifest: Manifest) -> bool:
    """Whether the backup passed verify_backup (an authentic drill record of this manifest)."""
    return drill_passed(manifest, storage.read_small(manifest.name, storage.DRILL_RECORD), key_for)


@dataclass
class PrunePlan:
    delete: list[BackupSummary]
    keep: list[BackupSummary]
    drilled: str | None = None  # the newest backup that passed its drill, always kept


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
    `max_age` (both limits apply); the newest complete backup, the newest one that passed
    verify_backup, and `protect` never go.
    Incomplete ones go once older than INCOMPLETE_GRACE; unreadable, damaged, unsigned
    and forged ones are never touched (an operator must look at them). Partition archives
    are not backups and are never pruned. pending_new plans for a backup about to be made
    (the dry run of `backup --keep`): it will be the newest, so every existing one counts
    one place later.
    """
    now = now or timezone.now()
    summaries = backup_list()
    complete = [s for s in summaries if s.status == "complete"]
    good = next((s.name for s in complete if drilled(s.manifest)), None)
    delete, kept = [], []
    offset = 1 if pending_new else 0
    for index, summary in enumerate(complete, offset):
        too_many = keep is not None and index >= keep
        too_old = max_age is not None and summary.created_at < now - max_age
        if index == 0 or summary.name in (protect, good) or not (too_many or too_old):
            kept.append(summary)
        else:
            delete.append(summary)
    for summary in summaries:
        if summary.status == "incomplete" and summary.name != protect:
            if summary.created_at and summary.created_at < now - INCOMPLETE_GRACE:
                delete.append(summary)
        elif summary.status != "complete":
            kept.append(summary)
    return PrunePlan(delete=delete, keep=kept, drilled=good)


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
