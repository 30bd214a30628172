"""End to end: the qdisk route, xenblk-vhost exec'd as a PV guest's device model.

A fake libxl does what libxl_dm.c / libxl_qmp.c do with a device model:
exec it with QEMU's arguments (plus our --config from device_model_args_pv),
wait for device-model/<domid>/state = running, talk QMP (greeting,
qmp_capabilities, query-chardev, each command on its own connection, every
message ending in \\r\\n), add qdisk disks without waiting for InitWait,
and on destroy send SIGHUP to the pid it recorded in
/local/domain/<domid>/image/device-model-pid.
"""

from __future__ import annotations

import json
import signal
import sys

import trio

from e2e_support.fixtures import disk_image, read_text, state_is, wait_node, write_config
from e2e_support.frontend_agent import frontend_agent
from xenblk_vhost.sim.toolstack import BackendKind, DetachOutcome, VbdConfig
from xenblk_vhost.sim.world import open_world

LIBXL_DEVICE_MODEL_START_TIMEOUT = 60


def qemu_argv(world, domid: int, name: str, qmp: str, config, *extra: str) -> list[str]:
    """libxl__build_device_model_args_new for a PV guest (4.17), our options appended
    where device_model_args_pv goes (right after -machine xenpv)."""
    argv = [sys.executable, "-m", "xenblk_vhost",
            "-xen-domid", str(domid), "-no-shutdown",
            "-chardev", f"socket,id=libxl-cmd,path={qmp},server=on,wait=off",
            "-mon", "chardev=libxl-cmd,mode=control",
            "-chardev", f"socket,id=libxenstat-cmd,path={qmp}-stat,server=on,wait=off",
            "-mon", "chardev=libxenstat-cmd,mode=control",
            "-nodefaults", "-no-user-config", "-xen-attach", "-name", name,
            "-vnc", "none", "-display", "none", "-nographic",
            "-machine", "xenpv", f"--config={config}", "--xenstore", world.xenstore_path,
            "--sim", world.hypervisor_path, *extra, "-m", "256"]
    return ["sh", "-c", 'exec "$@" 2>&1', "sh", *argv]


