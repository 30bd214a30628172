"""Our xenstore client: every operation against the simulated xenstored, plus
hand-written servers for what a well-behaved xenstored never does (answers out
of order, hangs up mid-request), and the character-device path through a pty."""

import errno
import logging
import os
import pty
import tty

import pytest
import trio
import trio.testing

from xenblk_vhost.sim.xenstore_guest import open_guest_xenstore
from xenblk_vhost.sim.xenstored import run_xenstored
from xenblk_vhost.xen import xenstore as xenstore_module
from xenblk_vhost.xen.interfaces import Permission, XenStoreError
from xenblk_vhost.xen.xenstore import (
    XenStoreConnectionError,
    XenStoreRetriesExhausted,
    open_xenstore,
    xenstore_path,
)
from xenblk_vhost.xen.xs_wire import Message, Op, Reader

N0 = Permission(0, False, False)


def _err(excinfo) -> tuple:
    e = excinfo.value
    return e.errno, e.strerror, e.filename


# ---- data base operations ------------------------------------------------------------


async def test_read_write_values(xs):
    await xs.write("/a/str", "héllo")
    await xs.write("/a/bytes", b"\x00\x01binary\xff")
    await xs.write("/a/empty", "")
    assert await xs.read("/a/str") == "héllo".encode()
    assert await xs.read("/a/bytes") == b"\x00\x01binary\xff"
    assert await xs.read("/a/empty") == b""
    await xs.write("/a/str", "replaced")
    assert await xs.read("/a/str") == b"replaced"


async def test_write_creates_parents_with_empty_values(xs):
    await xs.write("/p/q/r", "v")
    assert await xs.read("/p") == b"" and await xs.read("/p/q") == b""
    assert await xs.directory("/p") == ["q"]


async def test_errors_carry_errno_name_and_path(xs):
    with pytest.raises(XenStoreError) as excinfo:
        await xs.read("/does/not/exist")
    assert _err(excinfo) == (errno.ENOENT, "ENOENT", "/does/not/exist")
    with pytest.raises(XenStoreError) as excinfo:
        await xs.write("/bad//path", "x")
    assert _err(excinfo) == (errno.EINVAL, "EINVAL", "/bad//path")


async def test_oversized_request_refused_locally(xs):
    with pytest.raises(XenStoreError) as excinfo:
        await xs.write("/big", b"x" * 4096)
    assert excinfo.value.errno == errno.E2BIG
    await xs.write("/big", b"x" * (4096 - len("/big") - 1))  # exactly the limit is fine
    assert len(await xs.read("/big")) == 4091


async def test_mkdir_rm_exists_directory(xs):
    await xs.mkdir("/m/n")
    await xs.write("/m/n/leaf", "1")
    await xs.mkdir("/m/n")  # existing: no-op, keeps children and value
    assert await xs.directory("/m/n") == ["leaf"]
    assert await xs.exists("/m/n/leaf")
    await xs.rm("/m")
    assert not await xs.exists("/m/n/leaf") and not await xs.exists("/m")
    await xs.rm("/m")  # already gone, parent exists: fine
    with pytest.raises(XenStoreError) as excinfo:
        await xs.rm("/m/gone/too")  # parent missing as well
    assert excinfo.value.errno == errno.ENOENT
    assert await xs.directory("/") == ["tool"]


async def test_perms_roundtrip(xs):
    await xs.write("/perm/node", "1")
    perms = [Permission(0, False, False), Permission(5, True, False), Permission(7, True, True),
             Permission(9, False, True)]
    await xs.set_perms("/perm/node", perms)
    assert await xs.get_perms("/perm/node") == perms
    await xs.write("/perm/node/child", "1")  # a new node inherits its parent's perms
    assert await xs.get_perms("/perm/node/child") == perms


async def test_get_domain_path(xs):
    assert await xs.get_domain_path(0) == "/local/domain/0"
    assert await xs.get_domain_path(42) == "/local/domain/42"


async def test_many_tasks_share_one_connection(xs):
    results = {}

    async def worker(n):
        await xs.write(f"/many/{n}", str(n * n))
        results[n] = await xs.read(f"/many/{n}")

    async with trio.open_nursery() as nursery:
        for n in range(60):
            nursery.start_soon(worker, n)
    assert results == {n: str(n * n).encode() for n in range(60)}
    assert sorted(await xs.directory("/many"), key=int) == [str(n) for n in range(60)]


