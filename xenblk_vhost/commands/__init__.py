"""Operator commands beside `run`: `demo`, `stats`, and what `run` serves for them
(the control socket, the Prometheus endpoint).

    demo.py            xenblk-vhost demo: the whole stack on a simulated Xen, verified
    demo_host.py       the simulated host the demo runs on (hypervisor, xenstored, guest domain)
    demo_guest.py      the guest process: reference frontend + demo_workload
    demo_workload.py   the timed, verifying mixed workload
    demo_summary.py    the demo's summary, as text and as JSON
    storage_daemon.py  a qemu-storage-daemon exporting a file over vhost-user-blk
    processes.py       helper processes in their own session, always stopped
    progress.py        progress on stderr: a bar on a terminal, periodic lines otherwise
    service_snapshot.py the running service's devices and counters as one JSON-able dict
    control.py         the control socket (JSON over a unix socket): server and client
    stats.py           xenblk-vhost stats: the control socket's snapshot as a table or JSON
    metrics.py         run --metrics: Prometheus exposition served from trio
    observability.py   what `run` starts beside the service (control socket, metrics)
"""
