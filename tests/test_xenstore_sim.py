"""The simulated xenstored's own semantics, where they follow C xenstored 4.17:
path rules, error choices, quotas, transactions, watches, domains, the raw
protocol, and running as a process."""

import errno
import os
import signal
import socket
import subprocess
import sys

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from xenblk_vhost.sim.xenstore_guest import open_guest_xenstore
from xenblk_vhost.sim.xenstore_tree import DOM0, Store, Transaction
from xenblk_vhost.sim.xenstored import serve_xenstored
from xenblk_vhost.xen.interfaces import Permission, XenStoreError
from xenblk_vhost.xen.xenstore import XenStoreConnectionError, open_xenstore
from xenblk_vhost.xen.xs_wire import HEADER, Message, Op, Reader, join_args

N0 = Permission(0, False, False)


async def _errno_of(call):
    with pytest.raises(XenStoreError) as excinfo:
        await call
    return excinfo.value.errno


class Raw:
    """Hand-made requests on a bare socket, to see exactly what goes over the wire."""

    def __init__(self, stream):
        self.stream = stream
        self.reader = Reader()
        self.events = []

    async def receive(self) -> Message:
        while True:
            msgs = self.reader.messages()
            if msgs:
                self.reader._buf[:0] = b"".join(m.encode() for m in msgs[1:])  # keep the rest queued
                return msgs[0]
            data = await self.stream.receive_some(65536)
            if not data:
                raise EOFError
            self.reader.feed(data)

    async def call(self, op, payload, *, req_id=77, tx_id=0) -> Message:
        await self.stream.send_all(Message(op, req_id, tx_id, payload).encode())
        while True:
            msg = await self.receive()
            if msg.type == Op.WATCH_EVENT:
                self.events.append(msg.payload)
                continue
            assert (msg.req_id, msg.tx_id) == (req_id, tx_id)  # echoed, error or not
            return msg


@pytest.fixture
async def raw(xenstored):
    stream = await trio.open_unix_socket(xenstored.socket_path)
    yield Raw(stream)
    await stream.aclose()


def error(name):
    return Op.ERROR, name.encode() + b"\0"


# ---- paths -------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["", "relative//x", "/a//b", "/a/", "/a b", "/a/ü", "/a*", "@special"])
async def test_invalid_paths(xs, bad):
    assert await _errno_of(xs.write(bad, "x")) == errno.EINVAL


async def test_path_length_limit(xs):
    # 2048 characters beyond /local/domain/N/ is the limit; other paths have 2048 in all.
    base = "/local/domain/7/"
    await xs.write(base + "x" * 2048, "ok")
    assert await _errno_of(xs.write(base + "x" * 2049, "no")) == errno.EINVAL
    await xs.write("/" + "y" * 2047, "ok")
    assert await _errno_of(xs.write("/" + "y" * 2048, "no")) == errno.EINVAL


async def test_rm_root_refused(xs):
    assert await _errno_of(xs.rm("/")) == errno.EINVAL


async def test_relative_paths_are_per_domain(xenstored, xs):
    await xs.mkdir("/local/domain/5")
    await xs.set_perms("/local/domain/5", [Permission(5, False, False)])
    async with open_guest_xenstore(5, xenstored.socket_path) as guest:
        async with guest.watch("device") as events:
            assert await events.__anext__() == "device"  # relative watch, relative events
            await guest.write("device/vbd/768/state", "1")
            assert await events.__anext__() == "device/vbd/768/state"
    assert await xs.read("/local/domain/5/device/vbd/768/state") == b"1"
    await xs.write("name", "dom0")  # a dom0 socket's relative base is /local/domain/0
    assert await xs.read("/local/domain/0/name") == b"dom0"


# ---- permissions and quotas of guest connections ------------------------------------------------