async def test_long_directory_paged(xs):
    names = [f"n{i:06d}-{'x' * 20}" for i in range(300)]  # ~8.4 KB of names
    async with xs.transaction() as t:
        for name in names:
            await t.mkdir(f"/long/{name}")
    assert await xs.directory("/long") == names


# ---- transactions --------------------------------------------------------------------


async def test_transaction_commits_on_exit_and_is_invisible_before(xenstored, xs):
    async with open_xenstore(xenstored.socket_path) as other:
        async with xs.transaction() as t:
            await t.write("/tx/a", "1")
            await t.write("/tx/b", "2")
            assert await t.read("/tx/a") == b"1"
            assert not await other.exists("/tx/a")
        assert await other.read("/tx/a") == b"1" and await other.read("/tx/b") == b"2"


async def test_transaction_aborts_when_block_raises(xs):
    with pytest.raises(KeyError):
        async with xs.transaction() as t:
            await t.write("/abort/a", "1")
            raise KeyError("boom")
    assert not await xs.exists("/abort")


async def test_transaction_aborts_when_cancelled(xs):
    with trio.move_on_after(0):  # already expired: the first checkpoint inside cancels
        async with xs.transaction() as t:
            await t.write("/cancelled", "1")
    assert not await xs.exists("/cancelled")
    await xs.write("/after", "ok")  # the connection is still in a sane state
    assert await xs.read("/after") == b"ok"


async def test_transaction_handle_dies_with_the_transaction(xs):
    async with xs.transaction() as t:
        await t.write("/h", "1")
    with pytest.raises(RuntimeError):
        await t.read("/h")


async def test_conflict_between_two_clients(xenstored, xs):
    await xs.write("/conf/counter", "0")
    async with open_xenstore(xenstored.socket_path) as other:
        with pytest.raises(XenStoreError) as excinfo:
            async with xs.transaction() as t:
                seen = int(await t.read("/conf/counter"))
                await other.write("/conf/counter", "100")  # someone else commits meanwhile
                await t.write("/conf/counter", str(seen + 1))
                await t.write("/conf/flag", "set")
        assert _err(excinfo)[:2] == (errno.EAGAIN, "EAGAIN")
    assert await xs.read("/conf/counter") == b"100"  # the other write survived
    assert not await xs.exists("/conf/flag")  # nothing of ours leaked


async def test_transact_retries_until_it_commits(xenstored, xs):
    await xs.write("/retry/counter", "0")
    attempts = 0
    async with open_xenstore(xenstored.socket_path) as other:

        async def increment(t):
            nonlocal attempts
            attempts += 1
            value = int(await t.read("/retry/counter"))
            if attempts < 3:  # interfere twice
                await other.write("/retry/counter", str(value + 10))
            await t.write("/retry/counter", str(value + 1))
            return value + 1

        assert await xs.transact(increment) == 21
    assert attempts == 3
    assert await xs.read("/retry/counter") == b"21"


async def test_transact_gives_up_with_a_clear_error(xenstored, xs):
    await xs.write("/hot", "0")
    calls = 0
    async with open_xenstore(xenstored.socket_path) as other:

        async def always_conflicts(t):
            nonlocal calls
            calls += 1
            await t.read("/hot")
            await other.write("/hot", str(calls))

        with pytest.raises(XenStoreRetriesExhausted) as excinfo:
            await xs.transact(always_conflicts, attempts=4)
    assert calls == 4
    assert excinfo.value.errno == errno.EAGAIN and "after 4 attempts" in str(excinfo.value)


async def test_transact_passes_other_errors_through(xs):
    async def bad(t):
        await t.read("/no/such/node")

    with pytest.raises(XenStoreError) as excinfo:
        await xs.transact(bad)
    assert excinfo.value.errno == errno.ENOENT


# ---- permissions: a guest connection ----------------------------------------------------


async def _make_vbd(xs, domid=5, devid=51712):
    """What the toolstack sets up for a disk: backend nodes dom0's, frontend nodes the guest's."""
    be = f"/local/domain/0/backend/vbd/{domid}/{devid}"
    fe = f"/local/domain/{domid}/device/vbd/{devid}"
    await xs.write(f"{be}/state", "1")
    await xs.set_perms(be, [N0, Permission(domid, True, False)])
    await xs.set_perms(f"{be}/state", [N0, Permission(domid, True, False)])
    await xs.write(f"{be}/secret", "dom0 only")
    await xs.set_perms(f"{be}/secret", [N0])
    await xs.mkdir(fe)
    await xs.set_perms(fe, [Permission(domid, False, False), Permission(0, True, False)])
    return be, fe


