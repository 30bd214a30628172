"""A ring worker process: `python -m xenblk_vhost.daemon.ring_process FD`, exec'd by the service.

FD is its end of a socketpair with the service (backend/datapath/worker_channel.py);
everything else (which ring, which storage, the simulated hypervisor's socket or the real
/dev/xen devices) arrives over it (backend/datapath/ring_process.py serves the ring).
SIGINT and SIGTERM are ignored: the terminal's Ctrl-C and systemd's stop reach the service,
which ends its workers in order (a worker ends when its channel closes).
"""

from __future__ import annotations

import signal
import socket
import sys

import trio

from ..backend.datapath.ring_process import serve_ring_worker
from ..platforms import open_platform


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not args[0].isdigit():
        print("usage: python -m xenblk_vhost.daemon.ring_process FD (started by the service)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sock = socket.socket(fileno=int(args[0]))
    return trio.run(serve_ring_worker, sock, lambda sim: open_platform(sim=sim))


if __name__ == "__main__":
    sys.exit(main())
