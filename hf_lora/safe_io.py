"""Crash-safe file writes and path containment: the two file-system rules every writer follows.

* Writes go to a temporary file in the destination folder, are flushed to disk, then renamed
  over the destination (``os.replace`` is atomic on POSIX and Windows). A process killed at any
  instant leaves the previous complete file or the new complete one, never a truncated file.
  Several files written together are all staged first and renamed one after another, so a
  failure while writing (disk full, read-only folder) changes none of them.
* Names that come from files or users (``subfolder``, adapter names) are joined to a root only
  when the result stays inside it: no ``..``, no absolute path, no symlink leading out.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path, PurePosixPath, PureWindowsPath

TEMP_SUFFIX = ".tmp"


def temp_prefix(path: Path) -> str:
    """Prefix of the temporary files staged for ``path`` (a dot file: hidden, never loaded)."""
    return f".{path.name}."


def _umask() -> int:
    try:  # Linux reports it without changing it
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: read by setting, then restore at once
    os.umask(mask)
    return mask


def _final_mode(path: Path) -> int:
    """The mode a plain ``open(path, "w")`` would give: the existing file's, else 0o666 minus the umask.

    ``mkstemp`` creates files readable by their owner only; without this, every adapter saved
    on a shared disk would be unreadable to the rest of the team.
    """
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        return 0o666 & ~_umask()


def staging_folder(target: str | os.PathLike[str], tag: str = "partial") -> Path:
    """A new hidden folder beside ``target`` to build a whole output in, then rename into place.

    Unlike ``tempfile.mkdtemp`` (owner-only 0700), it gets the permissions a plain ``mkdir``
    would, so the renamed output is readable as usual.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f".{target.name}.{tag}-", dir=target.parent))
    os.chmod(folder, 0o777 & ~_umask())
    return folder


def _fsync_folder(folder: Path) -> None:
    # Makes the rename itself durable on power loss; not every platform can open a folder.
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_error(path: Path, exc: BaseException) -> OSError | None:
    """An ``OSError`` naming ``path`` for an I/O failure, or ``None`` when ``exc`` is not one."""
    if isinstance(exc, OSError):
        kind, code, reason = type(exc), exc.errno, exc.strerror or str(exc)
    else:
        # safetensors reports I/O failures as SafetensorError("... (os error 28)").
        found = re.search(r"os error (\d+)", str(exc))
        if found is None:
            return None
        kind, code = OSError, int(found.group(1))
        reason = os.strerror(code)
    message = f"Could not write {str(path)!r}: {reason}. Any previous version of the file is unchanged."
    return kind(code, message) if code is not None else kind(message)


def atomic_write_files(writers: Mapping[Path, Callable[[str], None]]) -> None:
    """Write several files crash-safely: stage every one, then rename them into place in order.

    Args:
        writers: ``{destination: write}``; ``write(tmp_path)`` writes the full content to the
            temporary path it is given (e.g. ``lambda tmp: save_file(tensors, tmp)``).

    Raises:
        OSError: Of the same kind as the underlying failure (``PermissionError``, ``ENOSPC``...),
            naming the destination. No destination has changed when a write fails; temporary
            files are removed.
    """
    staged: list[tuple[Path, str]] = []
    try:
        for path, write in writers.items():
            path = Path(path)
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), suffix=TEMP_SUFFIX, dir=path.parent)
                os.close(fd)
                staged.append((path, tmp))
                write(tmp)
                os.chmod(tmp, _final_mode(path))
                with open(tmp, "rb+") as handle:
                    os.fsync(handle.fileno())
            except Exception as exc:
                error = _write_error(path, exc)
                if error is None:
                    raise
                raise error from exc
        for path, tmp in staged:
            try:
                os.replace(tmp, path)
            except OSError as exc:
                raise _write_error(path, exc) or exc from exc
        for folder in {path.parent for path, _ in staged}:
            _fsync_folder(folder)
    except BaseException:
        for _, tmp in staged:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise


def atomic_write(path: str | os.PathLike[str], write: Callable[[str], None]) -> None:
    """Write one file crash-safely (temporary file in the same folder, fsync, rename).

    Use it for every file hf_lora writes (adapters, merged models, reports): a crash leaves
    either the previous complete file or the new complete one.

    Args:
        path: The destination file.
        write: Called with a temporary path in the destination folder; must write the whole file there.

    Raises:
        OSError: Naming ``path`` (see `atomic_write_files`); the previous file is unchanged.
    """
    atomic_write_files({Path(path): write})


def check_relative_name(name: str, *, what: str) -> PurePosixPath:
    """Validate a relative name (``subfolder``, adapter name) before it is joined to any folder.

    Raises:
        ValueError: ``name`` is empty, absolute, contains ``..`` or a NUL, or uses a drive or
            backslash (which would resolve differently on Windows).
    """
    if not isinstance(name, str) or not name or "\x00" in name:
        raise ValueError(f"{what}={name!r} is invalid: expected a non-empty relative path such as 'adapters/v1'.")
    windows = PureWindowsPath(name)
    posix = PurePosixPath(name)
    if posix.is_absolute() or windows.is_absolute() or windows.drive or "\\" in name:
        raise ValueError(f"{what}={name!r} is invalid: it must be relative to the adapter folder, not absolute.")
    if ".." in posix.parts:
        raise ValueError(f"{what}={name!r} is invalid: '..' would leave the adapter folder.")
    return posix


def safe_join(root: str | os.PathLike[str], name: str, *, what: str = "subfolder") -> Path:
    """``root / name``, refusing any ``name`` that would resolve outside ``root``.

    The check is done both on the text (`check_relative_name`) and on the resolved path, so a
    symlink inside ``root`` that points elsewhere is refused too.

    Raises:
        ValueError: The name is unsafe or resolves outside ``root``; the message names both.
    """
    relative = check_relative_name(name, what=what)
    root_path = Path(root)
    joined = root_path.joinpath(*relative.parts)
    real_root = root_path.resolve()
    real = joined.resolve()
    if real != real_root and real_root not in real.parents:
        raise ValueError(
            f"{what}={name!r} resolves to {str(real)!r}, outside {str(real_root)!r} (a symlink?); refusing to use it."
        )
    return joined
