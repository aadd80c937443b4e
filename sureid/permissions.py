"""File permissions of what SUREID saves: those the umask gives new files.

safetensors writes its files owner-only (0600) whatever the umask, so without this a service
account could not read a model or a gallery another user saved. Standard library only.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

_FALLBACK_UMASK: list[int] = []  # read once where /proc cannot tell


def umask() -> int:
    """The process's umask, read from /proc where it can be (Linux >= 4.7), so that no other
    thread sees it change; elsewhere set and restored once, the only portable way to read it,
    and remembered (a window of a few instructions in which a new file of another thread would
    get 022, taken once per process rather than at every save)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    if not _FALLBACK_UMASK:
        mask = os.umask(0o022)
        os.umask(mask)
        _FALLBACK_UMASK.append(mask)
    return _FALLBACK_UMASK[0]


def give_umask_permissions(paths: Iterable[str | os.PathLike]) -> None:
    """Set each file in ``paths`` to ``0o666 & ~umask`` (no-op on Windows); a file that cannot
    be changed (another user's, or gone) is left as it is."""
    if os.name == "nt":
        return
    mode = 0o666 & ~umask()
    for path in paths:
        try:
            if os.stat(path).st_mode & 0o777 != mode:
                os.chmod(path, mode)
        except OSError:
            continue
