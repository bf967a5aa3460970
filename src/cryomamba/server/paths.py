"""Server paths: a job may name a file only under the configured roots, never outside them."""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

from .errors import ApiError

__all__ = ["resolve_server_path"]


def _forbidden(path: str, why: str) -> ApiError:
    return ApiError(
        403,
        "path_not_allowed",
        f"server path {path!r} is not allowed: {why}",
        "name a file under one of the server's roots (GET /v1/server/info lists them)",
    )


def resolve_server_path(path: str, roots: tuple[Path, ...]) -> Path:
    """The real file `path` names under one of `roots`: no `..`, no absolute or symlink escape.

    A relative path is taken relative to each root in turn. Symlinks are resolved first, so
    a link inside a root that points outside it is refused like the target itself.
    """
    if not roots:
        raise ApiError(
            403,
            "server_paths_disabled",
            "this server accepts no server paths",
            "upload the file instead, or ask the operator to start the server with --root DIR",
        )
    if not path or "\x00" in path:
        raise _forbidden(path, "empty or contains a NUL byte")
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: JSON allows it, no file system does
        raise _forbidden(path, "it is not valid Unicode") from None
    if ".." in PurePosixPath(path.replace("\\", "/")).parts:
        raise _forbidden(path, "it contains '..'")
    real_roots = [Path(os.path.realpath(r)) for r in roots]
    candidates = [Path(path)] if os.path.isabs(path) else [r / path for r in real_roots]
    escaped = False
    for candidate in candidates:
        real = Path(os.path.realpath(candidate))
        if not any(real == r or r in real.parents for r in real_roots):
            escaped = True
            continue
        if os.path.isfile(real):  # False, not OSError, for a name too long for the disk
            return real
    if escaped:
        raise _forbidden(path, "it leads outside every root (after resolving links)")
    raise ApiError(
        404,
        "file_not_found",
        f"no file {path!r} under the server's roots",
        "check the path; relative paths are taken from each root in turn",
    )