class QmpClient:
    """libxl's side of one QMP connection (libxl__ev_qmp)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buf = b""
        self.next_id = 1

    async def message(self) -> dict:
        while b"\r\n" not in self.buf:  # qmp_ev_get_next_msg: a message ends with \r\n
            chunk = await self.stream.receive_some(65536)
            if not chunk:
                raise EOFError("QMP server hung up")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return json.loads(line)

    async def execute(self, command: str) -> dict:
        cmd_id, self.next_id = self.next_id, self.next_id + 1
        await self.stream.send_all(json.dumps({"execute": command, "id": cmd_id}).encode() + b"\r\n")
        reply = await self.message()
        assert reply.get("id") == cmd_id  # "Message from QEMU with unexpected id" otherwise
        return reply


async def libxl_qmp(path: str, command: str) -> dict:
    """One libxl__ev_qmp_send: connect, greeting, qmp_capabilities, the command."""
    with trio.fail_after(10):
        async with await trio.open_unix_socket(path) as stream:
            qmp = QmpClient(stream)
            greeting = await qmp.message()
            version = greeting["QMP"]["version"]["qemu"]
            assert all(isinstance(version[k], int) for k in ("major", "minor", "micro"))
            assert (await qmp.execute("qmp_capabilities")) == {"return": {}, "id": 1}
            return await qmp.execute(command)


async def test_device_model_route_serves_qdisk_disks_and_exits_on_sighup(tmp_path):
    img = disk_image(tmp_path)
    cfg = write_config(tmp_path, "pvguest", [f"vdev: xvda, driver: io_uring, path: {img}"])
    qmp = str(tmp_path / "qmp-libxl-sock")
    async with open_world(tmp_path / "w") as world:
        guest = await world.create_guest("pvguest", domain_type="pv")
        await world.xs.mkdir(f"/local/domain/0/device-model/{guest.domid}")  # libxl__spawn_local_dm
        dm = await world.start_process(qemu_argv(world, guest.domid, "pvguest", qmp, cfg), name="dm", ready=None)
        # libxl__spawn_record_pid, then the spawn's wait for "running" (60 s).
        await world.xs.write(f"/local/domain/{guest.domid}/image/device-model-pid", str(dm.proc.pid))
        await wait_node(world.xs, f"/local/domain/0/device-model/{guest.domid}/state", lambda v: v == "running",
                        timeout=LIBXL_DEVICE_MODEL_START_TIMEOUT)
        # device_model_postconfig_chardev: no serial ptys to record.
        assert await libxl_qmp(qmp, "query-chardev") == {"return": [], "id": 2}
        # An unknown command is an error, as QEMU answers it, and the monitor stays usable.
        assert (await libxl_qmp(qmp, "human-monitor-command"))["error"]["class"] == "CommandNotFound"

        # The qdisk disk: libxl writes backend/qdisk and does not wait for InitWait.
        vbd = await world.attach_vbd(guest.domid, VbdConfig(vdev="xvda", target=str(img), kind=BackendKind.QDISK,
                                                            domain_type="pv"))
        assert vbd.backend == f"/local/domain/0/backend/qdisk/{guest.domid}/51712"
        assert await read_text(world.xs, f"{vbd.backend}/params") == f"aio:{img}"
        async with frontend_agent(world, guest.domid, vbd.devid) as fe:
            await fe.call("connect")
            await fe.call("write", sector=40, sectors=40, seed=8)
            assert (await fe.call("verify", sector=40, sectors=40, seed=8))["equal"]
            # Hot-unplug works as on the phy route.
            assert await world.detach_vbd(vbd) is DetachOutcome.CLOSED
            assert (await fe.call("wait_closed"))["errors"] == []
        again = await world.attach_vbd(guest.domid, VbdConfig(vdev="xvda", target=str(img), kind=BackendKind.QDISK,
                                                              domain_type="pv"))
        await wait_node(world.xs, f"{again.backend}/state", state_is(2))

        # xl destroy: libxl__destroy_device_model -> SIGHUP to the recorded pid.
        pid = int(await read_text(world.xs, f"/local/domain/{guest.domid}/image/device-model-pid"))
        assert pid == dm.proc.pid
        dm.proc.send_signal(signal.SIGHUP)
        assert await dm.wait(30) == 0
        assert any("SIGHUP: releasing the devices and exiting" in line for line in dm.lines), dm.lines
        # The rest of the destroy: with the device model gone nobody answers for the
        # qdisk device; libxl waits LIBXL_QEMU_BODGE_TIMEOUT (2 s) for such, not 10.
        await world.destroy_guest(guest.domid, timeout=1.0)


async def test_device_model_exits_when_its_domain_is_destroyed_without_a_signal(tmp_path):
    img = disk_image(tmp_path)
    cfg = write_config(tmp_path, "orphan", [f"vdev: xvda, driver: io_uring, path: {img}"])
    qmp = str(tmp_path / "qmp")
    async with open_world(tmp_path / "w") as world:
        guest = await world.create_guest("orphan", domain_type="pv")
        dm = await world.start_process(qemu_argv(world, guest.domid, "orphan", qmp, cfg), name="dm", ready=None)
        await wait_node(world.xs, f"/local/domain/0/device-model/{guest.domid}/state", lambda v: v == "running")
        vbd = await world.attach_vbd(guest.domid, VbdConfig(vdev="xvda", target=str(img), kind=BackendKind.QDISK))
        await wait_node(world.xs, f"{vbd.backend}/state", state_is(2))
        # Forced removal (frontend dir first): the device answers Closed, libxl need not time out.
        assert await world.destroy_guest(guest.domid) == {vbd.devid: DetachOutcome.CLOSED}
        assert await dm.wait(30) == 0
        assert any(f"domain {guest.domid} is gone" in line for line in dm.lines), dm.lines


async def test_dm_restrict_preopened_socket_and_paused_start(tmp_path):
    """With dm_restrict libxl pre-opens the QMP socket (fd=N) and passes -S: QEMU
    reports "prelaunch" to query-status and writes "running" only after `cont`."""
    img = disk_image(tmp_path)
    cfg = write_config(tmp_path, "strict", [f"vdev: xvda, driver: io_uring, path: {img}"])
    path = str(tmp_path / "qmp-pre")
    async with open_world(tmp_path / "w") as world:
        guest = await world.create_guest("strict", domain_type="pv")
        listener = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        await listener.bind(path)
        listener.listen(1)
        fd = listener.fileno()
        argv = [sys.executable, "-m", "xenblk_vhost", "-xen-domid", str(guest.domid), "-no-shutdown",
                "-chardev", f"socket,id=libxl-cmd,fd={fd},server=on,wait=off", "-S",
                "-mon", "chardev=libxl-cmd,mode=control", "-xen-attach", "-name", "strict",
                "-machine", "xenpv", "--config", str(cfg), "--xenstore", world.xenstore_path,
                "--sim", world.hypervisor_path, "-m", "256"]
        proc = await trio.lowlevel.open_process(argv, pass_fds=(fd,))
        listener.close()
        try:
            state_path = f"/local/domain/0/device-model/{guest.domid}/state"
            with trio.fail_after(30):
                while True:  # the device model is up once QMP answers
                    try:
                        status = await libxl_qmp(path, "query-status")
                        break
                    except OSError:
                        await trio.sleep(0.05)
            assert status["return"]["status"] == "prelaunch"
            assert await read_text(world.xs, state_path) is None
            assert await libxl_qmp(path, "cont") == {"return": {}, "id": 2}
            await wait_node(world.xs, state_path, lambda v: v == "running")
            assert (await libxl_qmp(path, "query-status"))["return"]["status"] == "running"
            proc.send_signal(signal.SIGTERM)
            with trio.fail_after(30):
                assert await proc.wait() == 0
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


def test_an_hvm_device_model_or_an_unconfigured_domain_is_refused(tmp_path):
    import subprocess

    img = disk_image(tmp_path)
    cfg = write_config(tmp_path, "someone", [f"vdev: xvda, driver: io_uring, path: {img}"])
    base = [sys.executable, "-m", "xenblk_vhost", "-xen-domid", "3", "-name", "other",
            "-chardev", f"socket,id=libxl-cmd,path={tmp_path}/q,server=on,wait=off"]
    hvm = subprocess.run(base + ["-machine", "xenfv,suppress-vmdesc=on", f"--config={cfg}"],
                         capture_output=True, text=True, timeout=60)
    assert hvm.returncode == 2 and "only be the device model of PV/PVH guests" in hvm.stderr
    other = subprocess.run(base + ["-machine", "xenpv", f"--config={cfg}"], capture_output=True, text=True, timeout=60)
    assert other.returncode == 2 and f"none of {cfg} configures domain 'other' (domid 3)" in other.stderr


async def _hostile_qmp_peer(path: str, chunks: list[bytes], *, read_replies: bool, reset: bool) -> list[bytes]:
    """One QMP peer on the real socket: sends chunks, maybe reads what comes back, then leaves;
    `reset`: it leaves with the server's bytes unread, so the server's next read fails (ECONNRESET)."""
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    got: list[bytes] = []
    with sock:
        await sock.connect(path)
        if reset:
            await trio.sleep(0.2)  # the greeting is in our receive queue, unread
        for chunk in chunks:
            await sock.send(chunk)
            if read_replies:
                with trio.move_on_after(2):
                    got.append(await sock.recv(1 << 16))
    return got


async def test_hostile_qmp_peers_are_confined_to_their_connections_and_the_disk_goes_on(tmp_path):
    """Issue 10 (D3, the device-model route): QMP peers on the real monitor socket of a running
    device model, while its guest does I/O: garbage, 3,000 nested brackets, a number past the
    digit limit, a command cut off by a reset mid-line, a peer gone before its greeting, one that
    never ends a command (cut off at 1 MiB), twenty at once. Each is answered or cut off on its
    own connection; the process lives, no traceback is logged, libxl's next QMP command is answered
    and the guest's disk keeps its data."""
    img = disk_image(tmp_path)
    cfg = write_config(tmp_path, "pvguest", [f"vdev: xvda, driver: io_uring, path: {img}"])
    qmp = str(tmp_path / "qmp-libxl-sock")
    async with open_world(tmp_path / "w") as world:
        guest = await world.create_guest("pvguest", domain_type="pv")
        await world.xs.mkdir(f"/local/domain/0/device-model/{guest.domid}")
        dm = await world.start_process(qemu_argv(world, guest.domid, "pvguest", qmp, cfg), name="dm", ready=None)
        await wait_node(world.xs, f"/local/domain/0/device-model/{guest.domid}/state", lambda v: v == "running",
                        timeout=LIBXL_DEVICE_MODEL_START_TIMEOUT)
        vbd = await world.attach_vbd(guest.domid, VbdConfig(vdev="xvda", target=str(img), kind=BackendKind.QDISK,
                                                            domain_type="pv"))
        async with frontend_agent(world, guest.domid, vbd.devid) as fe:
            await fe.call("connect")
            await fe.call("write", sector=0, sectors=64, seed=3)
            cap = b'{"execute": "qmp_capabilities"}\r\n'
            with trio.fail_after(30):
                # garbage, deep nesting and a huge number on one connection: each answered, in turn
                replies = await _hostile_qmp_peer(qmp, [b"", b"garbage\r\n", b"[" * 3000 + b"]" * 3000 + b"\r\n",
                                                        b'{"execute": "cont", "id": ' + b"9" * 5000 + b"}\r\n",
                                                        cap], read_replies=True, reset=False)
                answered = b"".join(replies)
                assert answered.count(b'"GenericError"') == 3 and b'{"return": {}}' in answered, answered
                # reset mid-line, with the greeting unread
                await _hostile_qmp_peer(qmp, [b'{"execute": "qmp_capab'], read_replies=False, reset=True)
                await _hostile_qmp_peer(qmp, [], read_replies=False, reset=False)  # gone before its greeting
                # a command that never ends: cut off past the buffer bound
                try:
                    cut = await _hostile_qmp_peer(qmp, [b"{" + b" " * (1 << 16)] * 20, read_replies=False, reset=True)
                except (BrokenPipeError, ConnectionResetError):
                    cut = []  # the server cut it off while it was still sending (EPIPE): as meant, only sooner
                assert cut == []
                served: list[bytes] = []

                async def one_of_a_crowd(i: int) -> None:
                    try:
                        served.extend(await _hostile_qmp_peer(qmp, [b"[" * 2000 + b"]" * 2000, b"garbage\r\n", b""],
                                                              read_replies=i % 2 == 0, reset=i % 2 == 1))
                    except OSError:
                        pass  # turned away by the kernel: the listen backlog is full

                async with trio.open_nursery() as crowd:
                    for i in range(20):
                        crowd.start_soon(one_of_a_crowd, i)
                assert b"".join(served).count(b'"GenericError"') >= 2, served
                # the guest's I/O ran on meanwhile; the device model answers libxl as before
                assert (await fe.call("verify", sector=0, sectors=64, seed=3))["equal"]
                assert (await libxl_qmp(qmp, "query-status"))["return"]["status"] == "running"
                await fe.call("write", sector=64, sectors=64, seed=4)
                assert (await fe.call("verify", sector=64, sectors=64, seed=4))["equal"]
        assert dm.proc.returncode is None
        assert not [line for line in dm.lines if "Traceback" in line or "connection failed" in line], dm.lines
        dm.proc.send_signal(signal.SIGHUP)
        assert await dm.wait(30) == 0
        await world.destroy_guest(guest.domid, timeout=1.0)
