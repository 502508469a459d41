"""Backup files in STORAGES["backups"]: layout, streaming upload and download.

    <name>/manifest.json, <name>/postgres.dump[.enc], <name>/redis.rdb.gz[.enc] ...
    archives/<archive name>/manifest.json, archives/<archive name>/partition.dump[.enc]

The only module that knows storage backends apart: the local filesystem is used in
place (no copies), S3 is read with boto3's ranged download straight to a staging file,
any other backend through Storage.open(). Nothing here holds a whole file in memory.
"""

import contextlib
import datetime
import hashlib
import os
import re
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

from django.core.exceptions import ValidationError
from django.core.files import File
from django.core.files.base import ContentFile
from django.core.files.storage import FileSystemStorage, storages

from backups.exceptions import BACKUP_NAME_INVALID, BackupIntegrityError, BackupNotFound
from backups.manifest import Manifest
from freeagentics.progress import NULL_PROGRESS, Progress

MANIFEST = "manifest.json"
DRILL_RECORD = "drill.json"
ARCHIVES_DIR = "archives"
# Tenants' wrapped data keys (backups.keystore), beside the backups, not one of them.
KEYS_DIR = "keys"
ARCHIVE_PREFIX = "archive-"
COPY_CHUNK = 1024 * 1024
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_STAMP_RE = re.compile(r"-(\d{8}T\d{6}Z)-")


def backup_storage():
    """STORAGES["backups"]; looked up on every call so override_settings applies."""
    return storages["backups"]


def validate_name(name: str) -> str:
    if not NAME_RE.match(name or "") or name in (ARCHIVES_DIR, KEYS_DIR):
        raise ValidationError(BACKUP_NAME_INVALID.format(name=name))
    return name


def is_archive(name: str) -> bool:
    return name.startswith(ARCHIVE_PREFIX)


def prefix(name: str) -> str:
    return f"{ARCHIVES_DIR}/{name}" if is_archive(name) else name


def object_name(name: str, file_name: str) -> str:
    return f"{prefix(name)}/{file_name}"


def new_backup_name(prefix: str, now: datetime.datetime) -> str:
    """<prefix>-<UTC time>-<random hex>: stamp_of() reads the time back."""
    return f"{prefix}-{now:%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


def stamp_of(name: str) -> datetime.datetime | None:
    """The creation time encoded in a generated name, for backups whose manifest is missing."""
    match = _STAMP_RE.search(name)
    if not match:
        return None
    return datetime.datetime.strptime(match.group(1), "%Y%m%dT%H%M%SZ").replace(tzinfo=datetime.UTC)


def local_path(object_name_: str) -> Path | None:
    """The file's path when the storage is the local filesystem, else None."""
    storage = backup_storage()
    if isinstance(storage, FileSystemStorage):
        return Path(storage.path(object_name_))
    return None


def list_names(*, archives: bool = False) -> list[str]:
    """Names of the backups (or partition archives) present, complete or not."""
    storage = backup_storage()
    try:
        dirs, _files = storage.listdir(ARCHIVES_DIR if archives else "")
    except FileNotFoundError:
        return []
    if archives:
        return sorted(d for d in dirs if is_archive(d) and NAME_RE.match(d))
    return sorted(d for d in dirs if d not in (ARCHIVES_DIR, KEYS_DIR) and NAME_RE.match(d))


def exists(name: str) -> bool:
    storage = backup_storage()
    try:
        dirs, files = storage.listdir(prefix(name))
    except FileNotFoundError:
        return False
    return bool(dirs or files)


def read_manifest(name: str) -> Manifest:
    """Load and validate a backup's manifest.

    Raises BackupNotFound when nothing of that name exists, BackupIntegrityError when it
    exists without a readable manifest.
    """
    validate_name(name)
    storage = backup_storage()
    manifest_name = object_name(name, MANIFEST)
    if not storage.exists(manifest_name):
        if exists(name):
            raise BackupIntegrityError(
                f"{name} has no manifest: the backup was interrupted and is incomplete."
            )
        raise BackupNotFound(f"No backup named {name!r} in the backup storage.")
    with storage.open(manifest_name, "rb") as fh:
        raw = fh.read(4 * 1024 * 1024)
    return Manifest.from_json(raw, name=name)


def save_manifest(name: str, manifest: Manifest, key, staging: Path) -> str:
    """Sign (when encrypting) and store a backup's manifest; returns its object name.
    Written last, so a backup without a manifest is recognisably incomplete."""
    if key is not None:
        manifest.sign(key)
    object_name_ = object_name(name, MANIFEST)
    save_bytes(object_name_, manifest.to_json(), staging)
    return object_name_


