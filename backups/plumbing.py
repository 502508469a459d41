"""Plumbing shared by backups, restores and partition archives: child processes with
progress, sealed (compressed, encrypted, hashed) files, staging folders, pg_restore."""

import collections
import contextlib
import datetime
import gzip
import hashlib
import io
import os
import re
import secrets
import subprocess
import tempfile
import threading
from pathlib import Path

from django.conf import settings

from backups import pgtools, storage
from backups.crypto import (
    ALGORITHM,
    DEFAULT_CHUNK_SIZE,
    DecryptingReader,
    EncryptingWriter,
    iter_decrypted,
)
from backups.exceptions import (
    BackupIntegrityError,
    ToolFailedError,
)
from backups.manifest import FileEntry

COPY_CHUNK = 1024 * 1024
GZIP_LEVEL = 5
DRILL_DB_PREFIX = "fa_drill_"


# ---------------------------------------------------------------------------------------
# Child processes


class Proc:
    """A child process whose merged stdout/stderr is drained by a thread (no pipe stalls)."""

    _ITEM_RE = re.compile(r"^pg_(?:restore|dump): (?:creating|processing|dumping contents)")

    def __init__(self, args, *, env=None, stdin=None):
        self.args = [str(a) for a in args]
        self.popen = subprocess.Popen(
            self.args,
            env=env,
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        self.lines = collections.deque(maxlen=200)
        self.items = 0
        self.last = ""
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()

    def _drain(self):
        for raw in self.popen.stdout:
            line = raw.decode("utf-8", "replace").rstrip()
            self.lines.append(line)
            if self._ITEM_RE.match(line):
                self.items += 1
                self.last = line.split(": ", 1)[1]

    def wait(self, timeout=None):
        return self.popen.wait(timeout)

    def stop(self):
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()

    def check(self, what: str) -> None:
        code = self.popen.wait()
        self._reader.join(5)
        if code != 0:
            errors = [ln for ln in self.lines if "error" in ln.lower() or "fatal" in ln.lower()]
            detail = "; ".join((errors or list(self.lines))[-3:]) or "no output"
            raise ToolFailedError(f"{what} failed (exit status {code}): {detail}")


def watch(proc: Proc, task, size_of=None) -> None:
    while True:
        try:
            proc.wait(0.25)
            return
        except subprocess.TimeoutExpired:
            task.update(size_of() if size_of else proc.items, detail=proc.last[:60])


# ---------------------------------------------------------------------------------------
# Sealing: compress and/or encrypt while hashing what is written


class HashingSink:
    def __init__(self, fh):
        self.fh = fh
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data) -> int:
        self.fh.write(data)
        self.sha256.update(data)
        self.size += len(data)
        return len(data)

    def flush(self):
        self.fh.flush()


@contextlib.contextmanager
def sealed_writer(path: Path, key, *, gzip_level: int | None):
    """Yield (writer, result); on exit result holds the stored file's size and sha256."""
    result = {}
    with open(path, "wb") as raw:
        sink = HashingSink(raw)
        encrypter = EncryptingWriter(sink, key, DEFAULT_CHUNK_SIZE) if key else None
        inner = encrypter or sink
        compressor = (
            gzip.GzipFile(fileobj=inner, mode="wb", compresslevel=gzip_level, mtime=0)
            if gzip_level
            else None
        )
        yield compressor or inner, result
        if compressor:
            compressor.close()
        if encrypter:
            encrypter.close()
        raw.flush()
        os.fsync(raw.fileno())
    result.update(size=sink.size, sha256=sink.sha256.hexdigest())


def seal_copy(src: Path, dest: Path, key, *, gzip_level, task) -> dict:
    with open(src, "rb") as fh, sealed_writer(dest, key, gzip_level=gzip_level) as (out, result):
        while chunk := fh.read(COPY_CHUNK):
            out.write(chunk)
            task.advance(len(chunk))
    return result


@contextlib.contextmanager
def plaintext(path: Path, entry: FileEntry):
    """A readable binary stream of a stored file's original content."""
    with open(path, "rb") as fh:
        stream = fh
        if entry.encrypted:
            stream = io.BufferedReader(DecryptingReader(fh), buffer_size=COPY_CHUNK)
        if entry.compression == "gzip":
            stream = gzip.GzipFile(fileobj=stream, mode="rb")
        try:
            yield stream
        except (EOFError, gzip.BadGzipFile) as e:
            raise BackupIntegrityError(f"{entry.name} does not decompress: {e}") from e


def staging_dir():
    return tempfile.TemporaryDirectory(prefix="fa-backup-", dir=settings.BACKUP_TEMP_DIR)


def new_backup_name(prefix: str, now: datetime.datetime) -> str:
    return f"{prefix}-{now:%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


def file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def pg_restore(
    *,
    alias: str,
    dbname: str,
    client,
    path: Path,
    entry: FileEntry,
    jobs: int,
    progress,
    single_transaction: bool = False,
) -> None:
    args = [
        client.path,
        f"--dbname={dbname}",
        "--no-owner",
        "--no-privileges",
        "--exit-on-error",
        "--verbose",
    ]
    if single_transaction:
        args.append("--single-transaction")
    env = pgtools.libpq_env(alias, dbname)
    if not entry.encrypted:
        # A seekable archive: pg_restore reads it itself (and can run parallel jobs).
        listing = subprocess.run(
            [str(client.path), "--list", str(path)], capture_output=True, env=env
        ).stdout.decode("utf-8", "replace")
        total = sum(1 for ln in listing.splitlines() if ln and not ln.startswith(";"))
        if jobs > 1:
            args.append(f"--jobs={jobs}")
        proc = Proc([*args, path], env=env)
        try:
            with progress.task("pg_restore", total or None, unit="items") as task:
                watch(proc, task)
                proc.check("pg_restore")
        finally:
            proc.stop()
        return
    # Encrypted: decrypt chunk by chunk into pg_restore's stdin.
    proc = Proc(args, env=env, stdin=subprocess.PIPE)
    try:
        with progress.task("pg_restore (decrypting)", entry.size) as task, open(path, "rb") as fh:
            try:
                for chunk in iter_decrypted(fh):
                    proc.popen.stdin.write(chunk)
                    task.update(fh.tell(), detail=proc.last[:60])
                proc.popen.stdin.close()
            except BrokenPipeError:
                pass  # pg_restore stopped reading: check() reports its error
            proc.check("pg_restore")
    finally:
        with contextlib.suppress(OSError):
            proc.popen.stdin.close()
        proc.stop()


def encryption_header(key) -> dict | None:
    """The manifest's description of how its files are encrypted (None: they are not)."""
    if key is None:
        return None
    return {"algorithm": ALGORITHM, "key_id": key.key_id, "chunk_size": DEFAULT_CHUNK_SIZE}


def manifest_store(name: str, manifest, key, staging: Path) -> str:
    """Sign (when encrypting) and store a backup's manifest; returns its object name.
    Written last, so a backup without a manifest is recognisably incomplete."""
    if key is not None:
        manifest.sign(key)
    object_name = storage.object_name(name, storage.MANIFEST)
    storage.save_bytes(object_name, manifest.to_json(), staging)
    return object_name
