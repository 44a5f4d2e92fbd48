"""A checkpoint root, parsed once where it enters the API: a local directory or a URL.

``s3://bucket/prefix`` gets :class:`aiodcp._disk._store_s3.S3Store` (with the ``s3`` extra);
any other ``scheme:/...`` is refused at once, naming what is supported -- it is never
taken for a local directory named ``s3:``; everything else is a local directory
(:class:`aiodcp._disk._store.LocalStore`).
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ._store import LocalStore, Store

__all__ = ["SUPPORTED_SCHEMES", "open_store", "split_scheme"]

SUPPORTED_SCHEMES = ("s3",)
# "s3://b/p", "s3:/b/p", "gs://b": a scheme, then at least one slash. A plain relative
# name with a colon ("run:3") stays a local path, as it always was.
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):/")


def _installed(module: str) -> bool:
    if module in sys.modules:
        return sys.modules[module] is not None
    return importlib.util.find_spec(module) is not None


def split_scheme(root: str) -> str | None:
    """The URL scheme of ``root`` (lower case), or None for a local path."""
    m = _SCHEME.match(root)
    return m.group(1).lower() if m else None


def local_only(root: str | os.PathLike[str], what: str) -> None:
    """Refuse a URL root where only a local one is supported (never taken for a path)."""
    text = os.fsdecode(os.fspath(root))
    if split_scheme(text) is not None:
        raise ValueError(
            f"{what} needs a local root (publication is same-host), not {text!r}; "
            "follow an object-store root with aiodcp.watch() and aiodcp.load()"
        )


def open_store(
    root: str | os.PathLike[str] | Store,
    storage_options: Mapping[str, Any] | None = None,
) -> Store:
    """The store of ``root``: ``s3://bucket/prefix`` or a local directory (made absolute).

    Raises:
        ValueError: ``root`` has a URL scheme aiodcp does not support (never taken
            for a local path), or ``storage_options`` for a local root.
        ImportError: an ``s3://`` root without the ``s3`` extra installed.
    """
    if isinstance(root, Store):
        return root
    text = os.fspath(root)
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    scheme = split_scheme(text)
    if scheme is None:
        if storage_options:
            raise ValueError(f"storage_options apply to object-store roots only, not {text!r}")
        return LocalStore(Path(text).absolute())  # as before the seam: no normalising
    if scheme == "s3":
        try:
            if not _installed("boto3"):  # imported with the first client, not here
                raise ImportError("No module named 'boto3'")
            from ._store_s3 import S3Store
        except ImportError as exc:
            raise ImportError(
                f"checkpoint root {text!r} needs aiodcp's S3 support: "
                f"pip install 'aiodcp[s3]' ({exc})"
            ) from None
        return S3Store.from_url(text, storage_options)
    raise ValueError(
        f"unsupported checkpoint root {text!r}: aiodcp reads and writes a local directory "
        f"or {', '.join(s + '://bucket/prefix' for s in SUPPORTED_SCHEMES)} "
        f"(scheme {scheme!r} is not supported)"
    )
