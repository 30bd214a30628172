"""`xenblk-vhost demo`: the whole stack on a simulated Xen, verified byte for byte.

    command.py         the subcommand: sim world + the real Service + a guest process, then a summary
    guest.py           the guest process: reference frontend + the demo's workload
    workload.py        the timed, verifying mixed workload
    summary.py         the demo's summary, as text and as JSON
    storage_daemon.py  a qemu-storage-daemon exporting a file over vhost-user-blk
    progress.py        progress on stderr: a bar on a terminal, periodic lines otherwise

The simulated host is sim/world.py's World (as the tests use it); helper
processes are sim/processes.py's.
"""
