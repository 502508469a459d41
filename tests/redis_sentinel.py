"""Debian's Redis 7 on free loopback ports, for tests of what the app does when Redis fails
over: single servers (RedisServer) and a Sentinel group (SentinelGroup) of a master, one
replica and three sentinels with a quorum of 2.

    with SentinelGroup("mymaster") as group:      # returns once the group is healthy
        group.master_address()                    # ("127.0.0.1", <port>), as the sentinels say
        redis.sentinel.Sentinel(group.sentinel_addresses()).master_for("mymaster")
        new_master, seconds = group.wait_for_failover(group.kill_master())
        group.replica.start()                     # the old master, which the sentinels
        group.wait_until_healthy()                # turn into a replica of the new one

    with RedisServer(appendonly=True) as server:
        server.client().set("k", "v")
        server.kill()                             # SIGKILL; the folder (and AOF) stays
        server.start()                            # same port, same folder

Each server and sentinel is a direct child of this process, in a session of its own, with
its configuration, data and log in a folder of its own under the system temp dir: a
sentinel rewrites its configuration file, so none is shared. stop() leaves no process
behind; an atexit hook, and on Linux the kernel when this process dies, kills what a
crashed test left running. Start them from the main thread: the kernel's signal follows
the thread that started the child. Failures raise RedisProcessError with the tails of the
logs; nothing is ever skipped.
"""

import atexit
import contextlib
import ctypes
import functools
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

REDIS_SERVER = Path("/usr/bin/redis-server")
REDIS_SENTINEL = Path("/usr/bin/redis-sentinel")
PACKAGES = {REDIS_SERVER: "redis-server", REDIS_SENTINEL: "redis-sentinel"}
HOST = "127.0.0.1"
START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0
HEALTHY_TIMEOUT = 15.0
# Long enough for one failed election: a sentinel retries after twice failover-timeout.
FAILOVER_TIMEOUT = 20.0
# How long reset() lets a group whose processes all run become healthy again (a replica
# resumed from a pause reconnecting) before it rebuilds the group instead.
HEAL_TIMEOUT = 3.0
POLL_INTERVAL = 0.02
# A free port found by binding port 0 may be taken by a concurrent test run before the
# server binds it: the server then exits, and start() tries another.
PORT_ATTEMPTS = 5
LOG_TAIL_CHARS = 1500
# What `sentinel monitor` takes as a name, and a redis-py service_name can say.
MASTER_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}\Z")
SENTINELS = 3
QUORUM = 2
PR_SET_PDEATHSIG = 1

Address = tuple[str, int]


