"""Request handling of the simulated xenstored, sans-I/O.

`XenstoredCore` takes one decoded request from one connection and returns
the messages to send (the reply, and watch events for any connection) and
the connections to drop. `xenstored.py` does the sockets. The semantics are
those of C xenstored in Xen 4.17 (tools/xenstore/xenstored_core.c,
_watch.c, _domain.c, _control.c); where the simulation differs, the module
docstring of xenstored.py says so.

Connections are dom0 (privileged) unless they drop to a guest domain with
the sim-only control command, sent as the connection's first request:

    CONTROL "sim-domid\\0<N>\\0"   ->  "OK"   (EBUSY if not the first request)

CONTROL is privileged-only, so once a connection is domain N it stays N.
"""

from __future__ import annotations

import errno
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from xenblk_vhost.xen.interfaces import Permission
from xenblk_vhost.xen.xs_wire import ERRNO_NAMES, PAYLOAD_MAX, REL_PATH_MAX, Message, Op

from .xenstore_tree import (
    PERM_OWNER,
    PERM_READ,
    PERM_WRITE,
    Caller,
    Fire,
    Store,
    StoreError,
    Transaction,
    is_child,
    is_valid_path,
    perm_for,
)

log = logging.getLogger(__name__)

DOMID_SELF = 0x7FF0
DOMID_FIRST_RESERVED = 0x7FF0

# Default quotas of C xenstored that the simulation enforces on unprivileged connections.
WATCH_QUOTA = 128  # quota_nb_watch_per_domain
TRANSACTION_QUOTA = 10  # quota_max_transaction
PERMS_QUOTA = 5  # quota_nb_perms_per_node

SIM_DOMID_COMMAND = "sim-domid"

_OK = b"OK\0"
_SPECIAL_WATCHES = ("@introduceDomain", "@releaseDomain")


@dataclass(slots=True)
class _Watch:
    node: str  # canonical path, or @special
    token: bytes
    prefix: str | None  # the implicit path a relative watch was given against


@dataclass(slots=True)
class _Connection:
    id: int
    domid: int = 0
    watches: list[_Watch] = field(default_factory=list)
    transactions: dict[int, Transaction] = field(default_factory=dict)
    next_tx_id: int = 0
    requests: int = 0


@dataclass(slots=True)
class Effects:
    """What handling one request produced, in the order it must be sent."""

    messages: list[tuple[int, Message]] = field(default_factory=list)
    disconnect: list[int] = field(default_factory=list)
    # Messages for the requester that go after its reply (a new watch's first event).
    after_reply: list[Message] = field(default_factory=list)

    def send(self, conn_id: int, msg: Message) -> None:
        self.messages.append((conn_id, msg))


def _onearg(payload: bytes) -> str | None:
    """onearg(): exactly one string, NUL-terminated, nothing after it."""
    if not payload or payload.find(b"\0") != len(payload) - 1:
        return None
    return payload[:-1].decode("latin-1")


def _strings(payload: bytes) -> list[str]:
    """get_strings(): every NUL-terminated string; bytes after the last NUL are ignored."""
    return [p.decode("latin-1") for p in payload.split(b"\0")[:-1]]


def c_atoi(text: str) -> int:
    """C atoi(): leading blanks, optional sign, digits; 0 if none; wraps like a 32-bit int."""
    m = re.match(r"[ \t\n\r\f\v]*([+-]?\d+)", text)
    if not m:
        return 0
    value = int(m.group(1)) & 0xFFFFFFFF
    return value - (1 << 32) if value >= 1 << 31 else value


def _c_strtol_base0(text: str) -> int | None:
    """strtol(text, &end, 0) that must consume everything (xs_strings_to_perms())."""
    m = re.fullmatch(r"[ \t\n\r\f\v]*([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)", text)
    if not m:
        return None
    sign, digits = m.groups()
    if digits[:2] in ("0x", "0X"):
        value = int(digits, 16)
    elif digits.startswith("0"):
        value = int(digits, 8)
    else:
        value = int(digits)
    return -value if sign == "-" else value


def parse_perms(strings: list[str]) -> list[Permission] | None:
    """Permission strings as xenstored accepts them ('r5', 'b0x10'...); None if any is bad."""
    flags = {"n": (False, False), "r": (True, False), "w": (False, True), "b": (True, True)}
    out = []
    for s in strings:
        if not s or s[0] not in flags or len(s) < 2:
            return None
        domid = _c_strtol_base0(s[1:])
        if domid is None:
            return None
        out.append(Permission(domid & 0xFFFFFFFF, *flags[s[0]]))
    return out


