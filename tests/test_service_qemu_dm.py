"""The device-model route's pieces: QEMU's arguments as libxl builds them, and QMP as libxl speaks it."""

from __future__ import annotations

import json
import math

import pytest
import trio
import trio.testing

from xenblk_vhost.device_model.qemu_args import QemuArgsError, is_qemu_invocation, parse_qemu_args
from xenblk_vhost.device_model.qmp import MAX_QMP_BUFFER, DeviceModelState, qmp_answer, serve_qmp_connection

# libxl__build_device_model_args_new for a PV guest, Xen 4.17 (what the rig saw),
# with device_model_args_pv = ["--config=/etc/xenblk-vhost/web1.yaml"].
LIBXL_417_PV = [
    "-xen-domid", "12", "-no-shutdown",
    "-chardev", "socket,id=libxl-cmd,path=/var/run/xen/qmp-libxl-12,server=on,wait=off",
    "-mon", "chardev=libxl-cmd,mode=control",
    "-chardev", "socket,id=libxenstat-cmd,path=/var/run/xen/qmp-libxenstat-12,server=on,wait=off",
    "-mon", "chardev=libxenstat-cmd,mode=control",
    "-nodefaults", "-no-user-config", "-xen-attach", "-name", "web1", "-vnc", "none", "-display", "none",
    "-nographic", "-machine", "xenpv", "--config=/etc/xenblk-vhost/web1.yaml", "-m", "1024",
]


def test_libxl_417_pv_arguments():
    assert is_qemu_invocation(LIBXL_417_PV) and not is_qemu_invocation(["run", "x.yaml"])
    a = parse_qemu_args(LIBXL_417_PV)
    assert (a.domid, a.name, a.qmp_path, a.qmp_fd, a.paused, a.machine) == \
        (12, "web1", "/var/run/xen/qmp-libxl-12", None, False, "xenpv")
    assert a.configs == ("/etc/xenblk-vhost/web1.yaml",) and not a.probe_only
    assert "-m" in a.ignored and "1024" in a.ignored and "-nographic" in a.ignored


def test_dm_restrict_preopened_fd_paused_and_separate_option_values():
    a = parse_qemu_args(["-xen-domid", "3", "-chardev", "socket,id=libxl-cmd,fd=9,server=on,wait=off", "-S",
                         "-name", "guest=db,debug-threads=on", "-machine", "xenpv", "--config", "/a.yaml",
                         "--config=/b.yaml", "--xenstore", "/xs", "--sim=/hv"])
    assert (a.qmp_fd, a.qmp_path, a.paused, a.name) == (9, None, True, "db")
    assert a.configs == ("/a.yaml", "/b.yaml") and (a.xenstore, a.sim) == ("/xs", "/hv")


def test_xl_devd_backend_and_the_command_line_probe():
    # libxl__spawn_qemu_xenpv_backend: no QMP at all.
    devd = parse_qemu_args(["-xen-domid", "4", "-xen-attach", "-name", "domain-4", "-nographic", "-M", "xenpv",
                            "-monitor", "/dev/null", "-serial", "/dev/null", "-parallel", "/dev/null"])
    assert devd.qmp_path is None and devd.qmp_fd is None and devd.machine == "xenpv"
    probe = parse_qemu_args(["-xen-domid", "4", "-S", "-machine", "none,accel=xen",
                             "-chardev", "socket,id=libxl-cmd,fd=5,server=on,wait=off"])
    assert probe.probe_only


@pytest.mark.parametrize("argv, message", [
    (["-name", "x"], "no -xen-domid"),
    (["-xen-domid", "abc"], "-xen-domid 'abc' is not a domain id"),
    (["-xen-domid", "1", "-name"], "-name needs a value"),
    (["-xen-domid", "1", "--config"], "--config needs a value"),
])
def test_bad_arguments(argv, message):
    with pytest.raises(QemuArgsError, match=message):
        parse_qemu_args(argv)


def test_qmp_commands_before_and_after_negotiation():
    state = DeviceModelState(paused=True)
    reply, ok = qmp_answer({"execute": "query-status", "id": 1}, False, state)
    assert not ok and reply["error"]["class"] == "CommandNotFound" and reply["id"] == 1
    reply, ok = qmp_answer({"execute": "qmp_capabilities", "id": 2}, False, state)
    assert ok and reply == {"return": {}, "id": 2}
    again, ok = qmp_answer({"execute": "qmp_capabilities", "id": 3}, True, state)
    assert ok and "error" in again
    assert qmp_answer({"execute": "query-status", "id": 4}, True, state)[0]["return"]["status"] == "prelaunch"
    assert not state.running.is_set()
    assert qmp_answer({"execute": "cont", "id": 5}, True, state)[0] == {"return": {}, "id": 5}
    assert state.running.is_set()
    assert qmp_answer({"execute": "query-status"}, True, state)[0] == \
        {"return": {"status": "running", "singlestep": False, "running": True}}
    assert qmp_answer({"execute": "query-chardev", "id": "x"}, True, state)[0] == {"return": [], "id": "x"}
    assert qmp_answer({"execute": "query-vnc"}, True, state)[0] == {"return": {"enabled": False}}
    assert qmp_answer({"execute": "device_add"}, True, state)[0]["error"]["class"] == "CommandNotFound"
    assert qmp_answer({"arguments": {}}, True, state)[0]["error"]["class"] == "GenericError"
    assert not state.quit.is_set()
    qmp_answer({"execute": "quit"}, True, state)
    assert state.quit.is_set()