class RedisProcessError(RuntimeError):
    """A server or sentinel did not start, answer or reach the state waited for."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _conf_value(value) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    text = str(value)
    if text == "" or any(c.isspace() or c in "\"'" for c in text):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return text


def _flags(state: dict) -> set[str]:
    flags = state["flags"]
    # A string in RESP2 replies, a set in RESP3 ones.
    return set(flags.split(",")) if isinstance(flags, str) else set(flags)


# Every child still running, by pid, for the atexit hook.
_children: dict[int, subprocess.Popen] = {}


def _kill_group(process: subprocess.Popen) -> None:
    # While the leader is unreaped its pid cannot be reused, so the group is still ours.
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    _children.pop(process.pid, None)


@atexit.register
def _kill_children() -> None:
    for process in list(_children.values()):
        _kill_group(process)


@functools.cache
def _die_with_parent():
    """A preexec_fn that has the kernel SIGKILL the child if this process dies, so even a
    SIGKILLed pytest leaves no servers behind (Linux only)."""
    if not sys.platform.startswith("linux"):
        return None
    # Loaded here, in the parent: the child between fork and exec should do nothing risky.
    libc = ctypes.CDLL(None, use_errno=True)

    def preexec():
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)

    return preexec


class _RedisProcess:
    """What a redis-server and a sentinel share: a folder, a configuration file written
    once (the process may rewrite it), a log that restarts append to, and signals."""

    binary: Path
    kind: str

    def __init__(self, *, name: str, port: int | None):
        self.name = name
        self._port_given = port is not None
        self.port = port or free_port()
        self.root: Path | None = None
        self.paused = False
        self._process: subprocess.Popen | None = None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} on {HOST}:{self.port}>"

    @property
    def address(self) -> Address:
        return (HOST, self.port)

    @property
    def conf(self) -> Path:
        return self.root / f"{self.kind}.conf"

    @property
    def log(self) -> Path:
        return self.root / f"{self.kind}.log"

    def log_tail(self, chars: int = LOG_TAIL_CHARS) -> str:
        if self.root is None or not self.log.exists():
            return ""
        text = self.log.read_text(errors="replace")
        if len(text) <= chars:
            return text
        # From the first whole line.
        return text[-chars:].partition("\n")[2]

    def _error(self, message: str) -> RedisProcessError:
        return RedisProcessError(f"{self!r}: {message}\n{self.log_tail()}")

    @property
    def pid(self) -> int | None:
        """The running process's pid; None when it is not running."""
        if self._process is None or self._process.poll() is not None:
            return None
        return self._process.pid

    @property
    def running(self) -> bool:
        return self.pid is not None

    def _config(self) -> list[str]:
        raise NotImplementedError

    def start(self):
        """Start the process and wait until it answers on its port; after kill() or
        restart(), on the same port with the same folder and (maybe rewritten) config."""
        if self.running:
            raise self._error("start(): already running")
        if not self.binary.exists():
            package = PACKAGES[self.binary]
            raise RedisProcessError(
                f"{self.binary} is missing: install the Debian package {package} "
                f"(apt-get install {package}; scripts/test.sh does it when it can)"
            )
        first = self.root is None
        if first:
            self.root = Path(tempfile.mkdtemp(prefix=f"redis-{self.name}-"))
        try:
            for _attempt in range(PORT_ATTEMPTS):
                if first:
                    self.conf.write_text("\n".join(self._config()) + "\n")
                if self._launch():
                    return self
                if not first or self._port_given:
                    raise self._error(f"port {self.port} is taken")
                self.port = free_port()
            raise self._error(f"no free port after {PORT_ATTEMPTS} attempts")
        except BaseException:
            if self._process is not None:
                _kill_group(self._process)
            if first:
                shutil.rmtree(self.root, ignore_errors=True)
                self.root = None
            raise

    def _launch(self) -> bool:
        """Start the process; True once it answers, False if its port was taken."""
        with open(self.log, "ab") as log:
            self._process = subprocess.Popen(
                [str(self.binary), str(self.conf)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.root,
                # Its own session, so kill(), pause() and the atexit hook reach the
                # children it forks (replication syncs, AOF rewrites) too.
                start_new_session=True,
                preexec_fn=_die_with_parent(),
            )
        _children[self._process.pid] = self._process
        self.paused = False
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self._process.poll() is not None:
                _children.pop(self._process.pid, None)
                if "Address already in use" in self.log_tail(4000):
                    return False
                raise self._error(f"exited ({self._process.returncode}) on start")
            # Its pid, not just an answer: another process may be listening on the port.
            with contextlib.suppress(redis.RedisError), self.client(socket_timeout=0.5) as c:
                if c.info("server")["process_id"] == self._process.pid:
                    return True
            if time.monotonic() > deadline:
                raise self._error(f"did not answer within {START_TIMEOUT:g} s")
            time.sleep(POLL_INTERVAL)

    def _terminate(self) -> None:
        """SIGTERM (a server's shutdown: an AOF is flushed), SIGKILL if it lingers; reaped."""
        process = self._process
        if process.poll() is None:
            process.terminate()
            if self.paused:
                # A stopped process acts on SIGTERM only once it runs again.
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGCONT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(STOP_TIMEOUT)
        _kill_group(process)
        self.paused = False

    def stop(self) -> None:
        """Stop the process (gracefully, then SIGKILL) and remove its folder."""
        try:
            if self._process is not None:
                self._terminate()
        finally:
            if self.root is not None:
                shutil.rmtree(self.root, ignore_errors=True)
                self.root = None

    def restart(self):
        """Stop gracefully if running (the folder stays), and start() again."""
        if self.running:
            self._terminate()
        return self.start()

    def kill(self) -> None:
        """SIGKILL the process and the children it forked, as a crashed machine stops;
        returns once it is reaped. The folder stays, for start() or a test's inspection."""
        if not self.running:
            raise self._error("kill(): not running")
        _kill_group(self._process)
        self.paused = False

    def pause(self) -> None:
        """SIGSTOP the process: its port still accepts connections, but nothing answers."""
        if not self.running:
            raise self._error("pause(): not running")
        os.killpg(self._process.pid, signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        """SIGCONT a paused process."""
        if not self.running:
            raise self._error("resume(): not running")
        os.killpg(self._process.pid, signal.SIGCONT)
        self.paused = False

    def client(self, db: int = 0, **kwargs) -> redis.Redis:
        """A redis-py client of this process (decoded replies, 2 s timeouts, no retries:
        a test sees each failure)."""
        options = {
            "decode_responses": True,
            "socket_timeout": 2,
            "socket_connect_timeout": 2,
            "retry": Retry(NoBackoff(), 0),
            **kwargs,
        }
        return redis.Redis(host=HOST, port=self.port, db=db, **options)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class RedisServer(_RedisProcess):
    """redis-server on 127.0.0.1:`port` (a free one by default): no persistence, or an
    append-only file with appendonly=True; a replica of `replicaof` (a RedisServer or an
    address) if given. `settings` are more redis.conf directives (underscores become
    dashes, True/False yes/no); one redis-server does not know, it refuses to start with."""

    binary = REDIS_SERVER
    kind = "redis"

    def __init__(
        self,
        *,
        name: str = "redis",
        port: int | None = None,
        appendonly: bool = False,
        replicaof: "RedisServer | Address | None" = None,
        **settings,
    ):
        super().__init__(name=name, port=port)
        if isinstance(replicaof, RedisServer):
            replicaof = replicaof.address
        self.replicaof = replicaof
        self.appendonly = appendonly
        self.settings = {name.replace("_", "-"): value for name, value in settings.items()}

    def _config(self) -> list[str]:
        directives = {
            "bind": HOST,
            "port": self.port,
            "dir": self.root,
            "logfile": "",
            "daemonize": False,
            "save": "",
            "appendonly": self.appendonly,
            # A replica syncs at once: Redis 7 would wait 5 s for more replicas to
            # share the transfer.
            "repl-diskless-sync": True,
            "repl-diskless-sync-delay": 0,
            # SIGTERM does not wait (10 s by default) for a lagging or paused replica.
            "shutdown-timeout": 0,
            # DEBUG SLEEP and friends, for tests of a slow server.
            "enable-debug-command": "local",
            **self.settings,
        }
        lines = [f"{name} {_conf_value(value)}" for name, value in directives.items()]
        if self.replicaof is not None:
            host, port = self.replicaof
            lines.append(f"replicaof {host} {port}")
        return lines

    def url(self, db: int = 0) -> str:
        return f"redis://{HOST}:{self.port}/{db}"

    def info(self, section: str = "replication") -> dict:
        """INFO `section`, parsed by redis-py (replication: role, master_port,
        master_link_status, connected_slaves, slave0 ...)."""
        with self.client() as c:
            return c.info(section)


class SentinelProcess(_RedisProcess):
    """redis-sentinel on 127.0.0.1:`port` monitoring `master_name` at `master`."""

    binary = REDIS_SENTINEL
    kind = "sentinel"

    def __init__(
        self,
        master_name: str,
        master: Address,
        *,
        quorum: int,
        down_after_ms: int,
        failover_timeout_ms: int,
        parallel_syncs: int,
        name: str = "sentinel",
        port: int | None = None,
    ):
        super().__init__(name=name, port=port)
        self.master_name = master_name
        self.master = master
        self.quorum = quorum
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.parallel_syncs = parallel_syncs

    def _config(self) -> list[str]:
        host, port = self.master
        name = self.master_name
        return [
            f"bind {HOST}",
            f"port {self.port}",
            f"dir {self.root}",
            'logfile ""',
            "daemonize no",
            f"sentinel monitor {name} {host} {port} {self.quorum}",
            f"sentinel down-after-milliseconds {name} {self.down_after_ms}",
            f"sentinel failover-timeout {name} {self.failover_timeout_ms}",
            f"sentinel parallel-syncs {name} {self.parallel_syncs}",
        ]


class Failover(NamedTuple):
    master: RedisServer
    elapsed: float


class SentinelGroup:
    """A master, one replica of it and three sentinels monitoring it as `name` with a
    quorum of 2: the master is subjectively down after `down_after_ms` without an answer,
    and a failover that stalls is retried after twice `failover_timeout_ms`.
    `server_settings` go to both servers (RedisServer's options: appendonly=True ...).

    `master` and `replica` are the servers in those roles as this object last saw them:
    wait_for_failover() and repoint() swap them. start() returns once the group is healthy
    (see problems()), and `started_in` says how long that took."""

    def __init__(
        self,
        name: str = "mymaster",
        *,
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 3000,
        parallel_syncs: int = 1,
        **server_settings,
    ):
        if not MASTER_NAME.match(name):
            raise ValueError(f"master name {name!r}: letters, digits, '.', '_' or '-' only")
        for option, value in (
            ("down_after_ms", down_after_ms),
            ("failover_timeout_ms", failover_timeout_ms),
            ("parallel_syncs", parallel_syncs),
        ):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{option}={value!r}: a positive integer")
        if {"name", "port", "replicaof"} & set(server_settings):
            raise ValueError("the group names its servers and chooses ports and replication")
        self.name = name
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.parallel_syncs = parallel_syncs
        self.server_settings = server_settings
        self.master: RedisServer | None = None
        self.replica: RedisServer | None = None
        self.sentinels: list[SentinelProcess] = []
        self.started_in: float | None = None

    def __repr__(self) -> str:
        return f"<SentinelGroup {self.name} master={self.master} replica={self.replica}>"

    @property
    def servers(self) -> list[RedisServer]:
        return [s for s in (self.master, self.replica) if s is not None]

    @property
    def processes(self) -> list[_RedisProcess]:
        return [*self.servers, *self.sentinels]

    def log_tail(self, chars: int = LOG_TAIL_CHARS) -> str:
        """The end of every server's and sentinel's log, each under a header."""
        return "\n".join(
            f"--- {p.name} ({p.kind} on port {p.port}, "
            f"{'running' if p.running else 'not running'}) ---\n{p.log_tail(chars)}"
            for p in self.processes
        )

    def _error(self, message: str) -> RedisProcessError:
        return RedisProcessError(f"{self!r}: {message}\n{self.log_tail()}")

    def start(self) -> "SentinelGroup":
        """Start the master, the replica (synced) and the sentinels; return once every
        sentinel sees the master, the replica and the other two."""
        if self.processes:
            raise self._error("start(): already started")
        began = time.monotonic()
        try:
            self.master = RedisServer(name="master", **self.server_settings).start()
            self.replica = RedisServer(
                name="replica", replicaof=self.master, **self.server_settings
            ).start()
            # Synced before the sentinels' first INFO of the master, which lists it.
            self._wait(
                "the replica to sync",
                lambda: self.replica.info().get("master_link_status") == "up",
                START_TIMEOUT,
            )
            for number in range(1, SENTINELS + 1):
                sentinel = SentinelProcess(
                    self.name,
                    self.master.address,
                    quorum=QUORUM,
                    down_after_ms=self.down_after_ms,
                    failover_timeout_ms=self.failover_timeout_ms,
                    parallel_syncs=self.parallel_syncs,
                    name=f"sentinel{number}",
                )
                self.sentinels.append(sentinel)
                sentinel.start()
            self.wait_until_healthy()
        except BaseException:
            self.stop()
            raise
        self.started_in = time.monotonic() - began
        return self

    def stop(self) -> None:
        """Stop the sentinels, then the servers, and remove their folders."""
        errors = []
        for process in [*self.sentinels, self.replica, self.master]:
            if process is None:
                continue
            try:
                process.stop()
            except Exception as e:
                errors.append(e)
        self.master = self.replica = None
        self.sentinels = []
        if errors:
            raise errors[0]

    def __enter__(self) -> "SentinelGroup":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def sentinel_addresses(self) -> list[Address]:
        """The sentinels' addresses, as redis.sentinel.Sentinel takes them."""
        return [s.address for s in self.sentinels]

    def server_at(self, address: Address) -> RedisServer:
        """The group's server at `address`; ValueError if it has none there."""
        for server in self.servers:
            if server.address == tuple(address):
                return server
        raise ValueError(f"{address!r} is no server of {self!r}")

    def _sentinel_answers(self) -> dict[str, Address | redis.RedisError | None]:
        """Each running, unpaused sentinel's address for the master: None if it knows no
        master of that name, the error if it did not answer."""
        answers = {}
        for sentinel in self.sentinels:
            if not sentinel.running or sentinel.paused:
                continue
            try:
                with sentinel.client(socket_timeout=1) as c:
                    answers[sentinel.name] = c.sentinel_get_master_addr_by_name(self.name)
            except redis.RedisError as e:
                answers[sentinel.name] = e
        return answers

    def master_address(self) -> Address:
        """The master's address as the sentinels say; RedisProcessError unless at least a
        quorum of them run and answer, and all that run name the same address."""
        answers = self._sentinel_answers()
        addresses = set(answers.values())
        if len(answers) < QUORUM or len(addresses) != 1 or None in addresses:
            raise self._error(f"the sentinels do not agree on master {self.name}: {answers}")
        (address,) = addresses
        if not isinstance(address, tuple):
            raise self._error(f"the sentinels do not answer: {answers}")
        return address

    def repoint(self) -> None:
        """Make `master` the server the sentinels name, and `replica` the other one."""
        master = self.server_at(self.master_address())
        if master is not self.master:
            self.master, self.replica = master, self.master

    def reset(self) -> str:
        """Make the group healthy and empty for the next test: paused processes resumed;
        after a failover both servers survived, `master` and `replica` re-pointed at the
        new roles; with a process gone, or still unhealthy after HEAL_TIMEOUT, the whole
        group stopped and started again (on new ports). Then FLUSHALL, acked by the
        replica. "healthy", "re-pointed" or "rebuilt"."""
        for process in self.processes:
            if process.running and process.paused:
                process.resume()
        outcome = "rebuilt"
        if self.processes and all(p.running for p in self.processes):
            master = self.master
            try:
                self.repoint()
                self.wait_until_healthy(HEAL_TIMEOUT)
                outcome = "healthy" if self.master is master else "re-pointed"
            except (RedisProcessError, ValueError):
                pass
        if outcome == "rebuilt":
            self.stop()
            self.start()
        with self.master.client() as client:
            client.flushall()
            if client.wait(1, 2000) != 1:
                raise self._error("the replica did not ack FLUSHALL within 2 s")
        return outcome

    def kill_master(self) -> Address:
        """SIGKILL the master; its address, for wait_for_failover()."""
        address = self.master.address
        self.master.kill()
        return address

    def wait_for_failover(
        self, old_address: Address, timeout: float = FAILOVER_TIMEOUT
    ) -> Failover:
        """Wait until every running sentinel names another server than `old_address` (the
        master before) and that server says it is a master; then `master` is that server
        and `replica` the old one. The new master and the seconds waited; ValueError if
        `old_address` is not this group's master, RedisProcessError after `timeout`."""
        old_address = tuple(old_address)
        if self.server_at(old_address) is not self.master:
            raise ValueError(f"{old_address!r} is not the master of {self!r}")
        began = time.monotonic()
        deadline = began + timeout
        while True:
            answers = self._sentinel_answers()
            addresses = set(answers.values())
            if len(addresses) == 1 and len(answers) >= QUORUM:
                (address,) = addresses
                if isinstance(address, tuple) and address != old_address:
                    new = self.server_at(address)
                    with contextlib.suppress(redis.RedisError):
                        if new.running and new.info()["role"] == "master":
                            self.master, self.replica = new, self.master
                            return Failover(new, time.monotonic() - began)
            if time.monotonic() > deadline:
                raise self._error(
                    f"no failover from {old_address} within {timeout:g} s; "
                    f"the sentinels say {answers}"
                )
            time.sleep(POLL_INTERVAL)

    def problems(self) -> list[str]:
        """What keeps the group from being healthy, as seen now; empty when it is. Healthy:
        every process running, `master` a master with `replica` synced and online, and
        every sentinel naming `master`, up, with `replica` up and two other sentinels."""
        problems = [f"{p.name} is not running" for p in self.processes if not p.running]
        problems += [f"{p.name} is paused" for p in self.processes if p.paused]
        if problems:
            return problems
        master, replica = self.master, self.replica
        try:
            info = master.info()
            if info["role"] != "master":
                problems.append(f"master {master.port} has role {info['role']}")
            replicas = [info[k] for k in info if re.fullmatch(r"slave\d+", k)]
            if [(r["port"], r["state"]) for r in replicas] != [(replica.port, "online")]:
                problems.append(f"master {master.port} has replicas {replicas}")
            info = replica.info()
            if info.get("master_port") != master.port or info["master_link_status"] != "up":
                problems.append(f"replica {replica.port}: {info}")
        except redis.RedisError as e:
            problems.append(f"servers: {e!r}")
        for sentinel in self.sentinels:
            try:
                with sentinel.client() as c:
                    state = c.sentinel_master(self.name)
                    replicas = c.sentinel_slaves(self.name)
                    others = c.sentinel_sentinels(self.name)
            except redis.RedisError as e:
                problems.append(f"{sentinel.name}: {e!r}")
                continue
            if (state["ip"], state["port"]) != master.address or _flags(state) != {"master"}:
                problems.append(
                    f"{sentinel.name} sees master {state['ip']}:{state['port']} "
                    f"flags {state['flags']}"
                )
            seen = [(r["ip"], r["port"], ",".join(sorted(_flags(r)))) for r in replicas]
            if seen != [(HOST, replica.port, "slave")]:
                problems.append(f"{sentinel.name} sees replicas {seen}")
            ports = sorted(s["port"] for s in others if _flags(s) == {"sentinel"})
            expected = sorted(s.port for s in self.sentinels if s is not sentinel)
            if ports != expected:
                problems.append(f"{sentinel.name} sees sentinels up on {ports}, not {expected}")
        return problems

    def wait_until_healthy(self, timeout: float = HEALTHY_TIMEOUT) -> float:
        """Wait until problems() is empty; the seconds it took. RedisProcessError, with the
        problems left and the logs' tails, after `timeout`."""
        began = time.monotonic()
        deadline = began + timeout
        while problems := self.problems():
            if time.monotonic() > deadline:
                raise self._error(f"not healthy after {timeout:g} s:\n  " + "\n  ".join(problems))
            time.sleep(POLL_INTERVAL * 5)
        return time.monotonic() - began

    def _wait(self, what: str, done, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(redis.RedisError):
                if done():
                    return
            if time.monotonic() > deadline:
                raise self._error(f"gave up after {timeout:g} s waiting for {what}")
            time.sleep(POLL_INTERVAL)
