"""Staging: flatten -> arena copy -> daemon-side views reproduce every tensor exactly."""

from __future__ import annotations

import gc
import io
import os
import pickle
import sys
import threading
import time

import pytest
import torch

from aiodcp._staging._arena import Arena, MappedArena
from aiodcp._staging._staging import (
    PickledLeaf,
    TensorSpec,
    dumps_skeleton,
    flatten,
    quick_switching,
    rebuild,
)


def _mapped(arena: Arena) -> MappedArena:
    return MappedArena(arena.fd, arena.nbytes, arena.layout_offset, arena.layout_nbytes)


def _round_trip(state: dict) -> dict:
    flat = flatten(state)
    arena = Arena(flat.layout)
    try:
        arena.stage(flat)
        mapped = _mapped(arena)
        out = rebuild(flat.skeleton, [t.clone() for t in mapped.views])
        mapped.release()
        return out
    finally:
        arena.close()


def test_dtypes_shapes_and_odd_layouts_survive_staging() -> None:
    """bf16/fp16/int/bool, 0-dim, empty, non-contiguous and shared-storage views stage bit-exact."""
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    state = {
        "bf16": torch.randn(5, 3).to(torch.bfloat16),
        "fp16": torch.randn(7).half(),
        "int": torch.randint(-100, 100, (3, 3), dtype=torch.int64),
        "int8": torch.randint(-100, 100, (9,), dtype=torch.int8),
        "bool": torch.rand(11) > 0.5,
        "scalar": torch.tensor(3.5),
        "empty": torch.empty(0, 4),
        "transposed": base.t(),
        "strided": base[:, ::2],
        "view_a": base[1],
        "view_b": base[1:3],
        "complex": torch.randn(3, dtype=torch.complex64),
        "nested": {"list": [torch.ones(2), 5, "text"], "tuple": (1, None)},
    }
    out = _round_trip(state)
    for key in [
        "bf16",
        "fp16",
        "int",
        "int8",
        "bool",
        "scalar",
        "empty",
        "transposed",
        "strided",
        "view_a",
        "view_b",
        "complex",
    ]:
        assert out[key].dtype == state[key].dtype, key
        assert out[key].shape == state[key].shape, key
        assert torch.equal(out[key], state[key]), key
    assert torch.equal(out["nested"]["list"][0], torch.ones(2))
    assert isinstance(out["nested"]["list"][1], PickledLeaf)
    assert torch.load(io.BytesIO(out["nested"]["list"][2].data)) == "text"
    assert torch.load(io.BytesIO(out["nested"]["tuple"].data)) == (1, None)


def test_leaves_are_where_dcp_stops_traversing() -> None:
    """Lists of plain values and tuples are one leaf each, as in DCP's own traversal."""
    flat = flatten(
        {
            "a": {
                "ints": [1, 2],
                "tup": (1.0, 2.0),
                "mixed": [torch.ones(1), 3],
                "dicts": [{"lr": 0.1}],
            }
        }
    )
    sk = flat.skeleton["a"]
    assert isinstance(sk["ints"], PickledLeaf) and isinstance(sk["tup"], PickledLeaf)
    assert isinstance(sk["mixed"], list) and type(sk["mixed"][0]) is int
    assert isinstance(sk["dicts"], list) and isinstance(sk["dicts"][0]["lr"], PickledLeaf)


def test_daemon_views_own_exactly_their_bytes() -> None:
    """Each rebuilt tensor's storage is exactly its size, so DCP's writer never clones it."""
    flat = flatten({"a": torch.randn(3, 5), "b": torch.randn(7)})
    arena = Arena(flat.layout)
    mapped = _mapped(arena)
    for t in mapped.views:
        assert t.untyped_storage().size() == t.nbytes
    mapped.release()
    arena.close()


def test_daemon_mapping_is_released_at_once_without_the_gc() -> None:
    """release() unmaps deterministically: the mapping leaves /proc/self/maps at once,
    with the garbage collector disabled and views still referenced."""
    import gc

    flat = flatten({"a": torch.randn(1 << 16)})
    arena = Arena(flat.layout)
    gc.disable()
    try:
        mapped = _mapped(arena)
        keep = mapped.views  # noqa: F841  (a lingering reference, as DCP may leave)
        start = f"{mapped.addr:x}"
        with open("/proc/self/maps") as f:
            assert any(line.startswith(start) for line in f)
        mapped.release()
        with open("/proc/self/maps") as f:
            assert not any(line.startswith(start) for line in f)
    finally:
        gc.enable()
        arena.close()


def test_staged_copy_is_independent_of_later_mutation() -> None:
    """The arena holds the values at stage() (non-zero: a fresh arena is zero-filled),
    not a view of the source."""
    t = torch.arange(1.0, 1001.0)
    u = torch.full((3, 5), -2.5, dtype=torch.float64)
    flat = flatten({"t": t, "u": u})
    arena = Arena(flat.layout)
    arena.stage(flat)
    t.add_(1)
    u.zero_()
    assert torch.equal(arena.views[0], torch.arange(1.0, 1001.0))
    assert torch.equal(arena.views[1], torch.full((3, 5), -2.5, dtype=torch.float64))
    arena.close()


def test_stateful_objects_are_replaced_by_their_state_dict() -> None:
    model = torch.nn.Linear(3, 2)
    flat = flatten({"model": model})
    assert set(flat.skeleton["model"]) == {"weight", "bias"}
    assert all(type(v) is int for v in flat.skeleton["model"].values())


