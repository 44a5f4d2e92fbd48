"""The sans-IO protocol: frames, validation, the state table. Bytes only, no I/O."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aiodcp import ProtocolError
from aiodcp._wire import _protocol as p


def _serving_pair() -> tuple[p.Connection, p.Connection]:
    parent, daemon = p.Connection(p.Role.PARENT), p.Connection(p.Role.DAEMON)
    for msg in (p.Hello(123), p.Ready(0, 1)):
        parent.receive_data(daemon.send(msg))
        assert parent.next_event() == msg
    return parent, daemon


def _deliver(src: p.Connection, dst: p.Connection, msg: p.Message) -> p.Message:
    dst.receive_data(src.send(msg))
    ev = dst.next_event()
    assert isinstance(ev, p.Message)
    return ev


ALL_MESSAGES = [
    p.Hello(7),
    p.Ready(1, 2),
    p.InitFailed("RuntimeError", "boom", "tb"),
    p.Arena(3, 4096, 8192, 100),
    p.ReleaseArena(3),
    p.Save(0, 10, 3, 1234, True),
    p.Cancel(0),
    p.Progress(0, "writing", 5, 10),
    p.Saved(0, 10, "/x/step_10", 16, 0.5),
    p.SaveFailed(0, "OSError", "disk full", "tb", False),
    p.Terminate(),
    p.Log(20, "aiodcp", "hello ünïcode"),
]


@pytest.mark.parametrize("msg", ALL_MESSAGES, ids=lambda m: type(m).__name__)
def test_every_message_round_trips_through_a_frame(msg: p.Message) -> None:
    """encode_frame/decode_frame are inverse for every message kind."""
    frame = p.encode_frame(msg)
    decoded, used = p.decode_frame(frame + b"trailing")  # type: ignore[misc]
    assert decoded == msg and used == len(frame)


def test_partial_frames_need_more_data_byte_by_byte() -> None:
    """A frame split at every byte boundary decodes exactly once, at the end."""
    parent, daemon = _serving_pair()
    frame = daemon.send(p.Log(10, "n", "x" * 100))
    for b in frame[:-1]:
        parent.receive_data(bytes([b]))
        assert parent.next_event() is p.NEED_DATA
    parent.receive_data(frame[-1:])
    assert parent.next_event() == p.Log(10, "n", "x" * 100)


def test_two_frames_in_one_read_yield_two_events() -> None:
    parent, daemon = _serving_pair()
    parent.receive_data(daemon.send(p.Log(10, "a", "1")) + daemon.send(p.Log(10, "b", "2")))
    assert [parent.next_event(), parent.next_event(), parent.next_event()] == [
        p.Log(10, "a", "1"),
        p.Log(10, "b", "2"),
        p.NEED_DATA,
    ]


def test_handshake_order_is_enforced() -> None:
    """The daemon must say Hello before Ready, and the parent may not save before Ready."""
    parent = p.Connection(p.Role.PARENT)
    parent.receive_data(p.encode_frame(p.Ready(0, 1)))
    with pytest.raises(ProtocolError, match="READY in state HANDSHAKE"):
        parent.next_event()
    fresh = p.Connection(p.Role.PARENT)
    with pytest.raises(ProtocolError, match="ARENA"):
        fresh.send(p.Arena(1, 10))


def test_role_table_rejects_messages_from_the_wrong_side() -> None:
    parent, daemon = _serving_pair()
    with pytest.raises(ProtocolError):
        parent.send(p.Saved(0, 1, "x", 1, 0.0))
    with pytest.raises(ProtocolError):
        daemon.send(p.Terminate())


def test_requests_must_be_fresh_and_replies_must_match_open_requests() -> None:
    parent, daemon = _serving_pair()
    _deliver(parent, daemon, p.Arena(1, 64))
    _deliver(parent, daemon, p.Save(5, 0, 1, 10))
    with pytest.raises(ProtocolError, match="not fresh"):
        parent.send(p.Save(5, 1, 1, 10))
    with pytest.raises(ProtocolError, match="unknown arena"):
        parent.send(p.Save(6, 1, 99, 10))
    _deliver(daemon, parent, p.Progress(5, "writing", 1, 2))
    _deliver(daemon, parent, p.Saved(5, 0, "p", 16, 0.1))
    assert parent.open_requests == frozenset()
    with pytest.raises(ProtocolError, match="not open"):
        daemon.send(p.SaveFailed(5, "E", "late"))


def test_terminate_then_clean_eof() -> None:
    """After Terminate, in-flight replies may still arrive; EOF then is clean."""
    parent, daemon = _serving_pair()
    _deliver(parent, daemon, p.Arena(1, 64))
    _deliver(parent, daemon, p.Save(0, 0, 1, 10))
    _deliver(parent, daemon, p.Terminate())
    assert parent.state is p.State.TERMINATING
    with pytest.raises(ProtocolError):
        parent.send(p.Save(1, 1, 1, 10))
    _deliver(parent, daemon, p.Cancel(0))  # a user may still cancel while it closes
    _deliver(daemon, parent, p.SaveFailed(0, "E", "cancelled", cancelled=True))
    parent.receive_data(b"")
    assert parent.next_event() == p.Closed(clean=True)


def test_eof_while_serving_is_unclean_and_eof_inside_a_frame_is_an_error() -> None:
    parent, _ = _serving_pair()
    parent.receive_data(b"")
    assert parent.next_event() == p.Closed(clean=False)
    parent2, daemon2 = _serving_pair()
    parent2.receive_data(daemon2.send(p.Log(1, "a", "b"))[:-1])
    parent2.receive_data(b"")
    with pytest.raises(ProtocolError, match="inside a frame"):
        parent2.next_event()


def _head(kind: int, hlen: int, version: int = p.PROTOCOL_VERSION) -> bytes:
    return struct.pack(">2sBBI", b"AD", version, kind, hlen)


def _frame(kind: int, body: bytes) -> bytes:
    return _head(kind, len(body)) + body


@pytest.mark.parametrize(
    "frame, match",
    [
        (b"XX" + bytes(10), "magic"),
        (_head(1, 0, version=9), "version"),
        (_head(200, 0), "unknown message kind"),
        (_head(1, p.MAX_HEADER + 1), "too large"),
        (_frame(1, b"{x}"), "not JSON"),
        (_frame(1, b"[]"), "not a JSON object"),
        (_frame(1, b'{"pid":"7"}'), "expected"),
        (_frame(1, b'{"pid":1,"evil":1}'), "unexpected"),
        (_frame(1, b"{}"), "missing"),
        (_frame(1, b'{"pid":true}'), "expected"),
    ],
)
def test_malformed_frames_raise_protocol_error(frame: bytes, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        p.decode_frame(frame)


def test_negative_sizes_are_refused_by_the_state_machine() -> None:
    parent, daemon = _serving_pair()
    with pytest.raises(ProtocolError, match="negative"):
        parent.send(p.Arena(1, -1))
    _deliver(parent, daemon, p.Arena(1, 64))
    with pytest.raises(ProtocolError, match="negative"):
        parent.send(p.Save(0, 0, 1, -5))


@settings(max_examples=200, deadline=None)
@given(
    st.integers(0, 2**62),
    st.integers(0, 2**62),
    st.integers(0, 2**62),
    st.booleans(),
    st.text(max_size=3 * p.MAX_TEXT),
)
def test_fuzz_frame_sizes_are_bounded_whatever_the_values(
    req: int, step: int, size: int, overwrite: bool, text: str
) -> None:
    """Every message is one small frame of bounded size: a save of any tensor count, any
    step and any error text (clipped by the sender) fits; nothing is silently dropped."""
    frames = [
        p.encode_frame(p.Save(req, step, req, size, overwrite)),
        p.encode_frame(p.Arena(req, size, size, size)),
        p.encode_frame(p.Saved(req, step, "/r/step_" + str(step), size, 1.5)),
        p.encode_frame(p.SaveFailed(req, "OSError", p.clip(text), p.clip(text))),
        p.encode_frame(p.Log(20, "aiodcp", p.clip(text))),
    ]
    for frame in frames:
        assert len(frame) <= p.HEADER_SIZE + p.MAX_HEADER
        decoded = p.decode_frame(frame)
        assert decoded is not None and decoded[1] == len(frame)
    assert len(frames[0]) < 200  # a Save is constant-size: no per-tensor field


def test_an_oversized_message_is_refused_at_once_not_dropped() -> None:
    """Unclipped text past the bound raises ProtocolError in the sender, synchronously."""
    _, daemon = _serving_pair()
    with pytest.raises(ProtocolError, match="header is"):
        daemon.send(p.Log(20, "x", "y" * (p.MAX_HEADER + 1)))


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_random_bytes_never_crash_the_decoder(data: bytes) -> None:
    """Random input yields events, NEED_DATA or ProtocolError -- nothing else."""
    conn = p.Connection(p.Role.DAEMON)
    conn.receive_data(data)
    try:
        for _ in range(50):
            ev = conn.next_event()
            if ev is p.NEED_DATA:
                break
    except ProtocolError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(ALL_MESSAGES), st.data())
def test_fuzz_truncated_and_mutated_frames(msg: p.Message, data: st.DataObject) -> None:
    """Every strict prefix of a valid frame is "need more data" (never an error: a frame
    may arrive in any number of pieces); the whole frame, followed by anything, decodes
    to the message and consumes exactly the frame. One with a flipped byte decodes or is
    refused with ProtocolError."""
    frame = p.encode_frame(msg)
    for cut in range(len(frame)):
        assert p.decode_frame(frame[:cut]) is None, cut
    tail = data.draw(st.binary(max_size=20))
    assert p.decode_frame(frame + tail) == (msg, len(frame))
    i = data.draw(st.integers(0, len(frame) - 1))
    mutated = bytearray(frame)
    mutated[i] ^= data.draw(st.integers(1, 255))
    try:
        p.decode_frame(bytes(mutated))
    except ProtocolError:
        pass
