"""The QEMU command line libxl gives a device model, parsed (plus our own long options).

    args = parse_qemu_args(argv)   # QemuArgs: domid, name, the libxl-cmd QMP socket, -S, -machine, --config...
    is_qemu_invocation(argv)       # libxl execs the device model with -xen-domid; nothing else does

Anything else QEMU would take is accepted and ignored (QemuArgs.ignored).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from . import is_qemu_invocation  # noqa: F401 - where it was; every command's main() asks it before importing us

# QEMU options that take a value (so the value is not read as an option).
_OPTIONS_WITH_VALUE = {
    "-xen-domid", "-chardev", "-mon", "-name", "-vnc", "-display", "-machine", "-M", "-m", "-monitor",
    "-serial", "-parallel", "-pidfile", "-device", "-drive", "-smp", "-vga", "-boot", "-k", "-incoming",
    "-global", "-spice", "-usbdevice", "-net", "-netdev", "-runas", "-run-with", "-sandbox", "-object",
    "-cpu", "-accel", "-fw_cfg", "-xen-domid-restrict-off", "-trace", "-D", "-d", "-loadvm", "-option-rom",
    "-append", "-kernel", "-initrd", "-bios",
}


class QemuArgsError(ValueError):
    pass


@dataclass(frozen=True)
class QemuArgs:
    domid: int
    name: str | None = None
    qmp_path: str | None = None  # -chardev socket,id=libxl-cmd,path=...
    qmp_fd: int | None = None  # -chardev socket,id=libxl-cmd,fd=...
    paused: bool = False  # -S: "prelaunch" until QMP cont
    machine: str = "xenpv"
    configs: tuple[str, ...] = ()
    xenstore: str | None = None
    sim: str | None = None
    ignored: tuple[str, ...] = field(default=(), compare=False)

    @property
    def probe_only(self) -> bool:
        """libxl's command-line probe (-machine none): QMP only, no devices."""
        return self.machine.split(",")[0] == "none"


def _chardev_options(value: str) -> dict[str, str]:
    backend, _, rest = value.partition(",")
    opts = {"backend": backend}
    for item in rest.split(","):
        key, sep, val = item.partition("=")
        if key:
            opts[key] = val if sep else "on"
    return opts


def parse_qemu_args(argv: list[str]) -> QemuArgs:
    """The QEMU arguments libxl gives a device model, plus our own long options."""
    domid = name = qmp_path = qmp_fd = xenstore = sim = None
    machine = "xenpv"
    paused = False
    configs: list[str] = []
    ignored: list[str] = []
    i = 0

    def value_of(opt: str) -> str:
        nonlocal i
        if i + 1 >= len(argv):
            raise QemuArgsError(f"{opt} needs a value")
        i += 1
        return argv[i]

    while i < len(argv):
        arg = argv[i]
        long_opt, eq, inline = arg.partition("=") if arg.startswith("--") else (arg, "", "")
        if long_opt in ("--config", "--xenstore", "--sim"):
            val = inline if eq else value_of(long_opt)
            if long_opt == "--config":
                configs.append(val)
            elif long_opt == "--xenstore":
                xenstore = val
            else:
                sim = val
        elif arg == "-xen-domid":
            text = value_of(arg)
            if not text.isdigit():
                raise QemuArgsError(f"-xen-domid {text!r} is not a domain id")
            domid = int(text)
        elif arg == "-name":
            name = value_of(arg).split(",")[0]  # "-name guest=NAME,..." is QEMU's long form
            if name.startswith("guest="):
                name = name[len("guest="):]
        elif arg in ("-machine", "-M"):
            machine = value_of(arg)
        elif arg == "-S":
            paused = True
        elif arg == "-chardev":
            opts = _chardev_options(value_of(arg))
            if opts.get("id") == "libxl-cmd" and opts["backend"] == "socket":
                if "fd" in opts:
                    qmp_fd = int(opts["fd"])
                elif "path" in opts:
                    qmp_path = opts["path"]
        elif arg in _OPTIONS_WITH_VALUE:
            ignored += [arg, value_of(arg)]
        else:
            ignored.append(arg)
        i += 1
    if domid is None:
        raise QemuArgsError("no -xen-domid")
    return QemuArgs(domid=domid, name=name, qmp_path=qmp_path, qmp_fd=qmp_fd, paused=paused, machine=machine,
                    configs=tuple(configs), xenstore=xenstore, sim=sim, ignored=tuple(ignored))
