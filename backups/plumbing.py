"""Plumbing shared by backups, restores and partition archives: child processes with
progress, sealed (compressed, encrypted, hashed) files, staging folders, pg_restore."""

import collections
import contextlib
import ctypes
import datetime
import gzip
import hashlib
import io
import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from django.conf import settings

from backups import pgtools, storage
from backups.crypto import ALGORITHM, AgeWriter, decrypting_reader
from backups.exceptions import (
    BackupIntegrityError,
    ToolFailedError,
)
from backups.manifest import FileEntry

COPY_CHUNK = 1024 * 1024
GZIP_LEVEL = 5
STAGING_PREFIX = "fa-backup-"
# Staging folders without an owner pid (made before pids were recorded) count as
# leftovers once this old.
STAGING_GRACE = datetime.timedelta(hours=24)
_PR_SET_PDEATHSIG = 1


# ---------------------------------------------------------------------------------------
# Child processes


def _die_with_parent():
    # Runs in the child before exec: the kernel kills it when this process dies, even by
    # SIGKILL, so no orphaned pg_dump keeps writing and no pg_restore keeps loading.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class Proc:
    """A child process whose stderr (and stdout, unless captured) is drained by a thread.

    capture_stdout=True leaves popen.stdout for the caller to read (a dump streamed to
    the encryptor). The child dies with this process.
    """

    _ITEM_RE = re.compile(r"^pg_(?:restore|dump): (?:creating|processing|dumping contents)")

    def __init__(self, args, *, env=None, stdin=None, capture_stdout=False):
        self.args = [str(a) for a in args]
        self.popen = subprocess.Popen(
            self.args,
            env=env,
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE if capture_stdout else subprocess.STDOUT,
            preexec_fn=_die_with_parent,
        )
        self.lines = collections.deque(maxlen=200)
        self.items = 0
        self.last = ""
        log = self.popen.stderr if capture_stdout else self.popen.stdout
        self._reader = threading.Thread(target=self._drain, args=(log,), daemon=True)
        self._reader.start()

    def _drain(self, log):
        for raw in log:
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
    """Yield (writer, result); on exit result holds the stored file's size and sha256.

    With a key, what reaches the disk is age ciphertext only.
    """
    result = {}
    with open(path, "wb") as raw:
        sink = HashingSink(raw)
        encrypter = AgeWriter(sink, key) if key else None
        inner = encrypter or sink
        compressor = (
            gzip.GzipFile(fileobj=inner, mode="wb", compresslevel=gzip_level, mtime=0)
            if gzip_level
            else None
        )
        try:
            yield compressor or inner, result
        except BaseException:
            if encrypter:
                encrypter.abort()
            raise
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


def seal_output(proc: Proc, dest: Path, key, *, gzip_level, task) -> dict:
    """Seal a child's stdout into dest as it comes (a dump never lands on disk in clear);
    checks the child's exit status."""
    try:
        with sealed_writer(dest, key, gzip_level=gzip_level) as (out, result):
            while chunk := proc.popen.stdout.read(COPY_CHUNK):
                out.write(chunk)
                task.update(task.done + len(chunk), detail=proc.last[:60])
        proc.wait()
    except BaseException:
        proc.stop()
        raise
    return result


@contextlib.contextmanager
def plaintext(path: Path, entry: FileEntry):
    """A readable binary stream of a stored file's original content."""
    with open(path, "rb") as fh:
        stream = fh
        if entry.encrypted:
            stream = io.BufferedReader(decrypting_reader(fh), buffer_size=COPY_CHUNK)
        if entry.compression == "gzip":
            stream = gzip.GzipFile(fileobj=stream, mode="rb")
        try:
            yield stream
        except (EOFError, gzip.BadGzipFile) as e:
            raise BackupIntegrityError(f"{entry.name} does not decompress: {e}") from e


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
        if owner.isdigit():
            orphaned = not pgtools.pid_alive(int(owner))
        else:
            orphaned = path.stat().st_mtime < cutoff
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
        with (
            progress.task("pg_restore (decrypting)", entry.size) as task,
            open(path, "rb") as fh,
            decrypting_reader(fh) as reader,
        ):
            try:
                while chunk := reader.read(COPY_CHUNK):
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
    return {"algorithm": ALGORITHM, "key_id": key.key_id}


def manifest_store(name: str, manifest, key, staging: Path) -> str:
    """Sign (when encrypting) and store a backup's manifest; returns its object name.
    Written last, so a backup without a manifest is recognisably incomplete."""
    if key is not None:
        manifest.sign(key)
    object_name = storage.object_name(name, storage.MANIFEST)
    storage.save_bytes(object_name, manifest.to_json(), staging)
    return object_name
