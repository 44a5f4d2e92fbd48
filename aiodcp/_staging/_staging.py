"""Staging: state dict -> (skeleton, tensors) -> shared-memory arena -> daemon views.

The parent flattens a state dict into a *skeleton* (the containers, with each
tensor replaced by its index and each other value pre-serialised exactly as DCP
would write it) and a list of tensors. The tensors are copied into an arena
(:mod:`aiodcp._staging._arena`) allocated once per layout and reused across saves; the
daemon maps the same memory and rebuilds the state dict from tensors that
*view* it. Only the skeleton (in a memfd) and the layout (in the arena's tail)
reach the daemon; neither crosses the channel, and the bytes never do.

Functions here do blocking work (copies, pickling); the parent calls them in a
worker thread, never on the event loop.
"""

from __future__ import annotations

import array
import contextlib
import gc
import io
import pickle
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "ALIGN",
    "DTensorSlot",
    "Flat",
    "Layout",
    "MeshSpec",
    "PickledLeaf",
    "TensorSpec",
    "dumps_skeleton",
    "dumps_specs",
    "flatten",
    "gc_paused",
    "quick_switching",
    "rebuild",
    "specs_of",
]

ALIGN = 64


# ------------------------------------------------------------------ skeleton
@dataclass(frozen=True)
class TensorSpec:
    """Where one staged tensor lives in its arena: byte offset, dtype name, shape."""

    offset: int
    nbytes: int
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class MeshSpec:
    device_type: str
    mesh: list[Any]
    dim_names: tuple[str, ...] | None


@dataclass(frozen=True)
class DTensorSlot:
    """Placeholder for a DTensor: its local shard is tensor ``index``."""

    index: int
    mesh: MeshSpec
    placements: tuple[Any, ...]
    shape: tuple[int, ...]
    stride: tuple[int, ...]


@dataclass(frozen=True)
class PickledLeaf:
    """A non-tensor value, already serialised with ``torch.save`` as DCP writes it."""

    data: bytes


@dataclass(frozen=True)
class Layout:
    """Dtype and shape of each tensor, compactly: no Python object per tensor.

    ``dims`` holds, per tensor, its number of dimensions then each size (int64).
    Two layouts compare in two C calls (a tuple of shared dtype objects and a
    ``bytes``), and building one leaves nothing behind for the cyclic garbage
    collector: a layout of 100,000 ``(dtype, torch.Size)`` tuples made every
    save set off a young-generation collection that held the GIL for 50 ms.
    """

    dtypes: tuple[torch.dtype, ...]
    dims: bytes

    def __len__(self) -> int:
        return len(self.dtypes)

    def __iter__(self) -> Iterator[tuple[torch.dtype, tuple[int, ...]]]:
        dims = array.array("q", self.dims)
        at = 0
        for dtype in self.dtypes:
            ndim = dims[at]
            yield dtype, tuple(dims[at + 1 : at + 1 + ndim])
            at += 1 + ndim


_CHUNK = 1024  # items a container holds before it pickles in interruptible pieces


class _Items(dict):  # type: ignore[type-arg]
    """A large skeleton dict. It unpickles as a plain ``dict``, but its items reach
    the pickler through a Python generator, so the interpreter can hand the GIL to
    the event loop's thread between items (a plain dict of 100,000 entries pickles
    in one C call of ~30 ms that nothing can interrupt)."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (dict, (), None, None, _one_by_one(dict.items(self)))


class _List(list):  # type: ignore[type-arg]
    """A large skeleton list: see :class:`_Items`."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (list, (), None, _one_by_one(list.__iter__(self)))


def _one_by_one(items: Iterable[Any]) -> Iterator[Any]:
    # A plain ``yield`` (not ``yield from``): CPython checks for a pending GIL
    # hand-off when the generator resumes after a ``yield``.
    for item in items:  # noqa: UP028
        yield item


@dataclass
class Flat:
    """A flattened state dict.

    In ``skeleton`` every plain tensor is replaced by its index (a bare ``int``:
    every other non-container value is a :class:`PickledLeaf`, so an ``int`` is
    never ambiguous, and a skeleton of 100,000 tensors pickles in milliseconds).
    ``layout`` -- dtype and shape of each tensor -- decides whether an arena fits.
    """

    skeleton: dict[str, Any]
    tensors: list[torch.Tensor]
    layout: Layout


