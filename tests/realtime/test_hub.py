"""realtime.hub's routing of stream entries, with recording connections."""

from realtime.history import Entry
from realtime.hub import HISTORY_GAP, SHAPE_ONLY, Routes, numbered


class Recorder:
    """What the hub needs of a connection; records what it is given."""

    token_id = None

    def __init__(self):
        self.frames: list[tuple[str, str, int]] = []
        self.resyncs: list[tuple[int, str]] = []

    def push(self, agent_id, frame, committed, seq):
        self.frames.append((agent_id, frame, seq))

    def resync(self, seq, reason):
        self.resyncs.append((seq, reason))

    def belief_access(self, agent_id):
        return SHAPE_ONLY


def entry(last: int, previous: int, agents=("a",)) -> Entry:
    frames = [f'{{"agent_id":"{a}"}}' for a in agents]
    return Entry(last, previous, list(agents), frames, [None] * len(agents), 0.0)


def watching(last_seq):
    routes, conn = Routes(last_seq), Recorder()
    routes.conns.add(conn)
    routes.stream.add(conn)
    return routes, conn


def test_entries_that_follow_are_numbered_and_delivered():
    routes, conn = watching(10)
    routes.route(entry(13, 10, agents=("a", "b", "c")))
    routes.route(entry(20, 13))
    assert [seq for _, _, seq in conn.frames] == [11, 12, 13, 20]
    assert conn.frames[0][1] == numbered('{"agent_id":"a"}', 11) == '{"seq":11,"agent_id":"a"}'
    assert conn.resyncs == [] and routes.last_seq == 20


def test_an_entry_that_does_not_follow_resyncs_first():
    routes, conn = watching(10)
    routes.route(entry(30, 25))
    assert conn.resyncs == [(29, HISTORY_GAP)]
    assert [seq for _, _, seq in conn.frames] == [30]


def test_a_marked_gap_resyncs_even_without_a_position():
    routes, conn = watching(None)
    routes.route(entry(30, -1))
    assert conn.resyncs == [(29, HISTORY_GAP)]


def test_the_first_entry_of_a_new_stream_is_taken_as_it_is():
    routes, conn = watching(None)
    routes.route(entry(5, 0))
    assert conn.resyncs == [] and routes.last_seq == 5


def test_an_entry_read_for_replaced_routes_is_ignored_not_a_gap():
    # The read began for routes whose connections all left; new routes, positioned at a
    # later tip, got its answer (connections churning in a reconnect storm).
    routes, conn = watching(50)
    routes.route(entry(40, 30))
    assert conn.frames == [] and conn.resyncs == [] and routes.last_seq == 50
