"""Guards that make "mutated the state before it was staged" impossible (opt-in).

With ``save(..., overlap=True)`` the copy into shared memory runs while the
caller goes on; the caller must not change the tensors until it is done. A
:class:`Guard` hooks the things that change them -- an optimizer's ``step``, a
module's ``load_state_dict`` -- and waits there for every pending copy (or, in
strict mode, raises). The hooks run in the caller's thread: waiting blocks it
only for the rest of a copy that runs with the GIL released.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from ._handle import SaveHandle

__all__ = ["Guard"]


class Guard:
    """Hooks on optimizers and modules; :meth:`remove` takes them off."""

    def __init__(
        self,
        objects: Iterable[Any],
        pending: Callable[[], list[SaveHandle]],
        strict: bool,
        hand_over: Callable[[], None] = lambda: None,
    ) -> None:
        self._pending = pending
        self._hand_over = hand_over
        self.strict = strict
        self.waits = 0
        """How many times a hook had to wait (or, strict, refused)."""
        self._hooks: list[Any] = []
        for obj in objects:
            if isinstance(obj, torch.optim.Optimizer):
                self._hooks.append(obj.register_step_pre_hook(self._before_mutation))
            elif isinstance(obj, torch.nn.Module):
                self._hooks.append(
                    obj.register_load_state_dict_pre_hook(self._before_mutation)  # type: ignore[no-untyped-call]
                )
            else:
                raise TypeError(f"guard() takes optimizers and modules, not {type(obj).__name__}")

    def _before_mutation(self, *args: Any, **kwargs: Any) -> None:
        pending = self._pending()
        if not pending:
            self._hand_over()  # copies that finished meanwhile start persisting now
            return
        self.waits += 1
        if self.strict:
            steps = sorted(h.step for h in pending)
            raise RuntimeError(
                f"state is being mutated while save(s) of step(s) {steps} are still staging; "
                "await handle.staged() first"
            )
        for handle in pending:
            handle._staged_flag.wait()
        self._hand_over()

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()

    def __enter__(self) -> Guard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()
