"""The node tree of the simulated xenstored: values, permissions, generations, transactions.

Sans-I/O: no sockets, no trio. `XenstoredCore` (xenstore_core.py) parses
requests and calls this; this decides what the data base does and which
watch events the change causes. The rules follow C xenstored of Xen 4.17
(tools/xenstore/xenstored_core.c, xenstored_transaction.c), which is what
Debian 12 ships:

- Every node has a value (bytes), an ordered list of children, a permission
  list (first entry = owner + default access for everyone not listed) and a
  generation number, bumped from one global counter on every change.
- A new node copies its parent's permissions; an unprivileged creator
  becomes its owner. Creating a node needs write access to the nearest
  existing ancestor.
- Errors do not leak existence: a missing or forbidden node answers ENOENT
  only if the caller could see the nearest existing ancestor with the access
  it asked for, else EACCES (errno_from_parents()).
- A transaction is an overlay over the live tree. The first access to a
  node records its generation (or "absent"); commit fails with EAGAIN if any
  recorded node changed since, else the overlay is applied and its watch
  events fire. Like C xenstored, a transaction sees changes made by others
  to nodes it has not touched yet (there is no snapshot at start); what it
  did see is guaranteed unchanged at commit.
"""

from __future__ import annotations

import errno
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from xenblk_vhost.xen.interfaces import Permission
from xenblk_vhost.xen.xs_wire import REL_PATH_MAX

# Access bits, as XS_PERM_* in xenstore_lib.h (the values are ours; only their meaning matters).
PERM_NONE = 0
PERM_READ = 1
PERM_WRITE = 2
PERM_OWNER = 8

NO_GENERATION = -1  # a node that did not exist when a transaction first looked

# Per-node size limit for unprivileged writers (quota_max_entry_size) and the
# size C xenstored charges a node: its tdb record header is 24 bytes
# (u64 generation + 3 x u32, padded), each permission 8 bytes.
NODE_SIZE_MAX = 2048
_RECORD_HEADER = 24
_PERM_SIZE = 8

_VALID_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-/_@")
_LOCAL_DOMAIN = re.compile(r"/local/domain/\d{1,5}/")


class StoreError(Exception):
    """A request failed with an errno that xenstored would send back by name."""

    def __init__(self, errnum: int, detail: str = "") -> None:
        super().__init__(errnum, detail)
        self.errno = errnum


@dataclass(frozen=True, slots=True)
class Caller:
    """Who is asking: a domain id, and the domain it acts for after SET_TARGET (if any)."""

    domid: int
    target: int | None = None

    @property
    def privileged(self) -> bool:
        return self.domid == 0


DOM0 = Caller(0)


@dataclass(frozen=True, slots=True)
class Node:
    value: bytes
    perms: tuple[Permission, ...]
    children: tuple[str, ...] = ()
    generation: int = 0

    def size(self) -> int:
        """The record size C xenstored compares with its node-size quota."""
        names = sum(len(c) + 1 for c in self.children)
        return _RECORD_HEADER + _PERM_SIZE * len(self.perms) + len(self.value) + names


@dataclass(frozen=True, slots=True)
class Fire:
    """A watch event this change causes.

    exact=False fires every watch on `path` or an ancestor of it; exact=True
    fires only watches on `path` itself (a node removed along with a parent).
    An unprivileged watcher gets it only if one of `readable_via` grants it
    read access (the node's perms, its old perms, or its parent's).
    """

    path: str
    exact: bool
    readable_via: tuple[tuple[Permission, ...], ...] = ()
    special: bool = False  # @introduceDomain / @releaseDomain


@dataclass(slots=True)
class _Access:
    """What a transaction knows about one node."""

    node: Node | None  # the transaction's own view (None = absent)
    generation: int  # live generation at first access
    check: bool  # True if first accessed by reading: verify at commit
    orig_perms: tuple[Permission, ...] | None
    modified: bool = False


