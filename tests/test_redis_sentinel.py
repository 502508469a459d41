"""The Redis servers and Sentinel groups that failover tests build on do what they claim:
the sentinels agree on the master and see the replica; writes replicate; a killed master
fails over to the replica, which redis-py's Sentinel client follows; the old master,
restarted, becomes a replica of the new one; bad input fails loudly."""

import os
import time

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis.sentinel import MasterNotFoundError, Sentinel

from tests.redis_sentinel import RedisProcessError, RedisServer, SentinelGroup

pytest_plugins = ["tests.sentinel"]
pytestmark = pytest.mark.slow

MASTER_NAME = "mymaster"  # the fixtures' groups (tests/sentinel.py)

# down-after-milliseconds (1 s), the vote, and the promotion take 2-3 s; a split vote
# is retried after twice failover-timeout (6 s).
FAILOVER_WITHIN = 12.0
# A restarted old master is converted by the sentinels on their second INFO of it, which
# they send every 10 s to a server they take for a healthy replica.
REJOIN_WITHIN = 20.0
# No retries inside redis-py: the test's own loop sees, and times, every failure.
NO_RETRY = Retry(NoBackoff(), 0)


def running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def sentinel_client(group: SentinelGroup) -> Sentinel:
    return Sentinel(
        group.sentinel_addresses(),
        socket_timeout=0.5,
        socket_connect_timeout=0.5,
        retry=NO_RETRY,
        decode_responses=True,
    )


def write_acked_by_replica(group: SentinelGroup, key: str, value: str) -> None:
    with group.master.client() as client:
        client.set(key, value)
        assert client.wait(1, 2000) == 1, group.log_tail()


# --- the shared group ---------------------------------------------------------------------


def test_the_sentinels_report_the_master_and_see_the_replica_and_each_other(sentinel_group):
    assert sentinel_group.master_address() == sentinel_group.master.address
    for sentinel in sentinel_group.sentinels:
        with sentinel.client() as client:
            # Sent as two words: redis-py would turn the reply of "SENTINEL CKQUORUM" into True.
            quorum = client.execute_command("SENTINEL", "CKQUORUM", MASTER_NAME)
            assert quorum.startswith("OK 3 usable Sentinels"), quorum
            replicas = client.sentinel_slaves(MASTER_NAME)
            assert [(r["port"], r["master-link-status"]) for r in replicas] == [
                (sentinel_group.replica.port, "ok")
            ]
            assert len(client.sentinel_sentinels(MASTER_NAME)) == 2


def test_a_write_on_the_master_is_on_the_replica_which_refuses_writes(sentinel_group):
    write_acked_by_replica(sentinel_group, "agent:1", "idle")

    with sentinel_group.replica.client() as replica:
        assert replica.get("agent:1") == "idle"
        with pytest.raises(redis.ReadOnlyError):
            replica.set("agent:1", "busy")


def test_the_shared_group_is_handed_on_healthy_after_a_test_pauses_or_kills_its_servers(
    sentinel_group_session, record_sentinel_timing
):
    group = sentinel_group_session
    write_acked_by_replica(group, "left:behind", "1")
    group.replica.pause()
    assert group.reset() == "healthy"
    with group.replica.client() as replica:
        assert replica.dbsize() == 0

    old_ports = {p.port for p in group.processes}
    group.kill_master()
    began = time.monotonic()
    assert group.reset() == "rebuilt"
    record_sentinel_timing("rebuild after a killed master", time.monotonic() - began)
    assert group.problems() == []
    assert not old_ports & {p.port for p in group.processes}


def test_a_wrong_master_name_fails_loudly(sentinel_group):
    sentinel = sentinel_client(sentinel_group)
    began = time.monotonic()
    with pytest.raises(MasterNotFoundError, match="no-such-master"):
        sentinel.master_for("no-such-master").ping()
    assert time.monotonic() - began < 2
    with sentinel_group.sentinels[0].client() as client:
        with pytest.raises(redis.ResponseError, match="No such master"):
            client.sentinel_master("no-such-master")
    with pytest.raises(ValueError, match="master name"):
        SentinelGroup("no such master")
    with pytest.raises(ValueError, match="is not the master"):
        sentinel_group.wait_for_failover(sentinel_group.replica.address, timeout=1)


