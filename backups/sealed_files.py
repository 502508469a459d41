"""Sealed files: written compressed and/or encrypted while hashed (size and sha256 of the
stored bytes), and read back as their original content."""

import contextlib
import gzip
import hashlib
import io
import os
from pathlib import Path

from backups.crypto import AgeWriter, decrypting_reader
from backups.exceptions import BackupIntegrityError
from backups.manifest import FileEntry
from backups.processes import Proc

COPY_CHUNK = 1024 * 1024
GZIP_LEVEL = 5


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
