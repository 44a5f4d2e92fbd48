"""The checkpointer's publication: ``ckpt.publish()``, ``ckpt.publisher()``, and the
ticket ``save(publish=True)`` takes (a mixin of :class:`aiodcp.AsyncCheckpointer`).

Its :class:`aiodcp.Publisher` opens on first use, in the checkpointer's task group,
and closes with it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import anyio
import anyio.abc

from .._errors import CheckpointError
from ._parts import Parts
from ._publish import Publisher, Ticket
from ._ring import WhenFull

__all__ = ["Publishing"]

_UNSET: Any = object()


class Publishing(Parts):
    """The publication part of :class:`aiodcp.AsyncCheckpointer` (a mixin)."""

    _publisher: Publisher | None

    async def publisher(self, *, ring: int = _UNSET, when_full: WhenFull = _UNSET) -> Publisher:
        """This checkpointer's :class:`Publisher` (opened on first use, in its task group).

        Readers ``aiodcp.follow(root)`` it. Options apply when it opens (default
        ``ring=3``, ``when_full="skip"``); other options later are a ValueError. It
        closes with the checkpointer (readers' iterations then end).
        """
        self._check_open()
        if self._publisher is None:
            pub = Publisher(
                self.root,
                rank=self.rank,
                ring=3 if ring is _UNSET else ring,
                when_full="skip" if when_full is _UNSET else when_full,
            )
            self._publisher = pub  # set first: a concurrent first call uses this one

            async def host(*, task_status: anyio.abc.TaskStatus[None]) -> None:
                async with pub:
                    task_status.started()
                    await anyio.sleep_forever()

            assert self._tg is not None
            try:
                await self._tg.start(host, name="publisher")
            except BaseException:
                self._publisher = None
                pub._failed.set()
                raise
            pub._started.set()
        elif not self._publisher._started.is_set():
            await self._publisher._failed_or_started()
            if self._publisher is None:
                raise CheckpointError("the publisher failed to open")
        current = self._publisher
        assert current is not None
        for name, value in (("ring", ring), ("when_full", when_full)):
            if value is not _UNSET and getattr(current, name) != value:
                raise ValueError(f"the publisher is open with {name}={getattr(current, name)!r}")
        return current

    async def publish(
        self, state_dict: Mapping[str, Any], *, version: int | None = None
    ) -> int | None:
        """Publish ``state_dict`` to live readers on this host, without the disk.

        As :meth:`Publisher.publish`: returns the version (default: the last + 1;
        pass the step to keep versions and checkpoints comparable), or None when
        the ring is full and ``when_full="skip"``.
        """
        pub = await self.publisher()
        return await pub.publish(state_dict, version=version)

    async def _reserve_publication(self, version: int) -> Ticket | None:
        pub = await self.publisher()
        return await pub.reserve(version)
