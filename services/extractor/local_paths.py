"""User-supplied local paths (weights, datasets, concept sets), checked against the data roots.

The same rules as the gateway's validation: a plain path or a `file://` URI, no `..`,
and, when `Settings.data_roots` is set, inside one of those directories.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from services.common.errors import InvalidArgument, NotFound
from services.common.settings import Settings


def data_roots(settings: Settings) -> list[Path]:
    """The directories user paths must lie under (empty: anywhere)."""
    return [
        Path(root).expanduser().resolve()
        for root in re.split(f"[,{os.pathsep}]", settings.data_roots)
        if root.strip()
    ]


def local_path(uri: str, field: str, settings: Settings, must_exist: bool = True) -> Path:
    """Resolve the path or file:// URI `uri` given in request field `field`.

    Raises InvalidArgument for an empty or remote URI, `..`, or a path outside the data
    roots; NotFound when `must_exist` and nothing is there.
    """
    if not uri:
        raise InvalidArgument("a path is required here", field=field)
    raw = uri[len("file://") :] if uri.startswith("file://") else uri
    if "://" in raw:
        raise InvalidArgument(f"{uri!r}: only local paths or file:// URIs are supported", field)
    if "\x00" in raw:
        raise InvalidArgument("the path holds a NUL character", field=field)
    path = Path(raw).expanduser()
    if ".." in path.parts:
        raise InvalidArgument(f"{uri!r}: paths may not contain '..'", field=field)
    resolved = path.resolve()
    roots = data_roots(settings)
    if roots and not any(resolved.is_relative_to(root) for root in roots):
        listed = ", ".join(str(r) for r in roots)
        raise InvalidArgument(f"{uri!r} is outside the allowed data roots ({listed})", field)
    if must_exist and not resolved.exists():
        raise NotFound(f"{uri!r} does not exist", field=field)
    return resolved