async def test_guest_cannot_write_backend_nodes(xenstored, xs):
    be, fe = await _make_vbd(xs)
    async with open_guest_xenstore(5, xenstored.socket_path) as guest:
        assert await guest.read(f"{be}/state") == b"1"
        with pytest.raises(XenStoreError) as excinfo:
            await guest.write(f"{be}/state", "4")
        assert _err(excinfo) == (errno.EACCES, "EACCES", f"{be}/state")
        with pytest.raises(XenStoreError) as excinfo:
            await guest.read(f"{be}/secret")
        assert excinfo.value.errno == errno.EACCES
        with pytest.raises(XenStoreError) as excinfo:
            await guest.set_perms(f"{be}/state", [N0, Permission(5, True, True)])
        assert excinfo.value.errno == errno.EACCES
        # Missing below a readable node: ENOENT; below an unreadable one: EACCES (no leak).
        with pytest.raises(XenStoreError) as excinfo:
            await guest.read(f"{be}/missing")
        assert excinfo.value.errno == errno.ENOENT
        with pytest.raises(XenStoreError) as excinfo:
            await guest.read("/local/domain/0/elsewhere")
        assert excinfo.value.errno == errno.EACCES
    assert await xs.read(f"{be}/state") == b"1"


async def test_guest_writes_its_own_frontend_subtree(xenstored, xs):
    be, fe = await _make_vbd(xs)
    async with open_guest_xenstore(5, xenstored.socket_path) as guest:
        await guest.write(f"{fe}/state", "3")
        await guest.write(f"{fe}/ring-ref", "8")
        assert await guest.get_perms(f"{fe}/state") == [Permission(5, False, False), Permission(0, True, False)]
        # The guest owns the node, so it may change who else reads it, but not the owner.
        await guest.set_perms(f"{fe}/ring-ref", [Permission(5, False, False), Permission(0, True, True)])
        with pytest.raises(XenStoreError) as excinfo:
            await guest.set_perms(f"{fe}/ring-ref", [Permission(7, False, False)])
        assert excinfo.value.errno == errno.EPERM
        # Relative paths are below the guest's own /local/domain/5.
        assert await guest.read("device/vbd/51712/state") == b"3"
    assert await xs.read(f"{fe}/state") == b"3"  # dom0 reads everything


async def test_guest_has_no_control(xenstored, xs):
    async with open_guest_xenstore(5, xenstored.socket_path) as guest:
        with pytest.raises(XenStoreError) as excinfo:
            await guest.control("sim-domid", "0")  # no way back to dom0
        assert excinfo.value.errno == errno.EACCES
        with pytest.raises(XenStoreError) as excinfo:
            await guest.introduce_domain(9, 1, 1)
        assert excinfo.value.errno == errno.EACCES


async def test_domid_switch_only_as_first_request(xs):
    await xs.read("/tool")
    with pytest.raises(XenStoreError) as excinfo:
        await xs.control("sim-domid", "5")
    assert excinfo.value.errno == errno.EBUSY


# ---- watches ---------------------------------------------------------------------------


async def test_watch_registration_fire_then_subtree_events(xs):
    async with xs.watch("/wt") as events:
        assert await events.__anext__() == "/wt"  # fires once on registration, even if absent
        await xs.write("/wt/dev/state", "1")
        await xs.write("/other", "1")
        await xs.write("/wt", "top")
        await xs.rm("/wt/dev")
        got = [await events.__anext__() for _ in range(3)]
    assert got == ["/wt/dev/state", "/wt", "/wt/dev"]


async def test_watch_sees_changes_by_another_client_and_transactions(xenstored, xs):
    async with open_xenstore(xenstored.socket_path) as other, xs.watch("/shared") as events:
        assert await events.__anext__() == "/shared"
        async with other.transaction() as t:
            await t.write("/shared/a", "1")
            await t.write("/shared/b", "1")
        # Events of a transaction fire at commit, one per changed node.
        assert sorted([await events.__anext__(), await events.__anext__()]) == ["/shared/a", "/shared/b"]


async def test_unwatch_on_exit(xs):
    async with xs.watch("/u", token="tok") as events:
        assert await events.__anext__() == "/u"
    # Registering the same path and token again would be EEXIST had UNWATCH not gone out.
    async with xs.watch("/u", token="tok") as events:
        assert await events.__anext__() == "/u"
        await xs.write("/u/x", "1")
        assert await events.__anext__() == "/u/x"
    async for _ in events:  # after the block the iterator is finished
        raise AssertionError("event after unwatch")