def _path(keys: list[object]) -> str:
    return "state_dict" + "".join(f"[{k!r}]" for k in keys)


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def flatten(state_dict: Mapping[str, Any]) -> Flat:
    """Split ``state_dict`` into skeleton and tensors (blocking: runs user ``state_dict()``).

    Top-level values with ``state_dict()``/``load_state_dict()`` (DCP's
    ``Stateful``) are replaced by their state dict, exactly as ``dcp.save`` does.
    Any other non-tensor value is serialised now, so a value that cannot cross
    to the daemon fails here with a :class:`TypeError` naming its key path.
    Per tensor it does a few attribute reads and nothing else.
    """
    if not isinstance(state_dict, Mapping):
        hint = '; did you mean {"model": model}?' if hasattr(state_dict, "state_dict") else ""
        raise TypeError(f"state_dict must be a mapping, not {type(state_dict).__name__}{hint}")
    tensors: list[torch.Tensor] = []
    dtypes: list[torch.dtype] = []
    dims = array.array("q")
    keys: list[object] = []
    dtensor_cls = _dtensor_class()
    strided = torch.strided

    def tensor(value: torch.Tensor) -> Any:
        if type(value) in _PLAIN:
            if value.layout is not strided or value.is_quantized:
                raise TypeError(f"{_path(keys)}: only dense strided tensors can be staged")
            tensors.append(value)  # no detach(): the copy runs under no_grad
            dtypes.append(value.dtype)
            dims.append(value.dim())
            dims.extend(value.shape)
            return len(tensors) - 1
        if dtensor_cls is not None and isinstance(value, dtensor_cls):
            local = value.to_local()  # type: ignore[attr-defined]
            tensors.append(local)
            dtypes.append(local.dtype)
            dims.append(local.dim())
            dims.extend(local.shape)
            mesh = value.device_mesh  # type: ignore[attr-defined]
            return DTensorSlot(
                index=len(tensors) - 1,
                mesh=MeshSpec(mesh.device_type, mesh.mesh.tolist(), mesh.mesh_dim_names),
                placements=tuple(value.placements),  # type: ignore[attr-defined]
                shape=tuple(value.shape),
                stride=tuple(value.stride()),
            )
        raise TypeError(
            f"{_path(keys)}: tensor subclass {type(value).__name__} is not supported "
            "(plain tensors and DTensor are)"
        )

    def walk(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return tensor(value)
        if isinstance(value, Mapping):
            # Sent as a plain dict whatever its class (an OrderedDict, a dict subclass
            # defined in the training script that the daemon could not import): DCP's
            # own traversal sees only its items, and keys only as str(key).
            out = _Items() if len(value) > _CHUNK else {}
            for k, v in value.items():
                if type(k) is not str and type(k) is not int:
                    k = str(k)  # DCP's path holds str(key) anyway
                if type(v) in _PLAIN and v.layout is strided and not v.is_quantized:
                    tensors.append(v)  # the common case, inline: a dict of tensors
                    dtypes.append(v.dtype)
                    dims.append(v.dim())
                    dims.extend(v.shape)
                    out[k] = len(tensors) - 1
                    continue
                keys.append(k)
                out[k] = walk(v)
                keys.pop()
            return out
        if isinstance(value, list) and not _dcp_terminal(value):
            items = _List() if len(value) > _CHUNK else []
            for i, v in enumerate(value):
                keys.append(i)
                items.append(walk(v))
                keys.pop()
            return items
        # Anything else is one DCP leaf, written as torch.save bytes -- exactly the
        # values DCP's own traversal stops at (tuples, lists holding no tensor/dict).
        buf = io.BytesIO()
        try:
            torch.save(value, buf)
        except Exception as exc:
            raise TypeError(
                f"{_path(keys)} ({type(value).__name__}) cannot be sent to the checkpoint "
                f"daemon: {exc}"
            ) from exc
        return PickledLeaf(buf.getvalue())

    skeleton: dict[str, Any] = _Items() if len(state_dict) > _CHUNK else {}
    for key, value in state_dict.items():
        if not isinstance(key, str):
            raise TypeError(f"state_dict keys must be str, got {key!r}")
        if _is_stateful(value):
            value = value.state_dict()
        keys.append(key)
        skeleton[key] = walk(value)
        keys.pop()
    return Flat(skeleton, tensors, Layout(tuple(dtypes), dims.tobytes()))


_gc_lock = threading.Lock()
_gc_pausers = 0
_gc_was_enabled = False


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause Python's automatic garbage collection while staging (nested-safe).

    Flattening a state of 100,000 tensors allocates enough small objects to set off
    full collections, and each one walks the whole heap holding the GIL: 300-600 ms
    in which the event loop's thread cannot run. Collections resume afterwards; a
    collector the user had disabled stays disabled.
    """
    global _gc_pausers, _gc_was_enabled
    with _gc_lock:
        if _gc_pausers == 0:
            _gc_was_enabled = gc.isenabled()
            gc.disable()
        _gc_pausers += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_pausers -= 1
            if _gc_pausers == 0 and _gc_was_enabled:
                gc.enable()


_switch_lock = threading.Lock()
_switchers = 0
_user_interval = 0.005


@contextlib.contextmanager
def quick_switching(interval: float = 0.001) -> Iterator[None]:
    """Let the interpreter pass the GIL every ``interval`` seconds while staging.

    Staging runs Python code per tensor in a worker thread. Each time the event
    loop's thread wants the GIL back (after every ``select``), it waits for the
    switch interval, 5 ms by default, and an iteration of the loop can wait twice:
    ~11 ms of lag. A shorter interval for the length of the copy bounds that wait.
    The user's interval is restored when the last staging ends (nested-safe).
    """
    global _switchers, _user_interval
    with _switch_lock:
        if _switchers == 0:
            _user_interval = sys.getswitchinterval()
            sys.setswitchinterval(min(interval, _user_interval))
        _switchers += 1
    try:
        yield
    finally:
        with _switch_lock:
            _switchers -= 1
            if _switchers == 0:
                sys.setswitchinterval(_user_interval)


def _is_stateful(value: Any) -> bool:
    """DCP's ``Stateful`` test, without the runtime Protocol check (~25 us a value)."""
    if isinstance(value, torch.Tensor):
        return False
    return callable(getattr(value, "state_dict", None)) and callable(
        getattr(value, "load_state_dict", None)
    )


def _dcp_terminal(value: Any) -> bool:
    """DCP's rule (``_traverse.traverse_state_dict``) for where traversal stops."""
    if isinstance(value, Mapping):
        return False
    if not isinstance(value, list):
        return True
    for entry in value:
        if isinstance(entry, (Mapping, list)) and not _dcp_terminal(entry):
            return False
        if isinstance(entry, torch.Tensor):
            return False
    return True


def _dtensor_class() -> type | None:
    """DTensor, if the program has imported it -- else no value can be one. Never
    imported here: the first import of ``torch.distributed.tensor`` takes ~2 s and held
    the event loop's thread for ~450 ms in a first save's copy."""
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None) if module is not None else None