async def exchange(chunks: list[bytes]) -> list[dict]:
    """Feed a QMP server the client's bytes in these chunks; every message it sent back."""
    client, server = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_qmp_connection, server, DeviceModelState(paused=False))
        for chunk in chunks:
            await client.send_all(chunk)
            await trio.testing.wait_all_tasks_blocked()
        await client.send_eof()
        data = b""
        while True:
            more = await client.receive_some()
            if not more:
                break
            data += more
    assert data.endswith(b"\r\n")  # libxl finds messages by their "\r\n"
    return [json.loads(line) for line in data.split(b"\r\n") if line]


async def test_qmp_framing_split_and_joined_commands():
    cap = json.dumps({"execute": "qmp_capabilities", "id": 1}).encode()
    chardev = json.dumps({"execute": "query-chardev", "id": 2}).encode()
    status = json.dumps({"execute": "query-status", "id": 3}).encode()
    replies = await exchange([cap[:10], cap[10:] + b"\r\n" + chardev + b"\r\n" + status[:5], status[5:] + b"\n"])
    assert replies[0]["QMP"]["version"]["qemu"]["major"] >= 2
    assert replies[1:] == [{"return": {}, "id": 1}, {"return": [], "id": 2},
                           {"return": {"status": "running", "singlestep": False, "running": True}, "id": 3}]


async def test_qmp_garbage_is_answered_not_fatal():
    replies = await exchange([b"garbage\r\n", b"[1, 2]\r\n", b'{"execute": bad}\r\n{"execute": "qmp_capa',
                              b'bilities"}\r\n'])
    assert [r.get("error", {}).get("class") for r in replies[1:]] == ["GenericError"] * 3 + [None]


async def test_qmp_client_that_never_ends_a_command_is_cut_off():
    replies = await exchange([b"{" + b" " * (MAX_QMP_BUFFER + 10)])
    assert list(replies[0]) == ["QMP"] and len(replies) == 1


def test_json_stream_split_respects_strings_and_nesting():
    from xenblk_vhost.device_model.qmp import JsonStreamSplitter, Unparsable

    splitter = JsonStreamSplitter()
    texts = splitter.feed(b'{"a": "}{\\"]"} [1, {"b": [2]}] x {"c": {')
    assert texts == ['{"a": "}{\\"]"}', '[1, {"b": [2]}]', Unparsable.BAD_TOKEN]
    assert splitter.rest == '{"c": {' and splitter.buffered == len(splitter.rest)
    assert splitter.feed(b"}}") == ['{"c": {}}']
    deep = b"[" * (JsonStreamSplitter.MAX_NESTING + 1) + b"]" * (JsonStreamSplitter.MAX_NESTING + 1)
    assert splitter.feed(deep + b" [[]]") == [Unparsable.TOO_DEEP, "[[]]"]
    assert [json.loads(t) for t in texts[:2]] == [{"a": '}{"]'}, [1, {"b": [2]}]]


async def test_qmp_deep_nesting_is_answered_and_the_connection_goes_on():
    # Issue 10 D3: 3,000 nested '[' raised RecursionError out of json.loads, out of the
    # connection's task and through serve_qmp's nursery: the whole device model ended.
    cap = b'{"execute": "qmp_capabilities"}\r\n'
    replies = await exchange([b"[" * 3000 + b"]" * 3000 + b"\r\n",
                              b'{"execute": "query-status", "x": ' + b"[" * 3000 + b"]" * 3000 + b"}\r\n",
                              cap])
    assert [r["error"]["class"] for r in replies[1:3]] == ["GenericError"] * 2
    assert "nesting" in replies[1]["error"]["desc"]
    assert replies[3] == {"return": {}}


async def test_qmp_number_past_the_digit_limit_is_a_parse_error():
    # json.loads raises a plain ValueError (not JSONDecodeError) for an integer of more than
    # 4,300 digits: it escaped serve_qmp_connection as the RecursionError did.
    replies = await exchange([b'{"execute": "cont", "id": ' + b"9" * 5000 + b"}\r\n",
                              b'{"execute": "qmp_capabilities", "id": 1}\r\n'])
    assert replies[1]["error"]["class"] == "GenericError"
    assert replies[2] == {"return": {}, "id": 1}


