"""An NBD server whose every request completes after its own random delay: out-of-order storage.

    python tests/storage_support/slow_nbd.py --socket PATH --image FILE [--max-delay-ms 8] [--seed N]

Put behind qemu-storage-daemon (`--blockdev driver=nbd,server.type=unix,...`
and a vhost-user-blk export), it makes the backend's storage complete
requests in an order unrelated to the order they were submitted in, which is
what breaks a backend that restarts without a journal (issue 12: responses
are written into the ring in completion order). Serves one raw file, any
number of connections one after the other or at once, with simple replies
(QEMU's client falls back to them): READ, WRITE, FLUSH, TRIM and
WRITE_ZEROES (both write zeros), DISC. Prints `ready` once listening.

`--log FILE`: one line per write as it lands ("W offset length crc32"), for
a test that wants to see what reached the disk and in which order.
"""

from __future__ import annotations

import argparse
import os
import random
import struct
import sys
import zlib

import trio

NBDMAGIC = b"NBDMAGIC"
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES = 1, 2
OPT_EXPORT_NAME, OPT_ABORT, OPT_INFO, OPT_GO = 1, 2, 6, 7
REP_ACK, REP_INFO, REP_ERR_UNSUP = 1, 3, (1 << 31) + 1
INFO_EXPORT = 0
TX_FLAGS = 1 | 4 | 8 | 32 | 64  # HAS_FLAGS SEND_FLUSH SEND_FUA SEND_TRIM SEND_WRITE_ZEROES
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM, CMD_WRITE_ZEROES = 0, 1, 2, 3, 4, 6
EINVAL, EIO = 22, 5


class Disconnect(Exception):
    pass


async def _exactly(stream: trio.abc.ReceiveStream, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = await stream.receive_some(n - len(buf))
        if not chunk:
            raise Disconnect()
        buf += chunk
    return buf


class Server:
    def __init__(self, image: str, max_delay: float, seed: int, log_path: str | None) -> None:
        self.fd = os.open(image, os.O_RDWR)
        self.size = os.fstat(self.fd).st_size
        self.max_delay = max_delay
        self.rnd = random.Random(seed)
        self.log = open(log_path, "a", buffering=1) if log_path else None

    async def _opt_reply(self, stream, option: int, kind: int, data: bytes = b"") -> None:
        await stream.send_all(struct.pack(">QIII", OPT_REPLY_MAGIC, option, kind, len(data)) + data)

    async def _handshake(self, stream) -> bool:
        await stream.send_all(NBDMAGIC + struct.pack(">QH", IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))
        (client_flags,) = struct.unpack(">I", await _exactly(stream, 4))
        while True:
            magic, option, length = struct.unpack(">QII", await _exactly(stream, 16))
            if magic != IHAVEOPT:
                return False
            await _exactly(stream, length)
            if option == OPT_EXPORT_NAME:
                reply = struct.pack(">QH", self.size, TX_FLAGS)
                if not client_flags & FLAG_NO_ZEROES:
                    reply += bytes(124)
                await stream.send_all(reply)
                return True
            if option in (OPT_INFO, OPT_GO):
                await self._opt_reply(stream, option, REP_INFO, struct.pack(">HQH", INFO_EXPORT, self.size, TX_FLAGS))
                await self._opt_reply(stream, option, REP_ACK)
                if option == OPT_GO:
                    return True
            elif option == OPT_ABORT:
                await self._opt_reply(stream, option, REP_ACK)
                return False
            else:
                await self._opt_reply(stream, option, REP_ERR_UNSUP)

    async def _one(self, stream, lock: trio.Lock, kind: int, handle: int, offset: int, length: int,
                   data: bytes) -> None:
        await trio.sleep(self.rnd.random() * self.max_delay)
        error, payload = 0, b""
        if offset + length > self.size:
            error = EINVAL
        elif kind == CMD_READ:
            payload = os.pread(self.fd, length, offset)
        elif kind == CMD_WRITE:
            os.pwrite(self.fd, data, offset)
            if self.log:
                self.log.write(f"W {offset} {length} {zlib.crc32(data):08x}\n")
        elif kind in (CMD_TRIM, CMD_WRITE_ZEROES):
            os.pwrite(self.fd, bytes(length), offset)
            if self.log:
                self.log.write(f"Z {offset} {length}\n")
        elif kind != CMD_FLUSH:
            error = EINVAL
        reply = struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, error, handle)
        try:
            async with lock:
                await stream.send_all(reply + (payload if not error else b""))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client went away: the others' connections go on

    async def serve(self, stream: trio.SocketStream) -> None:
        try:
            if not await self._handshake(stream):
                return
            lock = trio.Lock()
            async with trio.open_nursery() as nursery:
                while True:
                    magic, _flags, kind, handle, offset, length = struct.unpack(">IHHQQI", await _exactly(stream, 28))
                    if magic != REQUEST_MAGIC:
                        return
                    if kind == CMD_DISC:
                        break
                    data = await _exactly(stream, length) if kind == CMD_WRITE else b""
                    nursery.start_soon(self._one, stream, lock, kind, handle, offset, length, data)
        except (Disconnect, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except Exception as e:  # one connection's trouble never ends the server
            print(f"connection ended: {e!r}", file=sys.stderr, flush=True)
        finally:
            await stream.aclose()


async def main(args: argparse.Namespace) -> None:
    server = Server(args.image, args.max_delay_ms / 1000, args.seed, args.log)
    if os.path.exists(args.socket):
        os.unlink(args.socket)
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await sock.bind(args.socket)
    sock.listen(16)
    listener = trio.SocketListener(sock)
    print("ready", flush=True)
    await trio.serve_listeners(server.serve, [listener])


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--socket", required=True)
    p.add_argument("--image", required=True)
    p.add_argument("--max-delay-ms", type=float, default=8.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--log")
    try:
        trio.run(main, p.parse_args())
    except KeyboardInterrupt:
        sys.exit(130)