def specs_of(layout: Layout) -> tuple[tuple[TensorSpec, ...], int]:
    """Pack tensors at ``ALIGN``-byte offsets; return their specs and the bytes they span."""
    specs = []
    offset = 0
    for dtype, shape in layout:
        numel = 1
        for d in shape:
            numel *= d
        nbytes = numel * dtype.itemsize
        specs.append(TensorSpec(offset, nbytes, str(dtype), shape))
        offset += -(-nbytes // ALIGN) * ALIGN
    return tuple(specs), offset


def dumps_skeleton(skeleton: dict[str, Any]) -> bytes:
    return pickle.dumps(skeleton, protocol=pickle.HIGHEST_PROTOCOL)


def dumps_specs(specs: tuple[TensorSpec, ...]) -> bytes:
    """Pickle an arena's specs item by item (a list when loaded): one C call over
    100,000 of them held the GIL, and the event loop, for ~400 ms on a first save."""
    return pickle.dumps(_List(specs), protocol=pickle.HIGHEST_PROTOCOL)


def rebuild(
    skeleton: dict[str, Any],
    views: list[torch.Tensor],
    mesh_factory: Callable[[MeshSpec], Any] | None = None,
) -> dict[str, Any]:
    """Turn a skeleton back into a state dict whose tensors are ``views``."""
    if not views and _has_slots(skeleton):
        raise ValueError("skeleton names tensors but the arena has none")

    def walk(value: Any) -> Any:
        if type(value) is int:
            return views[value]
        if isinstance(value, DTensorSlot):
            from torch.distributed.tensor import DTensor

            if mesh_factory is None:
                raise ValueError("a DTensor needs a process group in the daemon")
            return DTensor.from_local(
                views[value.index],
                mesh_factory(value.mesh),
                list(value.placements),
                run_check=False,
                shape=torch.Size(value.shape),
                stride=value.stride,
            )
        if isinstance(value, dict):
            return {k: walk(v) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v) for v in value]
        return value

    return {k: walk(v) for k, v in skeleton.items()}


def _has_slots(value: Any) -> bool:
    if type(value) is int or isinstance(value, DTensorSlot):
        return True
    if isinstance(value, dict):
        return any(_has_slots(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_slots(v) for v in value)
    return False