async def test_guest_creates_nodes_it_owns(xenstored, xs):
    await xs.mkdir("/local/domain/5")
    await xs.set_perms("/local/domain/5", [N0, Permission(5, True, True)])
    async with open_guest_xenstore(5, xenstored.socket_path) as guest:
        await guest.write("/local/domain/5/data/x", "1")
        # Copied from the parent, with the creator as owner.
        assert await guest.get_perms("/local/domain/5/data") == [Permission(5, False, False), Permission(5, True, True)]
        # Nowhere it may not write: the nearest existing ancestor decides.
        assert await _errno_of(guest.write("/local/domain/6/x", "1")) == errno.EACCES
        assert await _errno_of(guest.mkdir("/elsewhere")) == errno.EACCES
        assert await _errno_of(guest.rm("/tool/xenstored")) == errno.EACCES


async def test_node_size_quota_applies_to_guests_only(xenstored, xs):
    await xs.mkdir("/local/domain/5")
    await xs.set_perms("/local/domain/5", [Permission(5, False, False)])
    # Record size = 24 header + 8 per permission + value + children; must stay below 2048.
    fits = b"v" * (2048 - 24 - 8 - 1)
    async with open_guest_xenstore(5, xenstored.socket_path) as guest:
        await guest.write("/local/domain/5/big", fits)
        assert await _errno_of(guest.write("/local/domain/5/big", fits + b"v")) == errno.ENOSPC
    await xs.write("/local/domain/5/big", b"v" * 4000)


async def test_guest_quotas(xenstored, xs):
    await xs.mkdir("/local/domain/5")
    await xs.set_perms("/local/domain/5", [Permission(5, False, False)])
    async with open_guest_xenstore(5, xenstored.socket_path) as guest:
        six = [Permission(5, False, False)] + [Permission(d, True, False) for d in range(1, 6)]
        assert await _errno_of(guest.set_perms("/local/domain/5", six)) == errno.ENOSPC
        await guest.set_perms("/local/domain/5", six[:5])
        stream = await trio.open_unix_socket(xenstored.socket_path)
        raw = Raw(stream)
        assert (await raw.call(Op.CONTROL, join_args("sim-domid", "5"))).payload == b"OK\0"
        replies = [await raw.call(Op.TRANSACTION_START, b"\0") for _ in range(12)]
        assert [r.type for r in replies] == [Op.TRANSACTION_START] * 11 + [Op.ERROR]
        assert replies[-1].payload == b"ENOSPC\0"
        watches = [await raw.call(Op.WATCH, join_args("/local/domain/5", f"t{n}")) for n in range(130)]
        assert [w.type for w in watches] == [Op.WATCH] * 129 + [Op.ERROR]
        assert watches[-1].payload == b"E2BIG\0"
        await stream.aclose()


# ---- transactions -------------------------------------------------------------------------


async def test_reading_an_absent_node_that_appears_conflicts(xenstored, xs):
    async with open_xenstore(xenstored.socket_path) as other:
        with pytest.raises(XenStoreError) as excinfo:
            async with xs.transaction() as t:
                assert not await t.exists("/appears")
                await other.write("/appears", "1")
                await t.write("/decision", "absent")
        assert excinfo.value.errno == errno.EAGAIN
    assert not await xs.exists("/decision")


async def test_disjoint_transactions_both_commit(xenstored, xs):
    await xs.mkdir("/left")
    await xs.mkdir("/right")
    async with open_xenstore(xenstored.socket_path) as other:
        async with xs.transaction() as t1, other.transaction() as t2:
            await t1.write("/left/value", "1")
            await t2.write("/right/value", "2")
    assert (await xs.read("/left/value"), await xs.read("/right/value")) == (b"1", b"2")


async def test_creating_siblings_concurrently_conflicts(xenstored, xs):
    # The parent's child list is part of what both transactions change.
    await xs.mkdir("/parent")
    async with open_xenstore(xenstored.socket_path) as other:
        with pytest.raises(XenStoreError) as excinfo:
            async with xs.transaction() as t1:
                async with other.transaction() as t2:
                    await t2.write("/parent/b", "2")
                    await t1.write("/parent/a", "1")
        assert excinfo.value.errno == errno.EAGAIN
    assert await xs.directory("/parent") == ["b"]


