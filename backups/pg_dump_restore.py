"""Running pg_dump into a sealed file and pg_restore from one, with progress (pgtools finds
the programs)."""

import contextlib
import subprocess
from pathlib import Path

from django.conf import settings

from backups import pgtools, storage
from backups.crypto import decrypting_reader
from backups.manifest import FileEntry
from backups.processes import Proc, watch
from backups.sealed_files import COPY_CHUNK, seal_output


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def pg_dump_start(client: pgtools.PgClient, alias: str, options: list[str], dump_path: Path, key):
    """Start pg_dump of the alias' database (custom format, BACKUP_PG_COMPRESS) with these
    options; returns its Proc, for pg_dump_finish.

    Encrypted, the dump goes from pg_dump's stdout through the encryptor: no plaintext
    reaches the disk. Clear, it is dump_path, a seekable file, which `restore --jobs` needs.
    """
    args = [
        client.path,
        "--format=custom",
        f"--compress={settings.BACKUP_PG_COMPRESS}",
        "--verbose",
        *options,
    ]
    if not key:
        args.append(f"--file={dump_path}")
    return Proc(args, env=pgtools.libpq_env(alias), capture_stdout=bool(key))


def pg_dump_finish(
    proc: Proc, dump_path: Path, key, *, role: str, label: str, what: str, progress
) -> FileEntry:
    """Wait for a pg_dump_start() dump and describe the file to store: dump_path, or beside
    it dump_path + ".age" sealed from pg_dump's stdout. label names the progress task, what
    the error. Raises ToolFailedError when pg_dump fails."""
    name = dump_path.name + (".age" if key else "")
    if key:
        with progress.task(f"{label} | age > {name}") as task:
            res = seal_output(proc, dump_path.with_name(name), key, gzip_level=None, task=task)
            proc.check(what)
    else:
        with progress.task(label) as task:
            watch(proc, task, lambda: _file_size(dump_path))
            proc.check(what)
            task.update(_file_size(dump_path))
        with progress.task(f"checksum {name}", _file_size(dump_path)) as task:
            size, sha256 = storage.hash_file(dump_path, task)
        res = {"size": size, "sha256": sha256}
    return FileEntry(name, role, encrypted=bool(key), compression="pg_dump", **res)


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
