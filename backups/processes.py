"""Child processes of backups and restores (pg_dump, pg_restore, redis-cli): started to die
with this process, their output drained for progress and errors; and whether a pid lives."""

import collections
import contextlib
import ctypes
import os
import re
import signal
import subprocess
import threading

from backups.exceptions import ToolFailedError

_PR_SET_PDEATHSIG = 1


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


def pid_alive(pid: int) -> bool:
    """Whether a process of this host has this pid (a recycled pid counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
