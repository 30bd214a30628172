"""The PV device-model route: xenblk-vhost exec'd by libxl in QEMU's place (an entry point).

With `device_model_override = "/usr/bin/xenblk-vhost"` and qdisk disks
(`backendtype=qdisk`), libxl (tools/libs/light/libxl_dm.c, 4.17) starts the
override as the PV guest's device model with QEMU's arguments:

    -xen-domid N -no-shutdown
    -chardev socket,id=libxl-cmd,path=/var/run/xen/qmp-libxl-N,server=on,wait=off
    -mon chardev=libxl-cmd,mode=control
    -chardev socket,id=libxenstat-cmd,path=/var/run/xen/qmp-libxenstat-N,server=on,wait=off
    -mon chardev=libxenstat-cmd,mode=control
    -nodefaults -no-user-config -xen-attach -name NAME -vnc none -display none -nographic
    -machine xenpv [device_model_args_pv ...] -m MEM

(with dm_restrict it pre-opens the QMP socket and passes `fd=F` plus -S
instead of `path=`), then:
  * waits up to 60 s for /local/domain/0/device-model/N/state = "running"
    (with -S: asks QMP `query-status` for "prelaunch" and later sends `cont`);
  * connects to the QMP socket, reads the greeting (it records the QEMU
    version), sends `qmp_capabilities`, then `query-chardev` (and
    `query-vnc` if VNC is on); every message ends with "\\r\\n", and every
    command opens a new connection;
  * on destroy sends SIGHUP to the pid in /local/domain/N/image/device-model-pid
    (written by libxl) and cleans the QMP socket and device-model/N up itself.

This package is that device model for block devices only:

    qemu_args.py  the QEMU command line, parsed
    qmp.py        QMP as far as libxl asks
    run.py        the process: QMP + the domain's qdisk devices (the same Service and Device as
                  the phy route, restricted to kind qdisk and this domid), until SIGHUP/SIGTERM/
                  SIGINT, QMP `quit`, or the domain's xenstore dir disappearing

Our own options ride along in `device_model_args_pv`:

    device_model_args_pv = [ "--config=/etc/xenblk-vhost/web1.yaml" ]

(repeatable; without one, /etc/xenblk-vhost/<NAME>.yaml), and for tests
`--xenstore PATH` and `--sim SOCKET`. Anything else QEMU would take is
accepted and ignored. An HVM device model (machine xenfv/pc) is refused:
there is no emulated disk here for a firmware to boot from.
"""


def is_qemu_invocation(argv: list[str]) -> bool:
    """libxl execs the device model with -xen-domid; nothing else does. Here, not in qemu_args.py:
    every command's main() asks, and only the device model needs the parser's dataclasses."""
    return "-xen-domid" in argv
