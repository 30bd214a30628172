"""The control socket and the stats table, in process: protocol, permissions, stale sockets, client errors,
hostile requests, failing handlers."""

from __future__ import annotations

import functools
import gc
import json
import logging
import os
import socket
import stat

import pytest
import trio

from xenblk_vhost.backend.datapath.stats import RingStats, total
from xenblk_vhost.control_protocol import ControlError, ControlRefused, default_control_path, request_control
from xenblk_vhost.observability.control_socket import (
    MAX_CLIENTS,
    CommandRefused,
    ControlSocket,
    ControlSocketBusy,
    answer,
)
from xenblk_vhost.observability.stats_command import render_table


def test_default_path_is_system_wide_for_root_and_per_user_otherwise():
    assert default_control_path(0, {}) == "/run/xenblk-vhost/control.sock"
    assert default_control_path(1000, {"XDG_RUNTIME_DIR": "/run/user/1000"}) == \
        "/run/user/1000/xenblk-vhost/control.sock"
    assert default_control_path(1000, {}) is None


def handler(fn):
    """A sync function as a control handler (they are async: pause and detach wait)."""
    async def handle(request: dict) -> dict:
        return fn(request)
    return handle


async def test_answers():
    seen = []
    handlers = {"stats": handler(lambda r: (seen.append(r), {"vbds": []})[1])}
    assert await answer(b'{"command": "stats", "target": "web1"}', handlers) == {"ok": True, "stats": {"vbds": []}}
    assert seen == [{"command": "stats", "target": "web1"}]  # the handler gets the whole request
    assert await answer(b'{"command": "reboot"}', handlers) == {
        "ok": False, "error": "unknown command 'reboot' (known: stats)"}
    assert (await answer(b"stats", handlers))["ok"] is False
    assert (await answer(b"[1, 2]", handlers))["ok"] is False


async def test_a_refusal_carries_its_exit_status_and_problems():
    async def refuse(request: dict) -> dict:
        raise CommandRefused("reload refused", exit_status=2, problems=["a.yaml:3: disks: bad"])

    assert await answer(b'{"command": "reload"}', {"reload": refuse}) == {
        "ok": False, "error": "reload refused", "exit": 2, "problems": ["a.yaml:3: disks: bad"]}


# Issue 10 (D3): a control request must never end the daemon. Each of these
# escaped answer() and killed the serving task before it was made total.
@pytest.mark.parametrize("request_line, error", [
    (b'{"command": []}', "'command' must be a string"),            # was TypeError: unhashable
    (b'{"command": {"a": 1}}', "'command' must be a string"),
    (b"[" * 3000, "nested too deeply"),                             # was RecursionError
    (b'{"command": "stats", "x": ' + b"[" * 3000 + b"]}", "nested too deeply"),
    (b'{"command": ' + b"9" * 5000 + b"}", "not JSON"),            # int() digit limit: a ValueError
    (b'\xff\xfe{"command": "stats"}', "not JSON"),
    (b'{"command": "' + b"\x7f" * 100 + b'"}', r"unknown command '\x7f\x7f"),  # echoed bounded
])
async def test_hostile_requests_get_an_error_reply(request_line, error):
    reply = await answer(request_line, {"stats": handler(lambda r: {"vbds": []})})
    assert reply["ok"] is False and error in reply["error"], reply
    assert len(reply["error"]) < 150  # the reply does not echo a huge request back