class _StagedFile(File):
    # FileSystemStorage moves a file offering temporary_file_path() instead of copying it.
    def temporary_file_path(self):
        return self.file.name


def save(object_name_: str, path: Path) -> None:
    """Store a local file under exactly this name; refuses to overwrite."""
    storage = backup_storage()
    if storage.exists(object_name_):
        raise BackupIntegrityError(f"{object_name_} already exists in the backup storage.")
    with open(path, "rb") as fh:
        stored = storage.save(object_name_, _StagedFile(fh, name=object_name_))
    if stored != object_name_:
        storage.delete(stored)
        raise BackupIntegrityError(f"The storage renamed {object_name_} to {stored}.")


def save_bytes(object_name_: str, data: bytes, staging: Path) -> None:
    path = staging / (Path(object_name_).name + ".upload")
    path.write_bytes(data)
    save(object_name_, path)


def replace_small(name: str, file_name: str, data: bytes) -> None:
    """Store a small file beside a backup's, replacing an older one (the drill record)."""
    storage = backup_storage()
    object_name_ = object_name(name, file_name)
    if storage.exists(object_name_):
        storage.delete(object_name_)
    storage.save(object_name_, ContentFile(data))


def read_small(name: str, file_name: str, limit: int = 1024 * 1024) -> bytes | None:
    storage = backup_storage()
    object_name_ = object_name(name, file_name)
    if not storage.exists(object_name_):
        return None
    with storage.open(object_name_, "rb") as fh:
        return fh.read(limit)


def delete_backup(name: str) -> None:
    """Delete every file of a backup (manifest first, so a half-deleted one reads incomplete)."""
    storage = backup_storage()
    base = prefix(name)
    try:
        _dirs, files = storage.listdir(base)
    except FileNotFoundError:
        return
    for file_name in sorted(files, key=lambda f: f != MANIFEST):
        storage.delete(f"{base}/{file_name}")
    if isinstance(storage, FileSystemStorage):
        # Not empty means someone else's file is in it: leave the directory.
        with contextlib.suppress(OSError):
            os.rmdir(storage.path(base))


def stored_files(name: str) -> list[str]:
    try:
        return backup_storage().listdir(prefix(name))[1]
    except FileNotFoundError:
        return []


def size(name: str, file_name: str) -> int | None:
    """The stored size of one file of a backup (None when it cannot be read)."""
    try:
        return backup_storage().size(object_name(name, file_name))
    except (OSError, ValueError):
        return None


def hash_file(path: Path, task=None) -> tuple[int, str]:
    """(size, sha256 hex) of a local file, read in chunks."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(COPY_CHUNK):
            digest.update(chunk)
            size += len(chunk)
            if task is not None:
                task.update(size)
    return size, digest.hexdigest()


@dataclass
class LocalCopy:
    """A verified backup file on local disk; temporary copies live in the staging dir."""

    path: Path
    temporary: bool


def fetch_verified(
    manifest: Manifest,
    file_name: str,
    staging: Path,
    progress: Progress = NULL_PROGRESS,
) -> LocalCopy:
    """Bring one file of a backup to local disk and check its size and sha256.

    Local storage is checked in place. Raises BackupIntegrityError when the file is
    missing, truncated, longer than recorded or corrupt.
    """
    entry = next((f for f in manifest.files if f.name == file_name), None)
    if entry is None:
        raise BackupIntegrityError(f"{manifest.name}: the manifest lists no {file_name}.")
    storage = backup_storage()
    name = object_name(manifest.name, file_name)
    if not storage.exists(name):
        raise BackupIntegrityError(f"{manifest.name}: {file_name} is missing.")
    path = local_path(name)
    copy = LocalCopy(path, temporary=False) if path else LocalCopy(staging / file_name, True)
    if copy.temporary:
        with progress.task(f"download {file_name}", entry.size):
            _download(storage, name, copy.path)
    with progress.task(f"checksum {file_name}", entry.size) as task:
        size, sha256 = hash_file(copy.path, task)
    if size != entry.size:
        what = "truncated" if size < entry.size else "longer than recorded"
        raise BackupIntegrityError(
            f"{manifest.name}: {file_name} is {what} ({size} bytes, manifest says {entry.size})."
        )
    if sha256 != entry.sha256:
        raise BackupIntegrityError(
            f"{manifest.name}: {file_name} is corrupt (sha256 {sha256[:12]}..., manifest says "
            f"{entry.sha256[:12]}...)."
        )
    return copy


def _download(storage, name: str, dest: Path) -> None:
    # Storage.open() is the public API for every backend (on S3 it spools the object to a
    # temporary file first; django-storages' private bucket access would stream it).
    with open(dest, "wb") as out, storage.open(name, "rb") as src:
        shutil.copyfileobj(src, out, COPY_CHUNK)