@dataclass(slots=True)
class Transaction:
    id: int
    accessed: dict[str, _Access] = field(default_factory=dict)
    # path -> exact; a non-exact event replaces an exact one (queue_watches()).
    pending_fires: dict[str, bool] = field(default_factory=dict)


def is_valid_path(path: str) -> bool:
    """is_valid_nodename(): absolute, no trailing or double slash, allowed characters, length."""
    if not path.startswith("/"):
        return False
    if path.endswith("/") and path != "/":
        return False
    if "//" in path:
        return False
    m = _LOCAL_DOMAIN.match(path)
    local_off = m.end() if m else 0
    if len(path) > local_off + REL_PATH_MAX:
        return False
    return all(c in _VALID_CHARS for c in path)


def parent_of(path: str) -> str:
    cut = path.rfind("/")
    return path[:cut] if cut > 0 else "/"


def child_path(parent: str, name: str) -> str:
    return f"/{name}" if parent == "/" else f"{parent}/{name}"


def is_child(path: str, ancestor: str) -> bool:
    """True if `path` is `ancestor` or below it (every path is below '/')."""
    if ancestor == "/":
        return True
    return path == ancestor or path.startswith(ancestor + "/")


def perm_for(caller: Caller, perms: Sequence[Permission]) -> int:
    """perm_for_conn(): privileged callers and owners get everything, then the
    caller's own entry, then the default (first entry's flags)."""
    owner = perms[0].domid
    if caller.privileged or owner == caller.domid or (caller.target is not None and owner == caller.target):
        return PERM_READ | PERM_WRITE | PERM_OWNER
    for p in perms[1:]:
        if p.domid == caller.domid or (caller.target is not None and p.domid == caller.target):
            return _bits(p)
    return _bits(perms[0])


def _bits(p: Permission) -> int:
    return (PERM_READ if p.read else 0) | (PERM_WRITE if p.write else 0)


