"""Server paths: a job may name a file only under the configured roots, never outside them.

A path is checked when the job is submitted, but the job reads the file later, when a
worker takes it from the queue. In between, someone who can write under a root could put a
symlink (or a different directory) where the checked file was. So the file is opened by
walking its resolved path from `/` one component at a time without following any link
(`openat` with `O_NOFOLLOW`), and its device and inode are compared with those recorded at
submit; the engine then reads that open file, never the path again.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Mapping
from pathlib import Path, PosixPath, PurePosixPath
from typing import Any

from ..errors import CryoMambaError
from ..volume import Volume
from .errors import ApiError

__all__ = [
    "file_identity",
    "open_job_source",
    "open_nofollow",
    "public_provenance",
    "resolve_server_path",
]

_O_PATH = getattr(os, "O_PATH", os.O_RDONLY)  # Linux: search permission is enough for folders


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


def open_nofollow(path: str | os.PathLike[str]) -> int:
    """A read-only descriptor of the regular file at absolute `path`, no link followed.

    Each folder on the way is opened relative to the one before with `O_NOFOLLOW |
    O_DIRECTORY`, the file itself with `O_NOFOLLOW` (and `O_NONBLOCK`, so a FIFO put in its
    place cannot hang the worker). A symlink anywhere on the path is refused as
    `path_not_allowed`; no message names the path, since clients read these messages.
    """
    parts = PurePosixPath(os.fspath(path)).parts
    if len(parts) < 2 or parts[0] != "/" or ".." in parts:
        raise _changed("its recorded path is not absolute")
    cur = os.open("/", _O_PATH | os.O_DIRECTORY)
    try:
        for name in parts[1:-1]:
            try:
                nxt = os.open(name, _O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=cur)
            except OSError as exc:
                raise _open_error(exc) from None
            os.close(cur)
            cur = nxt
        try:
            fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=cur)
        except OSError as exc:
            raise _open_error(exc) from None
    finally:
        os.close(cur)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise _changed("it is no longer a regular file")
    return fd


def file_identity(fd: int) -> list[int]:
    """[device, inode] of an open file: what says it is the same file later."""
    st = os.fstat(fd)
    return [st.st_dev, st.st_ino]


def open_job_source(source: Mapping[str, Any]) -> _FdVolume:
    """The job's source `Volume`, read from the very file that was checked at submit.

    `source` is the job's source record: its real `path` and the `identity` recorded at
    submit (records made before identities were kept have none: the no-link walk still
    keeps them inside the roots). The volume reads the open file through /proc/self/fd;
    closing the volume closes the file.
    """
    fd = open_nofollow(os.path.abspath(source["path"]))  # older records: relative to the cwd
    try:
        identity = source.get("identity")
        if identity is not None and file_identity(fd) != list(identity):
            raise _changed("another file now stands where it was")
        return _FdVolume.open_fd(fd, source.get("filename") or "the file", source.get("sha256"))
    except BaseException:
        os.close(fd)
        raise


class _OpenFilePath(PosixPath):
    """/proc/self/fd/N that calls itself by the file's name, so messages name the file."""

    display_name = ""

    @property
    def name(self) -> str:
        return self.display_name or super().name


class _FdVolume(Volume):
    """A `Volume` read through an open descriptor; closing it closes the descriptor too."""

    _fd: int | None = None

    @classmethod
    def open_fd(cls, fd: int, name: str, sha256: str | None) -> _FdVolume:
        if not os.path.isdir("/proc/self/fd"):  # pragma: no cover - not Linux
            raise CryoMambaError(
                "this server cannot read job files safely on this operating system",
                hint="run the server on Linux, or upload the file instead",
                code="path_not_allowed",
            )
        where = f"/proc/self/fd/{fd}"  # the open file itself, whatever its path names now
        try:
            volume = cls.open(where, sha256=sha256)
        except CryoMambaError as exc:  # its message names /proc/self/fd/N: name the file
            exc.message = exc.message.replace(where, name)
            raise
        assert isinstance(volume, _FdVolume)
        volume._fd = fd
        named = _OpenFilePath(where)  # reads the open file; `.name` is the file's for messages
        named.display_name = name
        volume.path = named
        return volume

    @property
    def fd(self) -> int:
        if self._fd is None:
            raise ValueError(f"{self!r} is closed")
        return self._fd

    def close(self) -> None:
        super().close()
        fd, self._fd = self._fd, None
        if fd is not None:
            self.path = None  # /proc/self/fd/N may name another file from now on
            os.close(fd)


def public_provenance(provenance: Mapping[str, Any], filename: str) -> dict[str, Any]:
    """`provenance` as a client may read it: the source by `filename`, the model by name.

    Local runs keep full paths in stats.json; the server writes this instead, so no
    artifact reveals where its files or models live (the job record hides them too).
    """
    public = dict(provenance)
    if isinstance(public.get("source"), Mapping):
        public["source"] = {**public["source"], "path": filename}
    if isinstance(public.get("model"), Mapping):
        public["model"] = {k: v for k, v in public["model"].items() if k != "path"}
    return public


def _changed(why: str) -> CryoMambaError:
    return CryoMambaError(
        f"the job's file changed after the job was submitted: {why}",
        hint="submit the job again; a link or another file was put in its place under the root",
        code="path_not_allowed",
    )


def _open_error(exc: OSError) -> CryoMambaError:
    """A failed step of the walk, as an error whose message names no server path."""
    if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
        return _changed("a symbolic link, or a file where a folder was, now stands on its path")
    if exc.errno == errno.ENOENT:
        return CryoMambaError(
            "the job's file is no longer on the server",
            hint="it was moved or deleted after the job was submitted; submit it again",
            code="file_not_found",
        )
    return CryoMambaError(
        f"the job's file cannot be opened: {os.strerror(exc.errno or 0)}",
        hint="tell the server's operator",
        code="io_error",
    )