async def test_transaction_sees_untouched_nodes_change(xenstored, xs):
    # As C xenstored: no snapshot at start; what it read is what it validates.
    await xs.write("/late", "old")
    async with open_xenstore(xenstored.socket_path) as other:
        async with xs.transaction() as t:
            await other.write("/late", "new")
            assert await t.read("/late") == b"new"


async def test_watch_events_wait_for_commit(xenstored, xs):
    await xs.write("/txw/inside", "0")  # existing nodes: changing them leaves /txw's child list alone
    await xs.write("/txw/outside", "0")
    async with open_xenstore(xenstored.socket_path) as other, xs.watch("/txw") as events:
        assert await events.__anext__() == "/txw"
        async with other.transaction() as t:
            await t.write("/txw/inside", "1")
            await other.write("/txw/outside", "1")
            assert await events.__anext__() == "/txw/outside"
        assert await events.__anext__() == "/txw/inside"
        async with other.transaction() as t:
            await t.write("/txw/discarded", "1")
            await t.rm("/txw/discarded")
        assert await events.__anext__() == "/txw/discarded"  # one event per touched node


async def test_mkdir_of_existing_node_fires_nothing(xs):
    await xs.mkdir("/md")
    async with xs.watch("/md") as events:
        assert await events.__anext__() == "/md"
        await xs.mkdir("/md")
        await xs.write("/md/x", "1")
        assert await events.__anext__() == "/md/x"


async def test_removing_a_parent_fires_exact_watches_below(xs):
    await xs.write("/tree/a/b", "1")
    async with xs.watch("/tree/a/b") as below, xs.watch("/") as everything:
        assert await below.__anext__() == "/tree/a/b"
        assert await everything.__anext__() == "/"
        await xs.rm("/tree")
        assert await below.__anext__() == "/tree/a/b"
        assert await everything.__anext__() == "/tree"  # children fire only exact watches


# ---- domains ------------------------------------------------------------------------------


async def test_introduce_and_release(xenstored, xs):
    assert not await xs.is_domain_introduced(5)
    assert await xs.is_domain_introduced(0)
    await xs.mkdir("/local/domain/5")
    await xs.set_perms("/local/domain/5", [Permission(5, False, False)])
    await xs.write("/local/domain/0/backend/vbd/5/768/state", "1")  # dom0's: survives release
    async with xs.watch("@introduceDomain") as intro, xs.watch("@releaseDomain") as release:
        assert await intro.__anext__() == "@introduceDomain"
        assert await release.__anext__() == "@releaseDomain"
        await xs.introduce_domain(5, 0x1234, 3)
        assert await intro.__anext__() == "@introduceDomain"
        assert await xs.is_domain_introduced(5)
        async with open_guest_xenstore(5, xenstored.socket_path) as guest:
            await guest.write("/local/domain/5/data", "mine")
            await xs.release_domain(5)
            assert await release.__anext__() == "@releaseDomain"
            with pytest.raises(XenStoreConnectionError):
                await guest.read("/local/domain/5/data")  # the domain's connection is gone
    assert not await xs.is_domain_introduced(5)
    assert not await xs.exists("/local/domain/5")  # the domain's nodes went with it
    assert await xs.exists("/local/domain/0/backend/vbd/5/768/state")
    assert await _errno_of(xs.release_domain(5)) == errno.ENOENT
    assert await _errno_of(xs.release_domain(0)) == errno.EINVAL