async def test_two_watches_routed_by_token(xs):
    async with xs.watch("/one") as first, xs.watch("/two") as second:
        assert await first.__anext__() == "/one" and await second.__anext__() == "/two"
        await xs.write("/two/x", "1")
        await xs.write("/one/y", "1")
        assert await first.__anext__() == "/one/y"
        assert await second.__anext__() == "/two/x"
    with pytest.raises(ValueError):
        async with xs.watch("/a", token="same"), xs.watch("/b", token="same"):
            pass


async def test_guest_watch_only_sees_what_it_may_read(xenstored, xs):
    be, fe = await _make_vbd(xs)
    await xs.write(f"{be}/private/key", "1")
    await xs.set_perms(f"{be}/private", [N0])
    await xs.set_perms(f"{be}/private/key", [N0])
    async with open_guest_xenstore(5, xenstored.socket_path) as guest:
        async with guest.watch(be) as events:
            assert await events.__anext__() == be
            await xs.write(f"{be}/private/key", "2")  # neither it nor its parent readable by 5: no event
            await xs.write(f"{be}/secret", "changed")  # unreadable, but its parent is: event
            await xs.write(f"{be}/state", "2")
            assert await events.__anext__() == f"{be}/secret"
            assert await events.__anext__() == f"{be}/state"


async def test_slow_consumer_coalesces_and_logs(xs, caplog):
    caplog.set_level(logging.WARNING, logger="xenblk_vhost.xen.xenstore")
    async with xs.watch("/slow", max_pending=4) as events:
        for n in range(10):
            await xs.write(f"/slow/{n}", "1")  # each event precedes its write's reply
        got = [await events.__anext__() for _ in range(3)]
        assert events.coalesced == 2
    # queue: /slow /slow/0 /slow/1 /slow/2 | /slow/3 overflows -> /slow | /4 /5 /6 | /7 -> /slow | /8 /9
    assert got == ["/slow", "/slow/8", "/slow/9"]
    assert sum("coalesced into one event for '/slow'" in r.getMessage() for r in caplog.records) == 2


# ---- connections ---------------------------------------------------------------------


async def test_xenstored_path_from_environment(xenstored, monkeypatch):
    monkeypatch.setenv("XENSTORED_PATH", xenstored.socket_path)
    assert xenstore_path() == xenstored.socket_path
    async with open_xenstore() as xs:
        assert await xs.read("/tool/xenstored") == b""
    monkeypatch.delenv("XENSTORED_PATH")
    monkeypatch.setattr(xenstore_module, "DEFAULT_SOCKETS", ("/nonexistent/a", xenstored.socket_path))
    assert xenstore_path() == xenstored.socket_path
    monkeypatch.setattr(xenstore_module, "DEFAULT_SOCKETS", ("/nonexistent/a",))
    assert xenstore_path() == "/dev/xen/xenbus"
    assert xenstore_path("/explicit") == "/explicit"


async def test_calls_after_close_fail_clearly(xenstored):
    async with open_xenstore(xenstored.socket_path) as xs:
        await xs.write("/x", "1")
    assert xs.closed
    with pytest.raises(XenStoreConnectionError, match="closed by this client"):
        await xs.read("/x")


async def _fake_xenstored(path, script, *, task_status=trio.TASK_STATUS_IGNORED):
    """Accept one connection and hand (stream, reader) to `script`."""
    sock = trio.socket.socket(trio.socket.AF_UNIX)
    await sock.bind(path)
    sock.listen(1)
    task_status.started()
    conn, _ = await sock.accept()
    sock.close()
    stream = trio.SocketStream(conn)
    try:
        await script(stream, Reader())
    finally:
        await stream.aclose()


async def _next_request(stream, reader):
    """The next request, whether or not it arrived in the same read as others."""
    queued = reader.__dict__.setdefault("queued", [])
    while not queued:
        data = await stream.receive_some(4096)
        assert data
        reader.feed(data)
        queued.extend(reader.messages())
    return queued.pop(0)


async def test_replies_matched_by_req_id_not_order(tmp_path):
    path = str(tmp_path / "fake.sock")

    async def reversed_replies(stream, reader):
        first = await _next_request(stream, reader)
        second = await _next_request(stream, reader)
        for req in (second, first):  # answer the later request first
            name = req.payload.rstrip(b"\0")
            await stream.send_all(Message(req.type, req.req_id, 0, b"value of " + name).encode())

    async with trio.open_nursery() as nursery:
        await nursery.start(_fake_xenstored, path, reversed_replies)
        async with open_xenstore(path) as xs:
            results = {}

            async def read(p):
                results[p] = await xs.read(p)

            async with trio.open_nursery() as readers:
                readers.start_soon(read, "/first")
                await trio.testing.wait_all_tasks_blocked()
                readers.start_soon(read, "/second")
    assert results == {"/first": b"value of /first", "/second": b"value of /second"}


