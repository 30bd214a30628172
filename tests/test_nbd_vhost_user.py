"""Storage that outgrows one machine: NBD behind qemu-storage-daemon, served as vhost-user-blk.

    file <- qemu-nbd (the storage machine) <-NBD over TCP or unix-> qemu-storage-daemon
         --blockdev driver=nbd  --export type=vhost-user-blk <- libblkio virtio-blk-vhost-user

qemu-nbd listens on 127.0.0.1 (a remote storage node's stand-in) or a unix
socket; the bytes must land in qemu-nbd's backing file exactly, and bytes
already in that file must read back through the whole chain. The last test
puts the backend and a guest in front: guest writes end in the NBD server's
file. The examples' config/nbd-vhost-user.yaml and deploy/storage-node/
describe the same chain.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from e2e_support.fixtures import backend_service, domain_config
from e2e_support.frontend_agent import frontend_agent, sector_pattern
from storage_support.patterns import pattern_range, read_file
from storage_support.qsd import StorageDaemon, VhostUserExport
from xenblk_vhost.sim.toolstack import VbdConfig
from xenblk_vhost.sim.world import open_world
from xenblk_vhost.storage import StorageDevice

BS = 4096
SIZE = 16 << 20
DEADLINE = 20


class NbdServer:
    """qemu-nbd exporting one raw file, on 127.0.0.1:<free port> or a unix socket."""

    def __init__(self, image: Path, *, unix: Path | None = None) -> None:
        if shutil.which("qemu-nbd") is None:
            raise RuntimeError("qemu-nbd not found (Debian: qemu-utils; scripts/install-deps.sh installs it)")
        self.image, self.unix = image, unix
        self.port = None if unix else _free_port()
        where = ["--socket", str(unix)] if unix else ["--bind", "127.0.0.1", "--port", str(self.port)]
        self.log = open(image.with_suffix(".qemu-nbd.log"), "wb")
        # --persistent: stay up across client reconnects. The default cache mode
        # (writeback, page cache) works on any filesystem, tmpfs too; reads of
        # the file here see the page cache, so they see every completed write.
        self.proc = subprocess.Popen(["qemu-nbd", "--format=raw", "--persistent", *where, str(image)],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        self._wait_listening()

    def _wait_listening(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.unix:
                    with socket.socket(socket.AF_UNIX) as s:
                        s.connect(str(self.unix))
                else:
                    socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(
                        f"qemu-nbd did not listen: {self.image.with_suffix('.qemu-nbd.log').read_text()}") from None
                time.sleep(0.02)

    def blockdev(self, node: str) -> str:
        """qemu-storage-daemon's --blockdev for this server."""
        server = (f"server.type=unix,server.path={self.unix}" if self.unix
                  else f"server.type=inet,server.host=127.0.0.1,server.port={self.port}")
        return f"driver=nbd,node-name={node},{server}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.log.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NbdStorageDaemon(StorageDaemon):
    def add_nbd_export(self, name: str, nbd: NbdServer, *, size: int, num_queues: int = 2) -> VhostUserExport:
        node = f"{name}-nbd"
        self._args += ["--blockdev", nbd.blockdev(node)]
        return self._add_export(name, node, size, nbd.image, num_queues, True)


@pytest.fixture(params=["tcp", "unix"])
def nbd_chain(request, tmp_path):
    image = tmp_path / "remote.img"
    with open(image, "wb") as f:
        f.truncate(SIZE)
        f.seek(1024 * BS)
        f.write(pattern_range(1024, 16, seed=77))  # already on the storage node
    nbd = NbdServer(image, unix=tmp_path / "nbd.sock" if request.param == "unix" else None)
    try:
        with NbdStorageDaemon(tmp_path / "qsd") as qsd:
            export = qsd.add_nbd_export("remote", nbd, size=SIZE)
            qsd.start()
            yield image, export, qsd
    finally:
        nbd.stop()


def test_bytes_travel_through_nbd_to_the_remote_file_and_back(nbd_chain):
    image, export, qsd = nbd_chain
    with StorageDevice.open("virtio-blk-vhost-user", {"path": str(export.socket)}, 2) as dev:
        assert dev.capacity == SIZE
        assert dev.limits.needs_mem_regions
        region = dev.alloc_mem_region(64 * BS)
        # Two queues, several offsets, a write crossing no block boundary twice.
        q0, q1 = dev.queues
        region.view[: 32 * BS] = pattern_range(0, 32, seed=1)
        region.view[32 * BS :] = pattern_range(3000, 32, seed=2)
        q0.write(0, region.addr, 32 * BS, 1)
        q1.write(3000 * BS, region.addr + 32 * BS, 32 * BS, 2)
        assert sorted(q0.do_io(1, timeout=DEADLINE) + q1.do_io(1, timeout=DEADLINE)) == [(1, 0), (2, 0)]
        q0.flush(3)
        assert q0.do_io(1, timeout=DEADLINE) == [(3, 0)]
        # Flushed: on the storage node's disk now, while everything still runs.
        assert read_file(image, 0, 32 * BS) == pattern_range(0, 32, seed=1)
        assert read_file(image, 3000 * BS, 32 * BS) == pattern_range(3000, 32, seed=2)
        # What the storage node already had reads back through the chain.
        q1.read(1024 * BS, region.addr, 16 * BS, 4)
        assert q1.do_io(1, timeout=DEADLINE) == [(4, 0)]
        assert bytes(region.view[: 16 * BS]) == pattern_range(1024, 16, seed=77)
    qsd.stop()
    # Nothing else in the file was touched.
    data = read_file(image, 0, SIZE)
    assert data[32 * BS : 1024 * BS] == bytes((1024 - 32) * BS)
    assert data[1040 * BS : 3000 * BS] == bytes((3000 - 1040) * BS)
    assert data[3032 * BS :] == bytes(SIZE - 3032 * BS)


async def test_a_guest_writes_through_the_backend_into_the_nbd_servers_file(tmp_path):
    image = tmp_path / "remote.img"
    with open(image, "wb") as f:
        f.truncate(SIZE)
    nbd = NbdServer(image)
    try:
        with NbdStorageDaemon(tmp_path / "qsd") as qsd:
            export = qsd.add_nbd_export("web1", nbd, size=SIZE)
            qsd.start()
            cfg = domain_config(tmp_path, "web1", [f"vdev: xvda, driver: virtio-blk-vhost-user, path: {export.socket}"])
            async with open_world(tmp_path / "w") as world:
                guest = await world.create_guest("web1")
                async with backend_service(world, [cfg]):
                    vbd = await world.attach_vbd(
                        guest.domid, VbdConfig(vdev="xvda", target=str(tmp_path / "web1.yaml"))
                    )
                    async with frontend_agent(world, guest.domid, vbd.devid) as fe:
                        connected = await fe.call("connect")
                        assert connected["sectors"] == SIZE // 512
                        await fe.call("write", sector=2048, sectors=96, seed=5)
                        await fe.call("flush")
                        assert read_file(image, 2048 * 512, 96 * 512) == sector_pattern(5, 96)
                        assert (await fe.call("close"))["errors"] == []
    finally:
        nbd.stop()
    assert os.path.getsize(image) == SIZE