async def test_qmp_a_character_split_between_reads_is_not_mangled():
    # Each read was decoded on its own with errors="replace": a UTF-8 sequence cut by the
    # transport became two U+FFFD, and the command the client sent was not the one answered.
    command = json.dumps({"execute": "qmp_capabilities", "id": "d\u00e9j\u00e0"}, ensure_ascii=False).encode()
    cut = command.index("\u00e9".encode()) + 1
    replies = await exchange([command[:cut], command[cut:] + b"\r\n"])
    assert replies[1] == {"return": {}, "id": "d\u00e9j\u00e0"}


async def test_qmp_garbage_cut_between_reads_is_one_error():
    # The bad token run was reported per read: "garbage" in two reads gave two errors.
    whole = await exchange([b"garbage\r\n"])
    cut = await exchange([b"garb", b"age\r\n"])
    assert cut == whole and len(whole) == 2


async def test_qmp_server_outlives_a_failing_connection(monkeypatch, caplog):
    # The confinement rule: whatever one client's connection raises is logged and ends that
    # connection only; serve_qmp goes on accepting.
    from xenblk_vhost.device_model import qmp

    def broken(command, negotiated, state):
        raise RuntimeError("planted")

    monkeypatch.setattr(qmp, "qmp_answer", broken)
    state = DeviceModelState(paused=False)

    class MemoryListener(trio.abc.Listener):
        def __init__(self):
            self.streams = trio.open_memory_channel(2)

        async def accept(self):
            return await self.streams[1].receive()

        async def aclose(self):
            pass

    listener = MemoryListener()
    async with trio.open_nursery() as nursery:
        await nursery.start(qmp.serve_qmp, listener, state)
        for _ in range(2):
            client, server = trio.testing.memory_stream_pair()
            await listener.streams[0].send(server)
            await client.send_all(b'{"execute": "qmp_capabilities"}\r\n')
            greeting = await client.receive_some()
            assert b'"QMP"' in greeting
            while await client.receive_some():
                pass  # the server closes this connection after logging
        nursery.cancel_scope.cancel()
    assert "planted" in caplog.text


async def test_qmp_a_character_the_client_never_finished_is_answered():
    # Bytes of an unfinished UTF-8 sequence waited in the decoder and were dropped at the hang-up;
    # QEMU answers the stray character (found by the qmp fuzz target: 11 replies to 12 items).
    replies = await exchange([b"[1] \xc3"])
    assert [r.get("error", {}).get("class") for r in replies[1:]] == ["GenericError"] * 2


class _CountingListener(trio.abc.Listener):
    """Connections handed to serve_qmp as it accepts them; how many it accepted."""

    def __init__(self) -> None:
        self.send, self._receive = trio.open_memory_channel(math.inf)
        self.accepted = 0

    async def accept(self):
        stream = await self._receive.receive()
        self.accepted += 1
        return stream

    async def aclose(self):
        pass


async def _read_until_closed(client) -> bytes:
    data = b""
    while True:
        more = await client.receive_some()
        if not more:
            return data
        data += more


async def test_qmp_connections_are_bounded_and_idle_ones_cut_off(monkeypatch, caplog):
    """Issue 10 (D4, for QMP): each connection costs an fd, shared with the guests' event channels.
    At most MAX_QMP_CLIENTS are served at once; the next ones wait to be accepted (as QEMU's
    monitor keeps them waiting). A peer that sends nothing is cut off after QMP_IDLE_TIMEOUT, so
    silent peers cannot keep libxl out for good: the waiting ones are then served. Before: every
    connection accepted and held for as long as the peer liked."""
    from xenblk_vhost.device_model import qmp

    monkeypatch.setattr(qmp, "QMP_IDLE_TIMEOUT", 0.5)
    listener = _CountingListener()
    clients = []
    async with trio.open_nursery() as nursery:
        await nursery.start(qmp.serve_qmp, listener, DeviceModelState(paused=False))
        for _ in range(qmp.MAX_QMP_CLIENTS + 3):
            client, server = trio.testing.memory_stream_pair()
            await listener.send.send(server)
            clients.append(client)
        await trio.testing.wait_all_tasks_blocked()
        assert listener.accepted == qmp.MAX_QMP_CLIENTS
        with trio.fail_after(10):
            for client in clients[:qmp.MAX_QMP_CLIENTS]:  # the silent ones: a greeting, then cut off
                assert list(json.loads(await _read_until_closed(client))) == ["QMP"]
            late = clients[-1]
            assert b'"QMP"' in await late.receive_some()
            await late.send_all(b'{"execute": "qmp_capabilities", "id": 1}\r\n')
            assert json.loads(await late.receive_some()) == {"return": {}, "id": 1}
        assert listener.accepted == qmp.MAX_QMP_CLIENTS + 3
        assert "idle (nothing sent or read)" in caplog.text
        nursery.cancel_scope.cancel()
