"""Named network namespaces, made in-process the way `ip netns add` makes them.

pyroute2's own netns helpers fork a child per call (about 10 ms each); a cluster of a thousand
pods cannot pay that. Here the calling thread unshares a new network namespace, bind-mounts it
on /run/netns/<name> (so `ip netns exec` works) and returns to where it was: under half a
millisecond. Sockets opened while inside a namespace stay in it after the thread returns.

A namespace made `under` a directory is mounted on a file there, on a tmpfs of that directory's
own, and /run/netns/<name> is a symlink to it (`ip netns exec`, `ip -n`, `ip netns list` and
`ip netns del` follow it). Unmounting one namespace costs the kernel more the more mounts
there are beside it; unmounting the directory takes every namespace under it at once, so a
cluster goes with one unmount (bench/test_netns.py: 5,000 one by one 1.0 s, at once 0.11 s).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno as errnos
import os
import threading
from collections.abc import Iterator

from netsim.errors import KernelError
from netsim.kernel import tmpfs

RUN_DIR = "/run/netns"
ETC_DIR = "/etc/netns"  # <name>/resolv.conf, hosts: bound over /etc/* by `ip netns exec`
CLONE_NEWNET, CLONE_NEWNS, CLONE_NEWUTS = 0x40000000, 0x00020000, 0x04000000
MS_REC, MS_BIND, MS_SLAVE = 0x4000, 0x1000, 0x80000
MS_SHARED, MNT_DETACH = tmpfs.MS_SHARED, tmpfs.MNT_DETACH

_libc = ctypes.CDLL(None, use_errno=True)
# The namespace this process started in, to return to after every visit. Opened at import,
# before any thread could have moved, so it can never be mistaken for a visited namespace.
_HOME_FD = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
_run_dir_ready = False
_groups_ready: set[str] = set()  # directories whose tmpfs this process has seen mounted
_groups_lock = threading.Lock()


def _check(result: int, what: str, name: str | None) -> None:
    if result != 0:
        raise KernelError(ctypes.get_errno(), what, name)


def path(name: str) -> str:
    """A netns name under /run/netns, or any absolute path to a netns file as CNI passes."""
    return name if name.startswith("/") else os.path.join(RUN_DIR, name)


def _prepare_run_dir() -> None:
    """Make /run/netns a shared mount point, as iproute2 does, so bind mounts propagate."""
    global _run_dir_ready
    if _run_dir_ready:
        return
    os.makedirs(RUN_DIR, exist_ok=True)
    run_dir = RUN_DIR.encode()
    if _libc.mount(b"none", run_dir, None, MS_SHARED | MS_REC, None) != 0:
        _check(_libc.mount(run_dir, run_dir, b"none", MS_BIND | MS_REC, None), "bind", None)
        _check(_libc.mount(b"none", run_dir, None, MS_SHARED | MS_REC, None), "share", None)
    _run_dir_ready = True


def exists(name: str) -> bool:
    return os.path.exists(path(name))


def names() -> list[str]:
    try:
        return sorted(os.listdir(RUN_DIR))
    except FileNotFoundError:
        return []


def _prepare_group(under: str) -> None:
    """A tmpfs on `under`, shared like /run/netns, unless one is there already."""
    with _groups_lock:
        if under not in _groups_ready:
            tmpfs.mount(under, shared=True)
            _groups_ready.add(under)


def create(name: str, under: str | None = None, file: str | None = None) -> None:
    """Create the named namespace; EEXIST if the name is taken. With `under`, its mount lives
    in that directory on `file` (the name by default; see the module's note) and
    /run/netns/<name> links to it, relatively and short: ext4 keeps a link shorter than 60
    bytes in its inode, a longer one in a data block that removing it must free."""
    _prepare_run_dir()
    link = path(name)
    target = link
    if under:
        _prepare_group(under)
        target = os.path.join(under, file or name)
    try:
        if target == link:
            os.close(os.open(target, os.O_RDONLY | os.O_CREAT | os.O_EXCL, 0))
        else:
            if os.path.lexists(link) or os.path.ismount(target):
                raise FileExistsError
            # an empty file left there is reused: `ip netns del` unmounts it and unlinks
            # only the name in /run/netns
            os.close(os.open(target, os.O_RDONLY | os.O_CREAT, 0))
            os.symlink(os.path.relpath(target, RUN_DIR), link)
    except FileExistsError:
        raise KernelError(errnos.EEXIST, f"create netns {name}", None) from None
    # back to where the thread was (a node agent's threads live in the node's namespace)
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _check(_libc.unshare(CLONE_NEWNET), f"unshare for netns {name}", None)
        try:
            _check(
                _libc.mount(b"/proc/thread-self/ns/net", target.encode(), b"none", MS_BIND, None),
                f"bind netns {name}",
                None,
            )
        finally:
            _check(_libc.setns(home, CLONE_NEWNET), "return to home netns", None)
            os.close(home)
    except KernelError:
        for made in {link, target}:
            with contextlib.suppress(OSError):
                os.unlink(made)
        raise


def _resolved(link: str) -> str:
    """Where a link in /run/netns points, as an absolute path (OSError: not a link)."""
    return os.path.normpath(os.path.join(RUN_DIR, os.readlink(link)))


def remove(name: str) -> bool:
    """Unmount and unlink the namespace (and its link); False if it was already gone."""
    link = path(name)
    try:
        target = _resolved(link)
    except FileNotFoundError:
        return False
    except OSError:  # not a link: the namespace is mounted on /run/netns/<name> itself
        target = link
    _libc.umount2(target.encode(), MNT_DETACH)  # fails harmlessly when not mounted
    try:
        os.unlink(link)
    except FileNotFoundError:
        return False
    if target != link:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(target)
    return True


def unlink_all(under: str, names: list[str]) -> list[str]:
    """The names' links in /run/netns, for namespaces mounted under the directory: nothing
    finds them by name any more, `remove_group` unmounts them. A name mounted elsewhere is
    removed on its own. The names that existed."""
    removed = []
    # the links `create` makes, relative to /run/netns: compared as text, one readlink each
    relative = os.path.relpath(under, RUN_DIR) + "/"
    for name in names:
        link = f"{RUN_DIR}/{name}"
        try:
            target = os.readlink(link)
        except FileNotFoundError:
            continue
        except OSError:  # not a link
            target = ""
        if target.startswith(relative) and "/" not in target[len(relative) :]:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(link)
            removed.append(name)
        elif remove(name):
            removed.append(name)
    return removed


def remove_group(under: str) -> None:
    """Every namespace mounted under the directory at once, with its tmpfs."""
    with _groups_lock:
        _groups_ready.discard(under)
        tmpfs.remove(under)


def groups(root: str) -> list[str]:
    """The directories under `root` that hold namespaces (or held them)."""
    try:
        return sorted(os.listdir(root))
    except FileNotFoundError:
        return []


@contextlib.contextmanager
def entered(name: str | None) -> Iterator[None]:
    """Run the block with this thread inside the namespace (None: stay); always come back."""
    if name is None:
        yield
        return
    try:
        fd = os.open(path(name), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise KernelError(errnos.ENOENT, f"enter netns {name}", None) from None
    try:
        _check(_libc.setns(fd, CLONE_NEWNET), f"enter netns {name}", None)
    finally:
        os.close(fd)
    try:
        yield
    finally:
        _check(_libc.setns(_HOME_FD, CLONE_NEWNET), "return to home netns", None)


def enter_for_exec(name: str) -> None:
    """Move this (child) process into the namespace for good: a preexec hook."""
    fd = os.open(path(name), os.O_RDONLY)
    try:
        _check(_libc.setns(fd, CLONE_NEWNET), f"enter netns {name}", None)
    finally:
        os.close(fd)


SERVICE_ACCOUNT = "/run/secrets/kubernetes.io/serviceaccount"  # /var/run is /run


def etc_names() -> list[str]:
    """The namespaces that have files under /etc/netns."""
    try:
        return sorted(os.listdir(ETC_DIR))
    except FileNotFoundError:
        return []


def _etc_folder(name: str, under: str) -> str:
    """`under`/<digest of name>: short, so that the /etc/netns symlink to it stays under 60
    bytes, which ext4 keeps in the inode (a longer target takes a block of its own: the links
    of a pod with a ReplicaSet's name cost twice as long to make and remove)."""
    import hashlib

    return os.path.join(under, hashlib.blake2b(name.encode(), digest_size=5).hexdigest())


def write_etc(name: str, files: dict[str, str], under: str) -> None:
    """Files `ip netns exec` binds over /etc for this namespace (resolv.conf, hosts), in a
    folder of `under` (a tmpfs: a cluster's ten thousand pods cost the disk nothing). `under`
    must exist: a writer late for its cluster's deletion fails instead of making it again."""
    folder = _etc_folder(name, under)
    with contextlib.suppress(FileExistsError):
        os.mkdir(folder)
    for file, text in files.items():
        with open(os.path.join(folder, file), "w") as fh:
            fh.write(text)


def link_etc(name: str, under: str) -> None:
    """/etc/netns/<name> -> the folder of `under` where write_etc put its files."""
    folder = _etc_folder(name, under)
    os.makedirs(ETC_DIR, exist_ok=True)
    link = os.path.join(ETC_DIR, name)
    if os.path.islink(link) and os.readlink(link) == folder:
        return
    remove_etc(name)
    os.symlink(folder, link)


def remove_etc(name: str) -> None:
    """The namespace's /etc/netns entry and what it points to, if it has one."""
    import shutil

    link = os.path.join(ETC_DIR, name)
    if os.path.islink(link):
        shutil.rmtree(os.readlink(link), ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(link)
    else:
        shutil.rmtree(link, ignore_errors=True)


def enter_as_container(name: str, hostname: str = "", namespace: str = "") -> None:
    """A preexec hook for a pod's process: its network namespace, a mount namespace in which
    the files of /etc/netns/<name>/ cover those of /etc (as `ip netns exec` binds them:
    resolv.conf, hosts), and, given a hostname, a UTS namespace with that name (the pod's, as
    a container runtime gives it). Given its Kubernetes namespace, a /run of its own holding
    the service account's `namespace` file, which manifests read."""
    enter_for_exec(name)
    _check(_libc.unshare(CLONE_NEWNS | (CLONE_NEWUTS if hostname else 0)), "unshare", name)
    _check(_libc.mount(None, b"/", None, MS_REC | MS_SLAVE, None), "mount --make-rslave /", name)
    etc = os.path.join(ETC_DIR, name)
    for entry in os.listdir(etc) if os.path.isdir(etc) else []:
        source, target = os.path.join(etc, entry).encode(), os.path.join("/etc", entry).encode()
        _check(_libc.mount(source, target, None, MS_BIND, None), f"bind /etc/{entry}", name)
    if hostname:
        raw = hostname.encode()
        _check(_libc.sethostname(raw, len(raw)), "sethostname", name)
    if namespace:
        _check(_libc.mount(b"tmpfs", b"/run", b"tmpfs", 0, b"mode=755"), "mount /run", name)
        os.makedirs(SERVICE_ACCOUNT)
        with open(os.path.join(SERVICE_ACCOUNT, "namespace"), "w") as fh:
            fh.write(namespace)


def open_fd(name: str) -> int:
    """A file descriptor of the namespace, for IFLA_NET_NS_FD; the caller closes it."""
    try:
        return os.open(path(name), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise KernelError(errnos.ENOENT, f"open netns {name}", None) from None