@pytest.mark.parametrize(
    "value, name",
    [(threading.Lock(), "lock"), (lambda x: x, "fn"), (open(os.devnull), "file")],
)
def test_unpicklable_values_fail_with_the_key_path(value: object, name: str) -> None:
    with pytest.raises(TypeError, match=rf"state_dict\['opt'\]\['{name}'\].*cannot be sent"):
        flatten({"opt": {"ok": 1, name: value}})


def test_non_mapping_and_non_str_keys_are_type_errors() -> None:
    with pytest.raises(TypeError):
        flatten([torch.ones(1)])  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        flatten({1: torch.ones(1)})  # type: ignore[dict-item]


def test_an_arena_fits_exactly_the_same_dtypes_and_shapes() -> None:
    """Same dtypes and shapes in the same order: the arena fits (names may differ);
    any other dtype, shape or count: a new arena."""
    arena = Arena(flatten({"x": torch.zeros(4), "y": torch.zeros(2, 2)}).layout)
    assert arena.fits(flatten({"x": torch.ones(4), "y": torch.ones(2, 2)}))
    assert arena.fits(flatten({"z": torch.ones(4), "w": torch.ones(2, 2)}))
    assert not arena.fits(flatten({"x": torch.zeros(4), "y": torch.zeros(4)}))
    assert not arena.fits(flatten({"x": torch.zeros(4).half(), "y": torch.zeros(2, 2)}))
    assert not arena.fits(flatten({"x": torch.zeros(4)}))
    arena.close()


def test_offsets_are_aligned_and_disjoint() -> None:
    arena = Arena(
        flatten({f"t{i}": torch.zeros(i + 1, dtype=torch.int8) for i in range(10)}).layout
    )
    ends = 0
    for spec in arena.specs:
        assert spec.offset % 64 == 0 and spec.offset >= ends
        ends = spec.offset + spec.nbytes
    assert arena.nbytes >= ends
    arena.close()


def test_tensor_spec_outside_the_arena_is_refused() -> None:
    arena = Arena(flatten({"t": torch.zeros(1000)}).layout)
    mapped = _mapped(arena)
    with pytest.raises(ValueError):
        mapped.tensor(TensorSpec(4000, 400, "torch.float32", (100,)))
    with pytest.raises(ValueError):
        mapped.tensor(TensorSpec(0, 8, "torch.notatype", (2,)))
    mapped.release()
    arena.close()


def test_arena_has_no_name_in_dev_shm() -> None:
    before = set(os.listdir("/dev/shm"))
    arena = Arena(flatten({"t": torch.zeros(1 << 18)}).layout)
    assert not {n for n in set(os.listdir("/dev/shm")) - before if "aiodcp" in n}
    assert os.readlink(f"/proc/self/fd/{arena.fd}").startswith("/memfd:aiodcp-arena")
    arena.close()


# ------------------------------------------------- issue 11: the GIL stays passable
def _wide(n: int) -> dict[str, torch.Tensor]:
    return {f"t{i}": torch.full((2,), float(i)) for i in range(n)}


def test_flatten_leaves_no_object_per_tensor_for_the_garbage_collector() -> None:
    """A layout of N (dtype, Size) tuples left 2N tracked objects per save: the young
    generation's next collection then held the GIL (and the loop) for ~50 ms at 100k."""
    state = {"model": _wide(20_000)}
    flatten(state)  # imports, caches
    was = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        before = gc.get_count()[0]
        flat = flatten(state)
        left = gc.get_count()[0] - before
    finally:
        if was:
            gc.enable()
    assert len(flat.tensors) == 20_000
    assert left < 200, left
    assert list(flat.layout)[:2] == [(torch.float32, (2,)), (torch.float32, (2,))]
    same, other = flatten(state).layout, flatten({"model": _wide(19_999)}).layout
    assert same == flat.layout and other != flat.layout


@pytest.mark.serial
def test_a_large_skeleton_pickles_in_pieces_other_threads_can_run_between() -> None:
    """A plain 200,000-entry dict pickles in one C call that keeps every other thread
    (the event loop's) off the GIL; the skeleton's large containers pickle item by item
    and still unpickle as plain dicts and lists."""
    skeleton = flatten({"model": _wide(200_000), "list": [torch.zeros(1)] * 5000}).skeleton
    ticks: list[float] = []
    stop = threading.Event()

    def ticker() -> None:
        while not stop.is_set():
            ticks.append(time.perf_counter())
            time.sleep(0.0002)

    with quick_switching(0.0005):
        thread = threading.Thread(target=ticker)
        thread.start()
        time.sleep(0.01)
        t0 = time.perf_counter()
        blob = dumps_skeleton(skeleton)
        t1 = time.perf_counter()
        stop.set()
        thread.join()
    inside = [t for t in ticks if t0 + 0.002 < t < t1 - 0.002]
    assert t1 - t0 > 0.01  # long enough to tell
    assert len(inside) >= 5, (len(inside), t1 - t0)
    back = pickle.loads(blob)
    assert type(back) is dict and type(back["model"]) is dict and type(back["list"]) is list
    assert back["model"]["t199999"] == 199_999 and back["list"][4999] == 204_999


def test_quick_switching_restores_the_users_interval_after_the_last_one() -> None:
    user = sys.getswitchinterval()
    sys.setswitchinterval(0.004)
    try:
        with quick_switching(0.001):
            with quick_switching(0.001):
                assert sys.getswitchinterval() == pytest.approx(0.001)
            assert sys.getswitchinterval() == pytest.approx(0.001)
        assert sys.getswitchinterval() == pytest.approx(0.004)
        with quick_switching(0.01):  # never longer than the user's
            assert sys.getswitchinterval() == pytest.approx(0.004)
    finally:
        sys.setswitchinterval(user)
