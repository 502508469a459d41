"""The manifest.json written last into every backup: what it holds and how to check it.

A backup without a manifest is incomplete (its writer died); one whose manifest does not
parse, or whose signature does not match, is refused before anything is restored.
"""

import datetime
import hashlib
import hmac
import json
import re
from dataclasses import asdict, dataclass, field

from backups.crypto import ALGORITHM, BackupKey
from backups.exceptions import BackupIntegrityError

FORMAT = "freeagentics-backup"
VERSION = 1
KIND_FULL = "full"
KIND_PARTITION = "partition-archive"
_FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass
class FileEntry:
    name: str
    role: str  # postgres | redis-rdb | redis-keys | partition
    size: int  # stored bytes, as in the storage
    sha256: str  # of the stored bytes
    encrypted: bool
    compression: str  # pg_dump (custom format, compressed inside) | gzip


@dataclass
class Manifest:
    name: str
    kind: str
    created_at: datetime.datetime
    django: dict
    files: list[FileEntry]
    postgres: dict | None = None
    redis: dict | None = None
    encryption: dict | None = None
    partition: dict | None = None
    signature: str | None = field(default=None, compare=False)

    def file(self, role: str) -> FileEntry | None:
        return next((f for f in self.files if f.role == role), None)

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    def _payload(self) -> dict:
        data = asdict(self)
        data.pop("signature")
        data["created_at"] = self.created_at.isoformat()
        return {"format": FORMAT, "version": VERSION, **data}

    def canonical(self) -> bytes:
        return json.dumps(self._payload(), sort_keys=True, separators=(",", ":")).encode()

    def sign(self, key: BackupKey) -> None:
        self.signature = key.sign(self.canonical())

    def check_signature(self, key: BackupKey) -> bool:
        return self.signature is not None and hmac.compare_digest(
            self.signature, key.sign(self.canonical())
        )

    def to_json(self) -> bytes:
        data = self._payload()
        if self.signature:
            data["signature"] = self.signature
        return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def from_json(cls, raw: bytes, *, name: str) -> "Manifest":
        """Parse and validate; raises BackupIntegrityError naming what is wrong."""
        try:
            data = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise BackupIntegrityError(f"{name}: manifest.json is not valid JSON ({e}).") from e
        try:
            if data.get("format") != FORMAT:
                raise ValueError("not a freeagentics backup manifest")
            if data.get("version") != VERSION:
                raise ValueError(f"manifest version {data.get('version')} is not supported")
            files = [FileEntry(**entry) for entry in data["files"]]
            for entry in files:
                if not _FILE_NAME.match(entry.name) or not _SHA256.match(entry.sha256):
                    raise ValueError(f"bad file entry {entry.name!r}")
                if not isinstance(entry.size, int) or entry.size < 0:
                    raise ValueError(f"bad size for {entry.name}")
            manifest = cls(
                name=data["name"],
                kind=data["kind"],
                created_at=datetime.datetime.fromisoformat(data["created_at"]),
                django=data["django"],
                files=files,
                postgres=data.get("postgres"),
                redis=data.get("redis"),
                encryption=data.get("encryption"),
                partition=data.get("partition"),
                signature=data.get("signature"),
            )
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            raise BackupIntegrityError(f"{name}: manifest.json is malformed ({e}).") from e
        if manifest.name != name:
            raise BackupIntegrityError(
                f"{name}: the manifest describes backup {manifest.name!r}; files were moved "
                "or mixed up."
            )
        if manifest.created_at.tzinfo is None:
            raise BackupIntegrityError(f"{name}: manifest created_at has no time zone.")
        return manifest


def encryption_header(key: BackupKey | None) -> dict | None:
    """The manifest's description of how its files are encrypted (None: they are not)."""
    if key is None:
        return None
    return {"algorithm": ALGORITHM, "key_id": key.key_id}


# ---------------------------------------------------------------------------------------
# The drill record, drill.json beside a backup's files: written when verify_backup passes,
# read by retention, which never deletes the newest backup that passed its drill. Signed
# like the manifest and bound to its exact content, so it can neither be forged nor moved
# to another backup.

DRILL_FORMAT = "freeagentics-drill"


def _drill_payload(manifest: Manifest, verified_at: str, key_id: str | None) -> bytes:
    data = {
        "format": DRILL_FORMAT,
        "backup": manifest.name,
        "manifest_sha256": hashlib.sha256(manifest.canonical()).hexdigest(),
        "verified_at": verified_at,
        "key_id": key_id,
    }
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()


def drill_record(manifest: Manifest, verified_at: datetime.datetime, key: BackupKey | None):
    """The bytes of drill.json for a backup that passed its drill just now."""
    when = verified_at.isoformat()
    payload = _drill_payload(manifest, when, key.key_id if key else None)
    data = json.loads(payload)
    data["signature"] = key.sign(payload) if key else None
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()


def drill_passed(manifest: Manifest, raw: bytes | None, key_for) -> bool:
    """Whether raw is an authentic drill record of exactly this manifest.

    key_for(key_id) returns the key (raising BackupIntegrityError for an unknown one);
    an unsigned record counts only when the manifest is unsigned too.
    """
    if not raw:
        return False
    try:
        data = json.loads(raw)
        payload = _drill_payload(manifest, data["verified_at"], data["key_id"])
        if data["key_id"] is None:
            return manifest.signature is None and data.get("signature") is None
        return hmac.compare_digest(data["signature"], key_for(data["key_id"]).sign(payload))
    except (BackupIntegrityError, KeyError, TypeError, ValueError, UnicodeDecodeError):
        return False
