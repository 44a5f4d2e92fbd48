"""Guards that make "mutated the state before it was copied" impossible (opt-in).

With ``save(..., overlap=True)`` the copy into shared memory runs while the
caller goes on; the caller must not change the tensors until it is done. A
:class:`Guard` hooks what changes them:

* an optimizer's ``step()`` waits for every pending copy (or, strict, raises);
* a module's ``forward()`` waits until the module's *buffers* are copied (they
  are copied first, so this wait is short): forward passes update buffers in
  place, as BatchNorm's running statistics;
* a module's ``load_state_dict()`` waits for every pending copy.

A copy that fails wakes every waiter; its error is logged (strict: raised from
the hooked call) and the save's handle fails with it. What no hook sees -- an
EMA updated by hand, a tensor written directly -- must wait for
``await handle.staged()``. The hooks run in the caller's thread: waiting blocks
it only for the rest of a copy that runs with the GIL released.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from typing import Any

import torch

from ._handle import SaveHandle

__all__ = ["Guard"]

log = logging.getLogger("aiodcp")


class Guard:
    """Hooks on optimizers and modules; :meth:`remove` takes them off."""

    def __init__(
        self,
        objects: Iterable[Any],
        handles: Callable[[], list[SaveHandle]],
        strict: bool,
        hand_over: Callable[[], None] = lambda: None,
        on_remove: Callable[[Guard], None] = lambda guard: None,
    ) -> None:
        self._handles = handles
        self._hand_over = hand_over
        self._on_remove = on_remove
        self.strict = strict
        self.waits = 0
        """How many times a hook had to wait (or, strict, refused)."""
        self._hooks: list[Any] = []
        self._removed = False
        self._modules: list[torch.nn.Module] = []
        objects = list(objects)
        for obj in objects:
            if not isinstance(obj, (torch.optim.Optimizer, torch.nn.Module)):
                raise TypeError(f"guard() takes optimizers and modules, not {type(obj).__name__}")
        for obj in objects:
            if isinstance(obj, torch.optim.Optimizer):
                self._hooks.append(obj.register_step_pre_hook(self._before_step))
            else:
                self._hooks.append(obj.register_load_state_dict_pre_hook(self._before_step))
                self._hooks.append(obj.register_forward_pre_hook(self._before_forward))
                self._modules.append(obj)

    def _copying(self) -> list[SaveHandle]:
        """The saves whose copy thread has started. One still waiting for its slot or its
        daemon (its ``save()`` call has not returned) is not waited for: only the event
        loop, which this hook may be holding, can start its copy."""
        return [h for h in self._handles() if h._copy is not None]

    def buffer_pointers(self) -> set[int]:
        """Storage addresses of the guarded modules' buffers (copied first)."""
        return {b.data_ptr() for m in self._modules for b in m.buffers() if b.numel()}

    def _before_step(self, *args: Any, **kwargs: Any) -> None:
        handles = self._copying()
        # the staged flag: set by the copy thread, whatever the outcome
        self._wait(handles, lambda h: h._staged_flag, "state is being mutated", "staging")
        self._report(handles)
        self._hand_over()  # copies that finished start persisting now

    def _before_forward(self, *args: Any, **kwargs: Any) -> None:
        handles = self._copying()
        self._wait(handles, lambda h: h._buffers_flag, "forward() would update buffers", "copying")
        self._report(handles)

    def _wait(
        self,
        handles: list[SaveHandle],
        flag: Callable[[SaveHandle], threading.Event],
        what: str,
        doing: str,
    ) -> None:
        """Wait until ``flag`` is set on every handle (strict: raise if one is not)."""
        pending = [h for h in handles if not flag(h).is_set()]
        if not pending:
            return
        self.waits += 1
        if self.strict:
            steps = sorted(h.step for h in pending)
            raise RuntimeError(
                f"{what} while save(s) of step(s) {steps} are still {doing}; "
                "await handle.staged() first"
            )
        for handle in pending:
            flag(handle).wait()

    def _report(self, handles: list[SaveHandle]) -> None:
        """A copy that failed is reported once: logged, or (strict) raised here."""
        failed = [h for h in handles if h._copy_error is not None and not h._copy_reported]
        for handle in failed:
            handle._copy_reported = True
            if not self.strict:
                log.error(
                    "the overlapped copy of step %d failed (the save is lost): %s: %s",
                    handle.step,
                    type(handle._copy_error).__name__,
                    handle._copy_error,
                )
        if failed and self.strict:
            error = failed[0]._copy_error
            raise RuntimeError(
                f"the overlapped copy of step {failed[0].step} failed (the save is lost): "
                f"{type(error).__name__}: {error}"
            ) from error

    def remove(self) -> None:
        if self._removed:
            return
        self._removed = True
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        self._modules.clear()
        self._on_remove(self)

    def __enter__(self) -> Guard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()