async def test_answer_then_hang_up_still_delivers_the_answer(tmp_path):
    """A reply and the end of the stream can be read back to back, before the
    caller wakes: the reply must win. Repeated, since trio's scheduling order
    varies between runs."""
    path = str(tmp_path / "fake.sock")
    sock = trio.socket.socket(trio.socket.AF_UNIX)
    await sock.bind(path)
    sock.listen(32)

    async def answer_and_close(conn):
        stream = trio.SocketStream(conn)
        req = await _next_request(stream, Reader())
        await stream.send_all(Message(req.type, req.req_id, 0, b"last words").encode())
        await stream.aclose()

    async def serve(task_status=trio.TASK_STATUS_IGNORED):
        task_status.started()
        async with trio.open_nursery() as conns:
            while True:
                conn, _ = await sock.accept()
                conns.start_soon(answer_and_close, conn)

    async with trio.open_nursery() as nursery:
        await nursery.start(serve)
        for _ in range(25):
            async with open_xenstore(path) as xs:
                assert await xs.read("/x") == b"last words"
        nursery.cancel_scope.cancel()
    sock.close()


async def test_connection_loss_fails_pending_calls_and_watches(tmp_path):
    path = str(tmp_path / "fake.sock")

    async def hang_up_mid_request(stream, reader):
        watch = await _next_request(stream, reader)
        assert watch.type == Op.WATCH
        await stream.send_all(Message(Op.WATCH, watch.req_id, 0, b"OK\0").encode())
        await stream.send_all(Message(Op.WATCH_EVENT, 0, 0, watch.payload).encode())  # path\0token\0
        read = await _next_request(stream, reader)
        assert read.type == Op.READ
        # ...and go away without answering.

    async with trio.open_nursery() as nursery:
        await nursery.start(_fake_xenstored, path, hang_up_mid_request)
        async with open_xenstore(path) as xs:
            async with xs.watch("/w") as events:
                with pytest.raises(XenStoreConnectionError, match="xenstored closed the connection"):
                    await xs.read("/pending")
                assert await events.__anext__() == "/w"  # queued events are still delivered
                with pytest.raises(XenStoreConnectionError):
                    await events.__anext__()
            with pytest.raises(XenStoreConnectionError):
                await xs.write("/later", "1")
            assert xs.closed


async def test_server_going_away_fails_watch(tmp_path):
    path = str(tmp_path / "xs.sock")
    server_scope = trio.CancelScope()

    async def server(task_status=trio.TASK_STATUS_IGNORED):
        with server_scope:
            await run_xenstored(path, task_status=task_status)

    async with trio.open_nursery() as nursery:
        await nursery.start(server)
        async with open_xenstore(path) as xs, xs.watch("/gone") as events:
            assert await events.__anext__() == "/gone"
            server_scope.cancel()  # the daemon stops and drops its connections...
            with pytest.raises(XenStoreConnectionError):
                await events.__anext__()  # ...and the watch hears about it
    assert not os.path.exists(path)


async def test_xenbus_character_device(xenstored):
    """/dev/xen/xenbus is a character device speaking the same protocol: a raw
    pty stands in for it, bridged by this test to the simulated xenstored."""
    master, slave = pty.openpty()
    tty.setraw(slave)
    slave_path = os.ttyname(slave)
    os.close(slave)
    device_side = trio.lowlevel.FdStream(master)
    daemon_side = await trio.open_unix_socket(xenstored.socket_path)

    async def pump(src, dst):
        while data := await src.receive_some(65536):
            await dst.send_all(data)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(pump, device_side, daemon_side)
        nursery.start_soon(pump, daemon_side, device_side)
        async with open_xenstore(slave_path) as xs:
            assert xs.path == slave_path
            await xs.write("/via/device", b"\x00binary\xff" * 100)
            assert await xs.read("/via/device") == b"\x00binary\xff" * 100
            async with xs.watch("/via") as events:
                assert await events.__anext__() == "/via"
        nursery.cancel_scope.cancel()
    await device_side.aclose()
    await daemon_side.aclose()