# --- failover, in groups of the test's own -----------------------------------------------


def test_killing_the_master_fails_over_to_the_replica_with_its_data(
    fresh_sentinel_group, record_sentinel_timing
):
    group = fresh_sentinel_group
    replica = group.replica
    write_acked_by_replica(group, "agent:1", "idle")

    new_master, elapsed = group.wait_for_failover(group.kill_master())

    record_sentinel_timing("failover", elapsed)
    print(f"failover took {elapsed:.2f} s")
    assert elapsed < FAILOVER_WITHIN, group.log_tail()
    assert new_master is replica is group.master
    assert group.master_address() == replica.address
    with new_master.client() as client:
        assert client.get("agent:1") == "idle"
        client.set("agent:1", "busy")  # writable: no longer a replica


def test_redis_py_sentinel_client_follows_the_new_master_after_failover(
    fresh_sentinel_group, record_sentinel_timing
):
    group = fresh_sentinel_group
    client = sentinel_client(group).master_for(MASTER_NAME)
    client.set("before", "1")
    assert client.wait(1, 2000) == 1

    old_address = group.kill_master()
    killed_at = time.monotonic()
    failures = []
    while True:
        try:
            client.set("after", "2")
            break
        except (redis.ConnectionError, redis.TimeoutError) as e:
            failures.append(e)
        if time.monotonic() - killed_at > FAILOVER_WITHIN:
            pytest.fail(
                f"redis-py still failing {FAILOVER_WITHIN:g} s after the kill: "
                f"{failures[-1]!r}\n{group.log_tail()}"
            )
        time.sleep(0.05)
    gap = time.monotonic() - killed_at

    record_sentinel_timing(f"redis-py gap ({len(failures)} failed commands)", gap)
    print(f"redis-py commands failed for {gap:.2f} s after the kill ({len(failures)} failures)")
    assert failures, "the first command after the kill should fail: the master is gone"
    new_master, _ = group.wait_for_failover(old_address)
    assert client.connection_pool.get_master_address() == new_master.address
    with new_master.client() as direct:
        assert (direct.get("before"), direct.get("after")) == ("1", "2")


def test_the_old_master_restarted_becomes_a_replica_of_the_new_one(
    fresh_sentinel_group, record_sentinel_timing
):
    group = fresh_sentinel_group
    old_master = group.master
    new_master, _ = group.wait_for_failover(group.kill_master())
    with new_master.client() as client:
        client.set("written:after-failover", "1")

    old_master.start()  # as a master: its configuration names no master
    rejoined_in = group.wait_until_healthy(REJOIN_WITHIN)

    record_sentinel_timing("old master rejoins as replica", rejoined_in)
    print(f"the restarted old master was a replica after {rejoined_in:.2f} s")
    assert group.replica is old_master
    info = old_master.info()
    assert (info["role"], info["master_port"]) == ("slave", new_master.port)
    write_acked_by_replica(group, "written:after-rejoin", "2")
    with old_master.client() as client:
        assert client.mget("written:after-failover", "written:after-rejoin") == ["1", "2"]


# --- a single server ----------------------------------------------------------------------


def test_a_redis_server_keeps_its_append_only_file_through_kill_and_pauses_and_stops_clean():
    with RedisServer(appendonly=True, appendfsync="always") as server:
        with server.client() as client:
            client.set("k", "v")
        killed = server.pid
        server.kill()
        assert not running(killed)

        server.start()
        with server.client() as client:
            assert client.get("k") == "v"
        server.pause()
        with server.client(socket_timeout=0.3) as client, pytest.raises(redis.TimeoutError):
            client.ping()
        server.resume()
        with server.client() as client:
            assert client.ping()
        pid, root = server.pid, server.root
    assert not running(pid)
    assert not root.exists()


def test_a_redis_server_refuses_an_unknown_directive_loudly():
    with pytest.raises(RedisProcessError, match="Bad directive"):
        RedisServer(no_such_directive="yes").start()
