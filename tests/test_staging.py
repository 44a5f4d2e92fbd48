"""Staging: flatten -> arena copy -> daemon-side views reproduce every tensor exactly."""

from __future__ import annotations

import io
import os
import threading

import pytest
import torch

from aiodcp._arena import Arena, MappedArena
from aiodcp._staging import PickledLeaf, TensorSpec, flatten, rebuild


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
    t = torch.zeros(1000)
    flat = flatten({"t": t})
    arena = Arena(flat.layout)
    arena.stage(flat)
    t.add_(1)
    assert torch.equal(arena.views[0], torch.zeros(1000))
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
    assert set(os.listdir("/dev/shm")) == before
    assert os.readlink(f"/proc/self/fd/{arena.fd}").startswith("/memfd:aiodcp-arena")
    arena.close()