class Store:
    """The data base. Every method takes the caller and the transaction (or None)."""

    def __init__(self) -> None:
        self._generation = 0
        self._nodes: dict[str, Node] = {}
        root_perms = (Permission(0, False, False),)
        # setup_structure(): the tree a fresh xenstored starts with.
        for path, children in (("/", ("tool",)), ("/tool", ("xenstored",)), ("/tool/xenstored", ())):
            self._generation += 1
            self._nodes[path] = Node(b"", root_perms, children, self._generation)

    # ---- raw access, transaction-aware -------------------------------------------------

    def _read(self, path: str, tx: Transaction | None) -> Node | None:
        if tx is None:
            return self._nodes.get(path)
        seen = tx.accessed.get(path)
        if seen is not None:
            return seen.node
        node = self._nodes.get(path)
        tx.accessed[path] = _Access(
            node=node,
            generation=node.generation if node else NO_GENERATION,
            check=True,
            orig_perms=node.perms if node else None,
        )
        return node

    def _put(self, path: str, node: Node | None, tx: Transaction | None) -> None:
        """Write (or with None, delete) one node."""
        if tx is None:
            if node is None:
                self._nodes.pop(path, None)
            else:
                self._generation += 1
                self._nodes[path] = replace(node, generation=self._generation)
            return
        seen = tx.accessed.get(path)
        if seen is None:
            live = self._nodes.get(path)
            seen = tx.accessed[path] = _Access(
                node=None,
                generation=live.generation if live else NO_GENERATION,
                check=False,
                orig_perms=live.perms if live else None,
            )
        seen.node = node
        seen.modified = True

    def _fires(self, fires: list[Fire], tx: Transaction | None) -> list[Fire]:
        """Events fire now, or at commit when made inside a transaction."""
        if tx is None:
            return fires
        for f in fires:
            if f.path not in tx.pending_fires:
                tx.pending_fires[f.path] = f.exact
            elif not f.exact:
                tx.pending_fires[f.path] = False
        return []

    def _readable_via(self, path: str, node: Node, tx: Transaction | None, *extra) -> tuple:
        parent = self._read(parent_of(path), tx) if path != "/" else None
        sets = [p for p in extra if p is not None] + [node.perms]
        if parent is not None:
            sets.append(parent.perms)
        return tuple(sets)

    # ---- permission checks ----------------------------------------------------------------

    def _get_node(self, caller: Caller, path: str | None, perm: int, tx: Transaction | None) -> Node:
        """get_node(): the node if the caller has `perm` on it, else ENOENT/EACCES/EINVAL."""
        if path is None or not is_valid_path(path):
            raise StoreError(errno.EINVAL, f"invalid path {path!r}")
        node = self._read(path, tx)
        if node is not None:
            if perm_for(caller, node.perms) & perm == perm:
                return node
            err = errno.EACCES
        else:
            err = errno.ENOENT
        # Tell the caller ENOENT only if it may see the parent with this access.
        if self._ancestor_perm(caller, path, tx) & perm:
            raise StoreError(err, path)
        raise StoreError(errno.EACCES, path)

    def _ancestor_perm(self, caller: Caller, path: str, tx: Transaction | None) -> int:
        name = path
        while True:
            name = parent_of(name)
            node = self._read(name, tx)
            if node is not None:
                return perm_for(caller, node.perms)
            if name == "/":
                return PERM_NONE

    def _check_size(self, caller: Caller, node: Node) -> None:
        if not caller.privileged and node.size() >= NODE_SIZE_MAX:
            raise StoreError(errno.ENOSPC, "node too large")

    def _create(self, caller: Caller, path: str, value: bytes, tx: Transaction | None) -> Node:
        """construct_node() + create_node(): make `path` and any missing parents."""
        missing = [path]
        parent_path = parent_of(path)
        parent = self._read(parent_path, tx)
        while parent is None:
            if parent_path == "/":
                raise StoreError(errno.ENOENT, "no root")
            missing.append(parent_path)
            parent_path = parent_of(parent_path)
            parent = self._read(parent_path, tx)

        writes: list[tuple[str, Node]] = []
        for name in reversed(missing):
            perms = parent.perms
            if not caller.privileged:
                # "Inherit permissions, unpriv domains own what they create."
                perms = (Permission(caller.domid, perms[0].read, perms[0].write),) + perms[1:]
            basename = name.rsplit("/", 1)[1]
            writes.append((parent_path, replace(parent, children=parent.children + (basename,))))
            parent, parent_path = Node(b"", perms), name
        node = replace(parent, value=value)
        writes.append((path, node))
        # Later entries for the same path supersede earlier ones: keep the last.
        final = dict(writes)
        for n in final.values():
            self._check_size(caller, n)
        for p, n in final.items():
            self._put(p, n, tx)
        return node

    # ---- operations -------------------------------------------------------------------------

    def read(self, caller: Caller, path: str | None, tx: Transaction | None = None) -> bytes:
        return self._get_node(caller, path, PERM_READ, tx).value

    def directory(self, caller: Caller, path: str | None, tx: Transaction | None = None) -> Node:
        """The node (children and generation) for DIRECTORY and DIRECTORY_PART."""
        return self._get_node(caller, path, PERM_READ, tx)

    def get_perms(self, caller: Caller, path: str | None, tx: Transaction | None = None) -> tuple[Permission, ...]:
        return self._get_node(caller, path, PERM_READ, tx).perms

    def write(self, caller: Caller, path: str | None, value: bytes, tx: Transaction | None = None) -> list[Fire]:
        try:
            old = self._get_node(caller, path, PERM_WRITE, tx)
        except StoreError as e:
            if e.errno != errno.ENOENT:
                raise
            assert path is not None
            node = self._create(caller, path, value, tx)
        else:
            assert path is not None  # _get_node found it
            node = replace(old, value=value)
            self._check_size(caller, node)
            self._put(path, node, tx)
        return self._fires([Fire(path, False, self._readable_via(path, node, tx))], tx)

    def mkdir(self, caller: Caller, path: str | None, tx: Transaction | None = None) -> list[Fire]:
        try:
            self._get_node(caller, path, PERM_WRITE, tx)
            return []  # already there: nothing changes, nothing fires
        except StoreError as e:
            if e.errno != errno.ENOENT:
                raise
        assert path is not None
        node = self._create(caller, path, b"", tx)
        return self._fires([Fire(path, False, self._readable_via(path, node, tx))], tx)

    def rm(self, caller: Caller, path: str | None, tx: Transaction | None = None) -> list[Fire]:
        try:
            self._get_node(caller, path, PERM_WRITE, tx)
        except StoreError as e:
            # Removing what is not there is fine, as long as its parent exists.
            if e.errno == errno.ENOENT and path is not None and self._read(parent_of(path), tx) is not None:
                return []
            raise
        assert path is not None
        if path == "/":
            raise StoreError(errno.EINVAL, "cannot remove /")
        return self._fires(self._remove_subtree(path, tx), tx)

    def _remove_subtree(self, root: str, tx: Transaction | None) -> list[Fire]:
        """rm_node(): delete `root` and everything below, children first; every
        removed node fires (the root for watches above it, the others exactly)."""
        parent_path = parent_of(root)
        parent = self._read(parent_path, tx)
        if parent is None:
            raise StoreError(errno.EINVAL, "parent vanished")
        fires: list[Fire] = []

        def remove(path: str, node: Node, above: Node) -> None:
            for name in node.children:
                child = child_path(path, name)
                below = self._read(child, tx)
                if below is not None:
                    remove(child, below, node)
            fires.append(Fire(path, path != root, (node.perms, above.perms)))
            self._put(path, None, tx)

        node = self._read(root, tx)
        assert node is not None
        remove(root, node, parent)
        basename = root.rsplit("/", 1)[1]
        children = list(parent.children)
        children.remove(basename)
        self._put(parent_path, replace(parent, children=tuple(children)), tx)
        return fires

    def set_perms(
        self, caller: Caller, path: str | None, perms: Sequence[Permission], tx: Transaction | None = None
    ) -> list[Fire]:
        old = self._get_node(caller, path, PERM_WRITE | PERM_OWNER, tx)
        assert path is not None
        if not caller.privileged and perms[0].domid != old.perms[0].domid:
            raise StoreError(errno.EPERM, "only the control domain may change a node's owner")
        node = replace(old, perms=tuple(perms))
        self._check_size(caller, node)
        self._put(path, node, tx)
        # A watcher that loses access by this change still hears of it (old perms count).
        return self._fires([Fire(path, False, self._readable_via(path, node, tx, old.perms))], tx)

    # ---- transactions ---------------------------------------------------------------------

    def commit(self, tx: Transaction) -> list[Fire]:
        """Apply the overlay if nothing it looked at changed; EAGAIN otherwise."""
        for path, seen in tx.accessed.items():
            if seen.check:
                live = self._nodes.get(path)
                if (live.generation if live else NO_GENERATION) != seen.generation:
                    raise StoreError(errno.EAGAIN, f"{path} changed during the transaction")
        for path, seen in tx.accessed.items():
            if seen.modified:
                self._put(path, seen.node, None)
        fires = []
        for path, exact in tx.pending_fires.items():
            node = self._nodes.get(path)
            orig = tx.accessed[path].orig_perms if path in tx.accessed else None
            via = [orig] if orig is not None else []
            if node is not None:
                via.extend(self._readable_via(path, node, None))
            fires.append(Fire(path, exact, tuple(via)))
        return fires

    # ---- domain life cycle ----------------------------------------------------------------

    def remove_owned_by(self, domid: int) -> list[Fire]:
        """A released domain's nodes go with it (domain_tree_remove(), keep_orphans off)."""
        fires: list[Fire] = []
        stack = ["/"]
        while stack:
            path = stack.pop()
            node = self._nodes.get(path)
            if node is None:
                continue
            if path != "/" and node.perms[0].domid == domid:
                fires.extend(self._remove_subtree(path, None))
                continue
            stack.extend(child_path(path, c) for c in reversed(node.children))
        return fires

    def exists(self, path: str) -> bool:
        """For the server's own bookkeeping and tests: no permission check."""
        return path in self._nodes
