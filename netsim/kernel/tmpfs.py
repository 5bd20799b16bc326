"""A tmpfs of netsim's own on a directory: what lives there goes with one unmount, whatever
the disk under /run is (on some hosts ext4, where removing thousands of small files, each
with a block of its own, takes tens of milliseconds)."""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os

from netsim.errors import KernelError

MS_NOSUID, MS_NODEV, MS_SHARED = 2, 4, 1 << 20
MNT_DETACH = 2
_libc = ctypes.CDLL(None, use_errno=True)


def mount(directory: str, shared: bool = False, fstype: str = "tmpfs") -> None:
    """A tmpfs (or `fstype`: ramfs) on the directory unless one is there, or the directory
    already holds files (made before netsim used a tmpfs: they stay visible); under a lock
    beside it, so two runs never stack two."""
    os.makedirs(directory, exist_ok=True)
    fd = os.open(os.path.dirname(directory.rstrip("/")) or "/", os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        if os.path.ismount(directory) or os.listdir(directory):
            return
        flags = MS_NOSUID | MS_NODEV  # not noexec: the cluster's CNI launcher lives there
        kind = fstype.encode()
        if _libc.mount(kind, directory.encode(), kind, flags, b"mode=0755") != 0:
            raise KernelError(ctypes.get_errno(), f"mount a {fstype} on {directory}", None)
        if shared and _libc.mount(b"none", directory.encode(), None, MS_SHARED, None) != 0:
            raise KernelError(ctypes.get_errno(), f"share {directory}", None)
    finally:
        os.close(fd)


def remove(directory: str) -> None:
    """Unmount the directory's tmpfs (with whatever is mounted inside it), then the directory;
    a directory without one is left as it is."""
    if os.path.ismount(directory):
        if _libc.umount2(directory.encode(), MNT_DETACH) != 0:
            raise KernelError(ctypes.get_errno(), f"unmount {directory}", None)
    with contextlib.suppress(OSError):
        os.rmdir(directory)