async def test_special_watch_needs_permission(xenstored, xs):
    async with open_guest_xenstore(5, xenstored.socket_path) as guest:
        async with guest.watch("@introduceDomain") as events:
            assert await events.__anext__() == "@introduceDomain"  # registration always fires
            await xs.introduce_domain(6, 1, 1)  # guest may not see it
            await xs.set_perms("@introduceDomain", [N0, Permission(5, True, False)])
            await xs.introduce_domain(7, 1, 1)
            assert await events.__anext__() == "@introduceDomain"
        assert await _errno_of(guest.set_perms("@introduceDomain", [Permission(5, True, True)])) == errno.EACCES


# ---- the raw protocol ------------------------------------------------------------------------


async def test_replies_echo_header_fields(raw):
    reply = await raw.call(Op.GET_DOMAIN_PATH, b"3\0", req_id=0xDEADBEEF)
    assert (reply.type, reply.payload) == (Op.GET_DOMAIN_PATH, b"/local/domain/3\0")
    reply = await raw.call(Op.READ, b"/nope\0", req_id=5)
    assert (reply.type, reply.payload) == error("ENOENT")


async def test_malformed_requests(raw):
    assert _t(await raw.call(Op.READ, b"/tool\0extra\0")) == error("EINVAL")  # one argument only
    assert _t(await raw.call(Op.READ, b"/tool")) == error("EINVAL")  # not NUL-terminated
    assert _t(await raw.call(Op.WRITE, b"no-nul")) == error("EINVAL")
    assert _t(await raw.call(Op.WATCH, b"/a\0")) == error("EINVAL")
    assert _t(await raw.call(Op.SET_PERMS, b"/tool\0x5\0")) == error("EINVAL")
    assert _t(await raw.call(Op.SET_PERMS, b"/tool\0r5junk\0")) == error("EINVAL")
    assert _t(await raw.call(Op.TRANSACTION_END, b"maybe\0", tx_id=0)) == error("EINVAL")
    assert _t(await raw.call(Op.TRANSACTION_END, b"T\0")) == error("ENOENT")  # not in a transaction
    assert _t(await raw.call(Op.WATCH_EVENT, b"")) == error("ENOSYS")  # only xenstored sends these
    assert _t(await raw.call(20, b"")) == error("ENOSYS")  # XS_RESTRICT is gone
    assert _t(await raw.call(Op.READ, b"/tool\0", tx_id=99)) == error("ENOENT")  # unknown transaction


async def test_write_value_may_contain_nul(raw):
    assert _t(await raw.call(Op.WRITE, b"/bin\0a\0b\0")) == (Op.WRITE, b"OK\0")
    assert _t(await raw.call(Op.READ, b"/bin\0")) == (Op.READ, b"a\0b\0")


async def test_set_perms_number_formats(raw):
    # strtol(..., 0): hex and octal ids are accepted, as xenstored does.
    assert _t(await raw.call(Op.SET_PERMS, b"/tool\0n0\0r0x10\0b010\0")) == (Op.SET_PERMS, b"OK\0")
    assert _t(await raw.call(Op.GET_PERMS, b"/tool\0")) == (Op.GET_PERMS, b"n0\0r16\0b8\0")


async def test_nested_transaction_refused(raw):
    start = await raw.call(Op.TRANSACTION_START, b"\0")
    tx_id = int(start.payload.rstrip(b"\0"))
    assert tx_id == 1
    assert _t(await raw.call(Op.TRANSACTION_START, b"\0", tx_id=tx_id)) == error("EBUSY")
    assert _t(await raw.call(Op.TRANSACTION_END, b"F\0", tx_id=tx_id)) == (Op.TRANSACTION_END, b"OK\0")