async def test_one_bad_client_or_failing_handler_never_stops_the_control_socket(tmp_path, caplog):
    path = str(tmp_path / "control.sock")
    fail = {"now": True}

    def snapshot(request) -> dict:
        if fail["now"]:
            raise RuntimeError("snapshot exploded")
        return {"vbds": []}

    control = ControlSocket(path)

    async def ask(line: bytes) -> dict:
        raw = trio.socket.socket(trio.socket.AF_UNIX)
        with raw:
            await raw.connect(path)
            await raw.send(line + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                more = await raw.recv(65536)
                if not more:
                    break
                data += more
        return json.loads(data) if data else {}

    async with trio.open_nursery() as nursery:
        nursery.start_soon(control.serve, {"stats": handler(snapshot)})
        assert (await ask(b'{"command": []}'))["ok"] is False
        assert (await ask(b"[" * 3000))["ok"] is False
        reply = await ask(b'{"command": "stats"}')
        assert reply == {"ok": False, "error": "internal error answering 'stats' (see the daemon's log)"}
        assert "snapshot exploded" in caplog.text
        fail["now"] = False
        assert await ask(b'{"command": "stats"}') == {"ok": True, "stats": {"vbds": []}}
        nursery.cancel_scope.cancel()
    control.close()


def _open_fds() -> int:
    gc.collect()  # an earlier test's garbage holding an fd must not close it between two counts
    return len(os.listdir("/proc/self/fd"))


async def test_concurrent_clients_are_bounded_the_rest_turned_away_and_the_client_asks_again(tmp_path, caplog):
    """Issue 10 (D4, for the control socket): clients that connect and say nothing are held up to
    REQUEST_TIMEOUT each, and each costs an fd (shared with the guests' event channels). No more
    than MAX_CLIENTS are served at once: the next ones are answered busy at once and closed (before:
    each was accepted and served, fds without bound), the daemon goes on, and the blocking client
    (ctl, the hotplug script) asks again until a slot is free."""
    caplog.set_level(logging.INFO, logger="xenblk_vhost.observability.control_socket")
    path = str(tmp_path / "control.sock")
    control = ControlSocket(path)
    fds_before = _open_fds()

    async def connect_and_listen() -> dict:
        """The reply of a client that has not sent its request yet (busy is answered before reading)."""
        raw = trio.socket.socket(trio.socket.AF_UNIX)
        with raw:
            await raw.connect(path)
            data = b""
            while not data.endswith(b"\n"):
                more = await raw.recv(65536)
                if not more:
                    break
                data += more
        return json.loads(data) if data else {}

    async with trio.open_nursery() as nursery:
        nursery.start_soon(control.serve, {"stats": handler(lambda r: {"vbds": []})})
        await trio.sleep(0.05)  # serving: accepting
        idle = []
        for _ in range(MAX_CLIENTS):
            s = socket.socket(socket.AF_UNIX)
            s.settimeout(2)
            s.connect(path)
            idle.append(s)
        with trio.fail_after(3):
            while _open_fds() - fds_before < 2 * MAX_CLIENTS:  # ours and the server's ends
                await trio.sleep(0.01)
        with trio.fail_after(3):  # well within REQUEST_TIMEOUT: the idle ones are still held
            for _ in range(20):
                reply = await connect_and_listen()
                assert reply["ok"] is False and reply["busy"] is True, reply
                assert "try again" in reply["error"]
        assert _open_fds() - fds_before == 2 * MAX_CLIENTS  # the turned-away ones were closed
        assert caplog.text.count("turning more away") == 1  # once per busy spell, not per client

        answered: list[dict] = []

        async def ask_blocking() -> None:
            ask = functools.partial(request_control, path, "stats", timeout=5.0)
            answered.append(await trio.to_thread.run_sync(ask))

        nursery.start_soon(ask_blocking)
        await trio.sleep(0.3)  # it was turned away at least once
        assert not answered
        for s in idle:
            s.close()
        with trio.fail_after(5):
            while not answered:
                await trio.sleep(0.01)
        assert answered == [{"vbds": []}]
        assert "were turned away while busy" in caplog.text
        nursery.cancel_scope.cancel()
    control.close()


async def test_serves_0600_replaces_a_stale_socket_refuses_a_live_one_and_removes_its_own(tmp_path):
    path = str(tmp_path / "sub" / "control.sock")
    os.makedirs(tmp_path / "sub")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()  # a dead daemon's socket: nothing listens
    calls = []

    def snapshot(request) -> dict:
        calls.append(1)
        return {"vbds": [], "n": len(calls)}

    control = ControlSocket(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    async with trio.open_nursery() as nursery:
        nursery.start_soon(control.serve, {"stats": handler(snapshot)})
        # Asked at each request, not cached.
        assert (await trio.to_thread.run_sync(request_control, path, "stats"))["n"] == 1
        assert (await trio.to_thread.run_sync(request_control, path, "stats"))["n"] == 2
        with pytest.raises(ControlSocketBusy, match="another xenblk-vhost answers on"):
            ControlSocket(path)
        with pytest.raises(ControlRefused, match="unknown command 'nope'"):
            await trio.to_thread.run_sync(request_control, path, "nope")
        # A client that sends garbage gets an error, one that says nothing is dropped, and
        # neither stops the server.
        raw = trio.socket.socket(trio.socket.AF_UNIX)
        with raw:
            await raw.connect(path)
            await raw.send(b"x" * 5000)
            reply = json.loads(await raw.recv(4096))
        assert reply == {"ok": False, "error": "request longer than 4096 bytes"}
        assert (await trio.to_thread.run_sync(request_control, path, "stats"))["n"] == 3
        nursery.cancel_scope.cancel()
    control.close()
    assert not os.path.exists(path)


def test_a_file_that_is_not_a_socket_is_never_replaced(tmp_path):
    path = tmp_path / "control.sock"
    path.write_text("precious")
    with pytest.raises(ControlError, match="exists and is not a socket"):
        ControlSocket(str(path))
    assert path.read_text() == "precious"


async def test_a_socket_replaced_by_someone_else_is_not_removed(tmp_path):
    path = str(tmp_path / "control.sock")
    control = ControlSocket(path)
    os.unlink(path)
    other = socket.socket(socket.AF_UNIX)
    other.bind(path)
    control.close()
    assert os.path.exists(path)  # not ours any more
    other.close()


def test_client_errors_say_what_is_wrong(tmp_path):
    with pytest.raises(ControlError, match="no control socket at .*is `xenblk-vhost run` running"):
        request_control(str(tmp_path / "absent.sock"), "stats")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(tmp_path / "stale.sock"))
    stale.close()
    with pytest.raises(ControlError, match="nothing is listening on"):
        request_control(str(tmp_path / "stale.sock"), "stats")


async def test_an_answer_that_is_not_json_is_reported(tmp_path):
    path = str(tmp_path / "odd.sock")
    listener = trio.socket.socket(trio.socket.AF_UNIX)
    await listener.bind(path)
    listener.listen(1)

    async def odd_server() -> None:
        conn, _ = await listener.accept()
        with conn:
            await conn.recv(100)
            await conn.send(b"hello\n")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(odd_server)
        with pytest.raises(ControlError, match="not JSON"):
            await trio.to_thread.run_sync(request_control, path, "stats")
    listener.close()


def test_table_rows_are_the_rings_and_their_total_each_line_named_by_domain_and_vdev():
    a, b = RingStats(), RingStats()
    a.rd_req, a.rd_sect, a.wr_req, a.wr_sect, a.persistent_grants = 10, 80, 4, 32, 7
    b.rd_req, b.f_req, b.ds_req, b.errors, b.oo_req = 5, 2, 1, 3, 9
    b.halted = True
    rings = [a.snapshot(), b.snapshot()]
    snap = {"vbds": [{"device": "vbd-5-51712", "domain": "web1", "domid": 5, "vdev": "xvda", "state": "CONNECTED",
                      "driver": "io_uring", "path": "/x.img", "data_path": "map", "paused": True, "rings": rings,
                      "total": total(rings)},
                     {"device": "vbd-5-51728", "domain": "web1", "domid": 5, "vdev": "xvdb", "state": "CLOSED",
                      "driver": "io_uring", "path": "/y.img", "data_path": None, "rings": [], "total": total([])}]}
    lines = render_table(snap).splitlines()
    assert lines[0] == "web1 xvda  vbd-5-51712  Connected  io_uring /x.img  (map data path)  PAUSED"
    assert lines[1].split() == ["web1", "xvda", "ring", "rd_req", "wr_req", "f_req", "ds_req", "oo_req", "rd_sect",
                                "wr_sect", "in_flight", "pgrants", "errors"]
    assert lines[2].split() == ["web1", "xvda", "0", "10", "4", "0", "0", "0", "80", "32", "0", "7", "0"]
    assert lines[3].split() == ["web1", "xvda", "1", "5", "0", "2", "1", "9", "0", "0", "0", "0", "3", "HALTED"]
    assert lines[4].split() == ["web1", "xvda", "total", "15", "4", "2", "1", "9", "80", "32", "0", "7", "3", "HALTED"]
    assert lines[5] == "web1 xvdb  vbd-5-51728  Closed  io_uring /y.img"
    assert lines[7] == "web1 xvdb  (not connected: no rings)"
    assert all(line.startswith(("web1 xvda", "web1 xvdb")) for line in lines)  # every line names its disk
    assert render_table({"vbds": []}) == "no devices (the daemon serves none right now)"
