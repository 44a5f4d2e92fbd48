"""DCP's per-tensor records written from templates are byte for byte what torch.save
writes, for every kind of tensor, and load back bit-exact; anything unusual goes
through torch.save itself."""

from __future__ import annotations

import io
import threading
from collections.abc import Callable
from typing import Any

import pytest
import torch

from aiodcp._daemon import _records


class _Sink:
    def __init__(self) -> None:
        self.buf = io.BytesIO()

    def write(self, data: Any) -> int:
        return self.buf.write(memoryview(data).cast("B"))

    def flush(self) -> None:
        pass


def _in_writer_thread(fn: Callable[[], Any]) -> Any:
    """Run fn in a thread with torch.save's CRC-32 off, as aiodcp's writer threads."""
    out: list[Any] = []

    def run() -> None:
        torch.serialization.set_crc32_options(False)  # thread-local
        try:
            out.append(fn())
        except BaseException as exc:
            out.append(exc)

    t = threading.Thread(target=run)
    t.start()
    t.join()
    if isinstance(out[0], BaseException):
        raise out[0]
    return out[0]


def _record(t: torch.Tensor) -> bytes:
    sink = _Sink()
    _records.write_tensor(t, sink)
    return sink.buf.getvalue()


def _saved(t: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    torch.save(t, buf)
    return buf.getvalue()


def _kinds() -> list[Callable[[float], torch.Tensor]]:
    return [
        lambda v: torch.full((4,), v),
        lambda v: torch.full((3, 5), v, dtype=torch.bfloat16),
        lambda v: torch.full((7,), v != 0),
        lambda v: torch.tensor(int(v)),
        lambda v: torch.full((2, 2), complex(v, -v), dtype=torch.complex64),
        lambda v: torch.full((6,), v).to(torch.float8_e4m3fn),
        lambda v: torch.full((3, 4), v).t(),  # non-contiguous, storage == its bytes
        lambda v: torch.empty(0),
        lambda v: torch.empty(2, 0, 3, dtype=torch.int16),
        lambda v: torch.full((_records.MAX_TEMPLATED,), int(v) % 256, dtype=torch.uint8),
        lambda v: torch.full((_records.MAX_TEMPLATED + 1,), int(v) % 256, dtype=torch.uint8),
    ]


def _bytes_of(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


@pytest.mark.parametrize("kind", range(len(_kinds())))
def test_records_are_what_torch_save_writes(kind: int) -> None:
    make = _kinds()[kind]

    def check() -> None:
        for v in (1.0, 2.0, 3.0):  # the first learns the template, the others use it
            t = make(v)
            raw = _record(t)
            assert raw == _saved(t)
            back = torch.load(io.BytesIO(raw), weights_only=True)
            assert back.dtype == t.dtype and back.shape == t.shape
            assert back.stride() == t.stride()
            assert torch.equal(_bytes_of(back), _bytes_of(t))

    _in_writer_thread(check)


def test_after_the_first_record_of_a_kind_torch_save_is_not_called(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = []
    real = torch.save
    monkeypatch.setattr(torch, "save", lambda *a, **k: (calls.append(1), real(*a, **k))[1])

    def many() -> list[bytes]:
        return [_record(torch.full((16,), float(i))) for i in range(1000)]

    records = _in_writer_thread(many)
    assert len(calls) <= 1
    assert torch.load(io.BytesIO(records[-1]), weights_only=True)[0] == 999.0


def test_templated_records_need_no_numpy(monkeypatch: pytest.MonkeyPatch) -> None:
    """A plain install has no numpy (torch does not depend on it): a record from a
    template writes the storage's bytes without ``Tensor.numpy``."""

    def no_numpy(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("Numpy is not available")

    monkeypatch.setattr(torch.Tensor, "numpy", no_numpy)

    def both() -> list[bytes]:
        kind = (7, 3)  # a shape of its own: the first record learns, the second uses it
        return [_record(torch.full(kind, float(i))) for i in range(2)] + [
            _saved(torch.full(kind, 1.0))
        ]

    _, second, expected = _in_writer_thread(both)
    assert second == expected
    assert torch.equal(torch.load(io.BytesIO(second), weights_only=True), torch.full((7, 3), 1.0))


def test_with_crc_on_or_an_unusual_tensor_torch_save_does_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A thread that computes CRC-32 (each record's differs), a tensor that needs grad,
    a subclass: never templated."""
    calls = []
    real = torch.save
    monkeypatch.setattr(torch, "save", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    assert torch.serialization.get_crc32_options()  # this (main) thread: on
    for i in range(3):
        t = torch.full((5,), float(i))
        assert _record(t) == real_bytes(real, t)
    assert len(calls) == 3

    def unusual() -> None:
        p = torch.nn.Parameter(torch.ones(3))
        for _ in range(2):
            assert torch.equal(torch.load(io.BytesIO(_record(p)), weights_only=True), p)
        leaf = torch.ones(3, requires_grad=True)
        for _ in range(2):
            _record(leaf)

    calls.clear()
    _in_writer_thread(unusual)
    assert len(calls) == 4


def real_bytes(save: Callable[..., None], t: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    save(t, buf)
    return buf.getvalue()


def test_a_thread_with_another_storage_alignment_gets_its_own_template() -> None:
    """torch's storage_alignment is per thread, like the CRC option: a template learnt
    under one alignment is never used under another."""
    from torch.utils.serialization import config

    def at(alignment: int) -> list[bool]:
        with config.patch({"save.storage_alignment": alignment}):
            return [_record(t) == _saved(t) for t in (torch.ones(3), torch.zeros(3))]

    assert _in_writer_thread(lambda: at(64) + at(4096) + at(64)) == [True] * 6


def test_more_kinds_than_the_table_holds_keeps_the_first_ones(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Past _MAX_KINDS kinds, new kinds go through torch.save; the known ones stay
    templated (clearing the table would miss on every record of every save)."""
    monkeypatch.setattr(_records, "_templates", {})
    monkeypatch.setattr(_records, "_MAX_KINDS", 10)
    calls = []
    real = torch.save
    monkeypatch.setattr(torch, "save", lambda *a, **k: (calls.append(1), real(*a, **k))[1])

    def save_all() -> None:
        for n in range(1, 21):  # 20 kinds: 20 sizes
            t = torch.full((n,), float(n))
            assert _record(t) == real_bytes(real, t)

    _in_writer_thread(save_all)
    assert len(calls) == 20
    calls.clear()
    _in_writer_thread(save_all)
    assert len(calls) == 10  # the first 10 kinds are templated