def format_perm(p: Permission) -> str:
    """xs_perm_to_string(): the flag, then the id printed as a C int."""
    flag = {(False, False): "n", (True, False): "r", (False, True): "w", (True, True): "b"}
    domid = p.domid - (1 << 32) if p.domid >= 1 << 31 else p.domid
    return f"{flag[(p.read, p.write)]}{domid}"


class XenstoredCore:
    """The daemon's state: the tree, connections, watches, transactions, domains."""

    def __init__(self) -> None:
        self.store = Store()
        self._conns: dict[int, _Connection] = {}
        self._next_conn_id = 1
        self._introduced: set[int] = {0}  # dom0 is introduced at start (dom0_init())
        self._targets: dict[int, int] = {}
        self._special_perms: dict[str, tuple[Permission, ...]] = {
            name: (Permission(0, False, False),) for name in _SPECIAL_WATCHES
        }
        self._handlers: dict[int, Callable[[_Connection, Message, Transaction | None, Effects], bytes]] = {
            Op.CONTROL: self._control,
            Op.DIRECTORY: self._directory,
            Op.READ: self._read,
            Op.GET_PERMS: self._get_perms,
            Op.WATCH: self._watch,
            Op.UNWATCH: self._unwatch,
            Op.TRANSACTION_START: self._transaction_start,
            Op.TRANSACTION_END: self._transaction_end,
            Op.INTRODUCE: self._introduce,
            Op.RELEASE: self._release,
            Op.GET_DOMAIN_PATH: self._get_domain_path,
            Op.WRITE: self._write,
            Op.MKDIR: self._mkdir,
            Op.RM: self._rm,
            Op.SET_PERMS: self._set_perms,
            Op.IS_DOMAIN_INTRODUCED: self._is_domain_introduced,
            Op.RESUME: self._resume,
            Op.SET_TARGET: self._set_target,
            Op.RESET_WATCHES: self._reset_watches,
            Op.DIRECTORY_PART: self._directory_part,
        }

    # XS_FLAG_PRIV and XS_FLAG_NOTID of wire_funcs[].
    _PRIVILEGED_OPS = frozenset(
        {Op.CONTROL, Op.INTRODUCE, Op.RELEASE, Op.IS_DOMAIN_INTRODUCED, Op.RESUME, Op.SET_TARGET}
    )
    _NO_TRANSACTION_OPS = frozenset({Op.WATCH, Op.UNWATCH})

    # ---- connections -------------------------------------------------------------------

    def open_connection(self) -> int:
        conn = _Connection(self._next_conn_id)
        self._next_conn_id += 1
        self._conns[conn.id] = conn
        return conn.id

    def close_connection(self, conn_id: int) -> None:
        """Forget a connection with its watches and transactions. Idempotent."""
        self._conns.pop(conn_id, None)

    def connection_domid(self, conn_id: int) -> int:
        return self._conns[conn_id].domid

    def _caller(self, conn: _Connection) -> Caller:
        return Caller(conn.domid, self._targets.get(conn.domid) if conn.domid else None)

    def _canonical(self, conn: _Connection, path: str | None) -> str | None:
        """canonicalize(): relative paths are below the connection's /local/domain/N."""
        if path is None or path.startswith("/") or path.startswith("@"):
            return path
        return f"/local/domain/{conn.domid}/{path}"

    # ---- dispatch ----------------------------------------------------------------------

    def handle(self, conn_id: int, msg: Message) -> Effects:
        """Process one request (process_message()) and say what to send."""
        eff = Effects()
        conn = self._conns.get(conn_id)
        if conn is None:
            return eff
        try:
            handler = self._handlers.get(msg.type)
            if handler is None:
                raise StoreError(errno.ENOSYS, f"unknown operation {msg.type}")
            if msg.type in self._PRIVILEGED_OPS and not self._caller(conn).privileged:
                raise StoreError(errno.EACCES, "privileged operation")
            tx = None
            if msg.type not in self._NO_TRANSACTION_OPS and msg.tx_id != 0:
                tx = conn.transactions.get(msg.tx_id)
                if tx is None:
                    raise StoreError(errno.ENOENT, f"no transaction {msg.tx_id}")
            reply = handler(conn, msg, tx, eff)
            if len(reply) > PAYLOAD_MAX:
                raise StoreError(errno.E2BIG, "reply too long")
        except StoreError as e:
            name = ERRNO_NAMES.get(e.errno, "EINVAL")
            eff.send(conn_id, Message(Op.ERROR, msg.req_id, msg.tx_id, name.encode() + b"\0"))
        else:
            eff.send(conn_id, Message(msg.type, msg.req_id, msg.tx_id, reply))
            for m in eff.after_reply:
                eff.send(conn_id, m)
        eff.after_reply.clear()
        conn.requests += 1
        return eff

    def _fire(self, fires: list[Fire], eff: Effects) -> None:
        """fire_watches(): one event per matching watch the watcher may see."""
        for fire in fires:
            for conn in self._conns.values():
                if not conn.watches:
                    continue
                caller = self._caller(conn)
                if fire.special:
                    if not perm_for(caller, self._special_perms[fire.path]) & PERM_READ:
                        continue
                elif not caller.privileged and not any(perm_for(caller, p) & PERM_READ for p in fire.readable_via):
                    continue
                for w in conn.watches:
                    hit = fire.path == w.node if fire.exact else is_child(fire.path, w.node)
                    if hit:
                        event = self._event(w, fire.path)
                        if event is not None:
                            eff.send(conn.id, event)

    @staticmethod
    def _event(w: _Watch, path: str) -> Message | None:
        if w.prefix is not None:
            path = path[len(w.prefix):].removeprefix("/")
        payload = path.encode("latin-1") + b"\0" + w.token + b"\0"
        if len(payload) > PAYLOAD_MAX:
            return None  # send_event() drops over-long events
        return Message(Op.WATCH_EVENT, 0, 0, payload)

    # ---- data base operations ----------------------------------------------------------

    def _read(self, conn, msg, tx, eff) -> bytes:
        return self.store.read(self._caller(conn), self._canonical(conn, _onearg(msg.payload)), tx)

    def _get_perms(self, conn, msg, tx, eff) -> bytes:
        perms = self.store.get_perms(self._caller(conn), self._canonical(conn, _onearg(msg.payload)), tx)
        return b"".join(format_perm(p).encode() + b"\0" for p in perms)

    def _directory(self, conn, msg, tx, eff) -> bytes:
        node = self.store.directory(self._caller(conn), self._canonical(conn, _onearg(msg.payload)), tx)
        return b"".join(c.encode("latin-1") + b"\0" for c in node.children)

    def _directory_part(self, conn, msg, tx, eff) -> bytes:
        """send_directory_part(): the child list from a byte offset, led by the node's generation."""
        if msg.payload.count(b"\0") != 2:
            raise StoreError(errno.EINVAL, "DIRECTORY_PART takes a path and an offset")
        path, offset = _strings(msg.payload)
        node = self.store.directory(self._caller(conn), self._canonical(conn, path), tx)
        children = b"".join(c.encode("latin-1") + b"\0" for c in node.children)
        off = c_atoi(offset) & 0xFFFFFFFF
        gen = str(node.generation).encode() + b"\0"
        if off >= len(children):
            return gen + b"\0"
        room = PAYLOAD_MAX - len(gen) - 1
        end = off
        while True:
            nul = children.index(b"\0", end)
            if (end - off) + (nul - end) >= room:
                break
            end = nul + 1
            if end == len(children):
                break
        chunk = children[off:end]
        return gen + chunk + (b"\0" if end == len(children) else b"")

    def _write(self, conn, msg, tx, eff) -> bytes:
        nul = msg.payload.find(b"\0")
        if nul < 0:
            raise StoreError(errno.EINVAL, "WRITE needs a path")
        path = self._canonical(conn, msg.payload[:nul].decode("latin-1"))
        self._fire(self.store.write(self._caller(conn), path, msg.payload[nul + 1:], tx), eff)
        return _OK

    def _mkdir(self, conn, msg, tx, eff) -> bytes:
        self._fire(self.store.mkdir(self._caller(conn), self._canonical(conn, _onearg(msg.payload)), tx), eff)
        return _OK

    def _rm(self, conn, msg, tx, eff) -> bytes:
        self._fire(self.store.rm(self._caller(conn), self._canonical(conn, _onearg(msg.payload)), tx), eff)
        return _OK

    def _set_perms(self, conn, msg, tx, eff) -> bytes:
        caller = self._caller(conn)
        count = msg.payload.count(b"\0")
        if count < 2:
            raise StoreError(errno.EINVAL, "SET_PERMS needs a path and at least one permission")
        if not caller.privileged and count - 1 > PERMS_QUOTA:
            raise StoreError(errno.ENOSPC, "too many permissions")
        strings = _strings(msg.payload)
        perms = parse_perms(strings[1:])
        if perms is None:
            raise StoreError(errno.EINVAL, "bad permission string")
        path = strings[0]
        if path.startswith("@"):
            current = self._special_perms.get(path)
            if current is None:
                raise StoreError(errno.EINVAL, f"no special node {path}")
            if perm_for(caller, current) & (PERM_WRITE | PERM_OWNER) != PERM_WRITE | PERM_OWNER:
                raise StoreError(errno.EACCES, path)
            self._special_perms[path] = tuple(perms)
            return _OK
        self._fire(self.store.set_perms(caller, self._canonical(conn, path), perms, tx), eff)
        return _OK

    # ---- watches -----------------------------------------------------------------------

    def _watch(self, conn, msg, tx, eff) -> bytes:
        strings = _strings(msg.payload)
        if len(strings) != 2:
            raise StoreError(errno.EINVAL, "WATCH takes a path and a token")
        path, token = strings
        prefix = None
        if path.startswith("@"):
            if len(path) > REL_PATH_MAX:
                raise StoreError(errno.EINVAL, "special watch name too long")
        else:
            if not path.startswith("/"):
                prefix = f"/local/domain/{conn.domid}"
            canonical = self._canonical(conn, path)
            assert canonical is not None  # a path in, a path out
            path = canonical
            if not is_valid_path(path):
                raise StoreError(errno.EINVAL, f"invalid path {path!r}")
        token_bytes = token.encode("latin-1")
        if any(w.node == path and w.token == token_bytes for w in conn.watches):
            raise StoreError(errno.EEXIST, "watch already set")
        if not self._caller(conn).privileged and len(conn.watches) > WATCH_QUOTA:
            raise StoreError(errno.E2BIG, "too many watches")
        w = _Watch(path, token_bytes, prefix)
        conn.watches.append(w)
        # "We fire once up front": after the reply, always, whatever the permissions.
        event = self._event(w, path)
        if event is not None:
            eff.after_reply.append(event)
        return _OK

    def _unwatch(self, conn, msg, tx, eff) -> bytes:
        strings = _strings(msg.payload)
        if len(strings) != 2:
            raise StoreError(errno.EINVAL, "UNWATCH takes a path and a token")
        path = self._canonical(conn, strings[0])
        token = strings[1].encode("latin-1")
        for i, w in enumerate(conn.watches):
            if w.node == path and w.token == token:
                del conn.watches[i]
                return _OK
        raise StoreError(errno.ENOENT, "no such watch")

    def _reset_watches(self, conn, msg, tx, eff) -> bytes:
        conn.watches.clear()
        conn.transactions.clear()
        return _OK

    # ---- transactions ------------------------------------------------------------------

    def _transaction_start(self, conn, msg, tx, eff) -> bytes:
        if tx is not None:
            raise StoreError(errno.EBUSY, "no nested transactions")
        if not self._caller(conn).privileged and len(conn.transactions) > TRANSACTION_QUOTA:
            raise StoreError(errno.ENOSPC, "too many transactions")
        while True:  # next unused id; 0 means "no transaction"
            tx_id = conn.next_tx_id
            conn.next_tx_id = (tx_id + 1) & 0xFFFFFFFF
            if tx_id != 0 and tx_id not in conn.transactions:
                break
        conn.transactions[tx_id] = Transaction(tx_id)
        return f"{tx_id}\0".encode()

    def _transaction_end(self, conn, msg, tx, eff) -> bytes:
        arg = _onearg(msg.payload)
        if arg not in ("T", "F"):
            raise StoreError(errno.EINVAL, "TRANSACTION_END takes T or F")
        if tx is None:
            raise StoreError(errno.ENOENT, "not in a transaction")
        del conn.transactions[tx.id]
        if arg == "T":
            self._fire(self.store.commit(tx), eff)
        return _OK

    # ---- domains -----------------------------------------------------------------------

    def _get_domain_path(self, conn, msg, tx, eff) -> bytes:
        arg = _onearg(msg.payload)
        if arg is None:
            raise StoreError(errno.EINVAL, "GET_DOMAIN_PATH takes a domid")
        return f"/local/domain/{c_atoi(arg) & 0xFFFFFFFF}\0".encode()

    def _is_domain_introduced(self, conn, msg, tx, eff) -> bytes:
        arg = _onearg(msg.payload)
        if arg is None:
            raise StoreError(errno.EINVAL, "IS_DOMAIN_INTRODUCED takes a domid")
        domid = c_atoi(arg)
        return b"T\0" if domid == DOMID_SELF or domid in self._introduced else b"F\0"

    def _introduce(self, conn, msg, tx, eff) -> bytes:
        strings = _strings(msg.payload)
        if len(strings) < 3:
            raise StoreError(errno.EINVAL, "INTRODUCE takes domid, gfn, port")
        domid, port = c_atoi(strings[0]), c_atoi(strings[2])
        if port <= 0 or not 0 < domid < DOMID_FIRST_RESERVED:
            raise StoreError(errno.EINVAL, "bad domid or port")
        if domid not in self._introduced:
            self._introduced.add(domid)
            self._fire([Fire("@introduceDomain", True, special=True)], eff)
        return _OK

    def _known_domain(self, msg: Message) -> int:
        """onearg_domain(): a non-zero, introduced domid."""
        arg = _onearg(msg.payload)
        if arg is None or c_atoi(arg) == 0:
            raise StoreError(errno.EINVAL, "need a domid other than 0")
        domid = c_atoi(arg)
        if domid not in self._introduced:
            raise StoreError(errno.ENOENT, f"domain {domid} not introduced")
        return domid

    def _release(self, conn, msg, tx, eff) -> bytes:
        domid = self._known_domain(msg)
        self._introduced.discard(domid)
        self._targets.pop(domid, None)
        # The domain's own connections go first, so they see nothing of its removal.
        for other in [c for c in self._conns.values() if c.domid == domid]:
            self.close_connection(other.id)
            eff.disconnect.append(other.id)
        self._fire(self.store.remove_owned_by(domid), eff)
        for name, perms in self._special_perms.items():
            self._special_perms[name] = perms[:1] + tuple(p for p in perms[1:] if p.domid != domid)
        self._fire([Fire("@releaseDomain", True, special=True)], eff)
        return _OK

    def _resume(self, conn, msg, tx, eff) -> bytes:
        self._known_domain(msg)
        return _OK

    def _set_target(self, conn, msg, tx, eff) -> bytes:
        strings = _strings(msg.payload)
        if len(strings) < 2:
            raise StoreError(errno.EINVAL, "SET_TARGET takes two domids")
        domid, target = c_atoi(strings[0]), c_atoi(strings[1])
        for d in (domid, target):
            if d not in self._introduced:
                raise StoreError(errno.ENOENT, f"domain {d} not introduced")
        self._targets[domid] = target
        return _OK

    # ---- control -----------------------------------------------------------------------

    _CONTROL_HELP = (
        ("check", ""),
        ("log", "on|off"),
        ("print", "<string>"),
        ("help", ""),
        (SIM_DOMID_COMMAND, "<domid>  (simulation: make this connection that domain; first request only)"),
    )

    def _control(self, conn, msg, tx, eff) -> bytes:
        strings = _strings(msg.payload)
        if not strings:
            raise StoreError(errno.EINVAL, "CONTROL needs a command")
        cmd, args = strings[0], strings[1:]
        if cmd == "check" and not args:
            return _OK
        if cmd == "log" and args in (["on"], ["off"]):
            return _OK
        if cmd == "print" and len(args) == 1:
            log.info("control: %s", args[0])
            return _OK
        if cmd == "help" and not args:
            return "".join(f"{c}\t{p}\n" for c, p in self._CONTROL_HELP).encode() + b"\0"
        if cmd == SIM_DOMID_COMMAND and len(args) == 1:
            if conn.requests:
                raise StoreError(errno.EBUSY, "sim-domid must be the first request")
            domid = c_atoi(args[0])
            if not 0 < domid < DOMID_FIRST_RESERVED:
                raise StoreError(errno.EINVAL, f"bad domid {args[0]!r}")
            conn.domid = domid
            log.debug("connection %d is now domain %d", conn.id, domid)
            return _OK
        raise StoreError(errno.EINVAL, f"unknown control command {cmd!r}")
