"""Which hypervisor the service runs on: the real /dev/xen devices, or the simulator.

    with open_platform() as platform:                 # /dev/xen/gntdev, /dev/xen/evtchn
    with open_platform(sim="/run/sim/hv.sock") as p:  # the simulated hypervisor at that socket

The only place outside sim/ and the demo that knows the simulator exists:
the entry points (`run --sim`, the device model's `--sim`) pass the socket
they were given and get a Platform (xen/interfaces.py), the type every
layer below is written against.
"""

from __future__ import annotations

from .xen.interfaces import Platform


def open_platform(sim: str | None = None) -> Platform:
    """The real devices (FileNotFoundError when not on Xen), or the simulated hypervisor at `sim`."""
    if sim is not None:
        from .sim import open_sim

        return open_sim(sim)
    from .xen import open_real

    return open_real()