async def test_directory_too_long_for_one_reply(raw, xs):
    async with xs.transaction() as t:
        for n in range(300):
            await t.mkdir(f"/wide/{'n' * 12}{n:04d}")
    assert _t(await raw.call(Op.DIRECTORY, b"/wide\0")) == error("E2BIG")
    part = await raw.call(Op.DIRECTORY_PART, b"/wide\0" + b"0\0")
    gen, _, names = part.payload.partition(b"\0")
    assert gen.isdigit() and len(part.payload) <= 4096 and not names.endswith(b"\0\0")
    rest = await raw.call(Op.DIRECTORY_PART, b"/wide\0" + str(len(names)).encode() + b"\0")
    gen2, _, more = rest.payload.partition(b"\0")
    assert gen2 == gen and more.endswith(b"\0\0")
    assert (names + more[:-1]).split(b"\0")[:-1] == [f"{'n' * 12}{n:04d}".encode() for n in range(300)]


async def test_oversized_message_drops_the_connection(raw, xenstored):
    await raw.stream.send_all(HEADER.pack(Op.READ, 1, 0, 4097) + b"x" * 100)
    with pytest.raises(EOFError):
        await raw.receive()
    async with open_xenstore(xenstored.socket_path) as xs:  # the daemon itself carries on
        assert await xs.read("/tool") == b""


async def test_control_commands(xs):
    assert await xs.control("check") == b"OK\0"
    assert await xs.control("print", "hello from a test") == b"OK\0"
    assert b"sim-domid\t" in await xs.control("help")
    assert await _errno_of(xs.control("no-such-command")) == errno.EINVAL


def _t(msg):
    return msg.type, msg.payload


# ---- as a process ------------------------------------------------------------------------------


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
async def test_runs_as_a_process_until_signalled(tmp_path, stop):
    path = str(tmp_path / "daemon.sock")
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "xenblk_vhost.sim.xenstored", "--socket", path], stderr=subprocess.PIPE
    )
    try:
        with trio.fail_after(30):
            banner = b""
            while b"\n" not in banner:
                chunk = await proc.stderr.receive_some(4096)
                assert chunk, f"daemon exited early: {banner!r}"
                banner += chunk
            assert (
                banner.decode()
                == f"xenblk_vhost.sim.xenstored: simulated xenstored listening on {path} (pid {proc.pid})\n"
            )
            env = dict(os.environ, XENSTORED_PATH=path)
            done = await trio.run_process(["xenstore-write", "/from/tool", "1"], env=env, check=False)
            assert done.returncode == 0
            async with open_xenstore(path) as xs:
                assert await xs.read("/from/tool") == b"1"
            proc.send_signal(stop)
            assert await proc.wait() == 0
            assert await proc.stderr.receive_some(4096) == b""  # one line at start, nothing else
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await proc.stderr.aclose()
    assert not os.path.exists(path)


async def test_user_errors_come_out_unwrapped(xenstored):
    with pytest.raises(KeyError):
        async with open_xenstore(xenstored.socket_path):
            raise KeyError("mine")
    with pytest.raises(KeyError):
        async with serve_xenstored(xenstored.socket_path + "2"):
            raise KeyError("mine")


async def test_refuses_a_live_socket_and_reuses_a_stale_one(tmp_path):
    path = str(tmp_path / "s.sock")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)  # a socket file nobody listens on
    stale.close()
    async with serve_xenstored(path) as server:
        with pytest.raises(FileExistsError):
            async with serve_xenstored(path):
                pass
        async with open_xenstore(server.socket_path) as xs:
            assert await xs.read("/tool") == b""


async def test_unwrapped_errors_keep_their_cause(xenstored):
    with pytest.raises(KeyError) as excinfo:
        async with open_xenstore(xenstored.socket_path):
            try:
                raise ValueError("root cause")
            except ValueError as e:
                raise KeyError("mine") from e
    assert isinstance(excinfo.value.__cause__, ValueError)
    assert not isinstance(excinfo.value.__context__, BaseExceptionGroup)


