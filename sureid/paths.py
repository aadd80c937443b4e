"""Output paths checked before the work starts, so a bad ``--out`` (or ``track_video``'s
``out_dir``) fails in a second, not after the model has run over every image. Stdlib only: the
commands and the library layers use it alike.

``os.path.exists`` / ``isdir`` rather than ``Path``'s: they answer False for a path that cannot
even be looked at (inside a folder without search permission) instead of raising."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path


def _nearest_existing(path: Path) -> Path:
    """``path`` or its closest ancestor that exists (the folder a new path would be made in)."""
    path = path.absolute()
    while not os.path.exists(path) and path != path.parent:
        path = path.parent
    return path


def _writable_folder(folder: Path) -> bool:
    return os.access(folder, os.W_OK | os.X_OK)


def _check_creatable(path: Path, option: str, what: str, folder: Path | None = None) -> None:
    """``folder`` (default: ``path``) does not exist: its nearest existing ancestor must be a
    folder we can write. Messages name ``path``, the option's value."""
    base = _nearest_existing(path if folder is None else folder)
    if not os.path.isdir(base):
        raise NotADirectoryError(
            f"{option} {path}: cannot create the {what}, {base} is a file, not a folder; "
            "pick another path"
        )
    if not _writable_folder(base):
        raise PermissionError(
            f"{option} {path}: cannot create the {what}, the folder {base} is not writable; "
            f"pick a path you can write to, or make it writable (chmod u+w {base})"
        )


def check_output_folder(
    path: str | os.PathLike, option: str = "--out", files: Iterable[str] = ()
) -> None:
    """Raise (an ``OSError`` naming ``option`` and the path) unless ``path`` is a folder that can
    be written, or can be created; ``files``: names the command will write in it (an existing
    read-only one is refused too). Creates nothing."""
    path = Path(path)
    if not os.path.exists(path):
        _check_creatable(path, option, "folder")
        return
    if not os.path.isdir(path):
        raise NotADirectoryError(
            f"{option} {path} is a file, not a folder; name a folder (it is created if missing)"
        )
    if not _writable_folder(path):
        raise PermissionError(
            f"{option} {path}: the folder is not writable; pick a folder you can write to, or "
            f"make it writable (chmod u+w {path})"
        )
    for name in files:
        file = path / name
        if os.path.exists(file) and not os.access(file, os.W_OK):
            raise PermissionError(
                f"{option} {path}: {file} exists and is read-only; remove it, make it writable "
                f"(chmod u+w {file}) or pick another folder"
            )


def check_output_file(
    path: str | os.PathLike, option: str = "--out", example: str = "out.png"
) -> None:
    """Raise (an ``OSError`` naming ``option`` and the path) unless the file ``path`` can be
    written: replaced if it exists, else created, with the folders above it. Creates nothing.
    ``example``: a file name to suggest when ``path`` is a folder."""
    path = Path(path)
    if os.path.isdir(path):
        raise IsADirectoryError(
            f"{option} {path} is a folder; name a file in it (e.g. {path / example})"
        )
    if os.path.exists(path):
        if not os.access(path, os.W_OK):
            raise PermissionError(
                f"{option} {path} exists and is read-only; make it writable (chmod u+w {path}) "
                "or pick another file"
            )
        return
    parent = path.absolute().parent
    if os.path.exists(parent):
        if not os.path.isdir(parent):
            raise NotADirectoryError(
                f"{option} {path}: {parent} is a file, not a folder; pick another path"
            )
        if not _writable_folder(parent):
            raise PermissionError(
                f"{option} {path}: the folder {parent} is not writable; pick a path you can "
                f"write to, or make it writable (chmod u+w {parent})"
            )
        return
    _check_creatable(path, option, "folder of the file", folder=parent)


def replace_atomically(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Write ``path`` through ``write(tmp)``, a temporary file beside it (same suffix, so a
    writer that picks the format from it still does), then rename it into place: a reader never
    sees half a file, and a failed write leaves the old one (and no temporary file)."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