async def test_reset_watches_forgets_watches_and_transactions(raw):
    assert _t(await raw.call(Op.WATCH, join_args("/r", "tok"))) == (Op.WATCH, b"OK\0")
    assert _t(await raw.call(Op.WATCH, join_args("/r", "tok"))) == error("EEXIST")
    tx_id = int((await raw.call(Op.TRANSACTION_START, b"\0")).payload.rstrip(b"\0"))
    assert _t(await raw.call(Op.RESET_WATCHES, b"\0")) == (Op.RESET_WATCHES, b"OK\0")
    assert _t(await raw.call(Op.WATCH, join_args("/r", "tok"))) == (Op.WATCH, b"OK\0")  # gone, so allowed again
    assert _t(await raw.call(Op.TRANSACTION_END, b"T\0", tx_id=tx_id)) == error("ENOENT")
    assert raw.events == [b"/r\0tok\0", b"/r\0tok\0"]  # one registration fire per WATCH


async def test_set_target_lets_a_stub_domain_act_for_its_guest(xenstored, xs, raw):
    await xs.mkdir("/local/domain/5/device")
    await xs.set_perms("/local/domain/5/device", [Permission(5, False, False)])
    async with open_guest_xenstore(6, xenstored.socket_path) as stubdom:
        assert await _errno_of(stubdom.write("/local/domain/5/device/x", "1")) == errno.EACCES
        # SET_TARGET needs both domains introduced.
        assert _t(await raw.call(Op.SET_TARGET, join_args("6", "5"))) == error("ENOENT")
        await xs.introduce_domain(5, 1, 1)
        await xs.introduce_domain(6, 1, 1)
        assert _t(await raw.call(Op.SET_TARGET, join_args("6", "5"))) == (Op.SET_TARGET, b"OK\0")
        await stubdom.write("/local/domain/5/device/x", "1")  # now as good as the owner
    assert _t(await raw.call(Op.RESUME, join_args("5"))) == (Op.RESUME, b"OK\0")
    assert _t(await raw.call(Op.RESUME, join_args("9"))) == error("ENOENT")
    assert _t(await raw.call(Op.IS_DOMAIN_INTRODUCED, join_args(str(0x7FF0)))) == (Op.IS_DOMAIN_INTRODUCED, b"T\0")


# ---- the tree against a plain model ---------------------------------------------------------

_paths = st.lists(st.sampled_from("abc"), min_size=1, max_size=4).map(lambda parts: "/" + "/".join(parts))
_ops = st.lists(st.tuples(st.sampled_from(["write", "mkdir", "rm"]), _paths, st.binary(max_size=3)), max_size=25)


def _model_apply(model: dict, op: str, path: str, value: bytes) -> None:
    """Xenstore semantics in the plainest terms: a dict of path -> value."""
    parents = []
    p = path
    while (p := p.rsplit("/", 1)[0] or "/") != "/":
        parents.append(p)
    if op == "rm":
        if path in model or path.rsplit("/", 1)[0] in model or path.count("/") == 1:
            for k in [k for k in model if k == path or k.startswith(path + "/")]:
                del model[k]
        return
    for p in parents:
        model.setdefault(p, b"")
    if op == "write":
        model[path] = value
    else:
        model.setdefault(path, b"")


def _dump(store: Store) -> dict:
    out, stack = {}, ["/"]
    while stack:
        path = stack.pop()
        for name in store.directory(DOM0, path).children:
            child = f"/{name}" if path == "/" else f"{path}/{name}"
            out[child] = store.read(DOM0, child)
            stack.append(child)
    return out


@settings(max_examples=80, deadline=None)
@given(_ops, st.booleans())
def test_tree_matches_model(ops, in_transaction):
    store, model = Store(), {"/tool": b"", "/tool/xenstored": b""}
    tx = Transaction(1) if in_transaction else None
    for op, path, value in ops:
        try:
            getattr(store, op)(DOM0, path, *([value] if op == "write" else []), tx)
        except Exception as e:  # only rm below a missing parent may fail
            assert op == "rm" and e.errno == errno.ENOENT
        _model_apply(model, op, path, value)
    if tx is not None:
        store.commit(tx)
    assert _dump(store) == model
