"""Adapters to the hypervisor as a Linux dom0 (or driver domain) sees it.

- `gntdev`  /dev/xen/gntdev: map granted pages, grant-copy in batches.
- `evtchn`  /dev/xen/evtchn: bind, notify, wait (one fd per channel, trio).
- `xenstore` an async xenstore client (socket or /dev/xen/xenbus), `xs_wire` its protocol.
- `xenbus` XenbusState, the one enum of xenbus states.
- `interfaces` the protocols both these and the simulation (`xenblk_vhost.sim`)
  implement, so the backend cannot tell which one it was given; among them
  `Platform`, what the datapath needs from a hypervisor. The backend takes a
  Platform and never asks where it came from:

    with open_real() as platform:                      # real Xen: HypervisorDevices
        ...
    with xenblk_vhost.sim.open_sim(socket_path) as platform:   # simulation
        ...

Xenstore is not part of it (its own client, `xenblk_vhost.xen.xenstore`, is
async and opened by the backend separately).

The real adapters are exercised on Xen by the rig's `adapters` scenario
(scripts/xen-rig/scenarios/adapters.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from .interfaces import Evtchn, Gntdev


@dataclass
class HypervisorDevices:
    """A Platform (interfaces.py) made of one Gntdev and one Evtchn, closed together."""

    gntdev: Gntdev
    evtchn: Evtchn
    # The simulated hypervisor's socket (None: the real devices), for a ring worker process
    # (backend/datapath/process_vbd.py) to open its own handles to the same hypervisor.
    sim_socket: str | None = None

    def close(self) -> None:
        """Close event channels first (no more wake-ups), then grant mappings."""
        try:
            self.evtchn.close()
        finally:
            self.gntdev.close()

    def __enter__(self) -> HypervisorDevices:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_real(gntdev_path: str = "/dev/xen/gntdev", evtchn_path: str = "/dev/xen/evtchn") -> HypervisorDevices:
    """The Linux devices. Raises FileNotFoundError when not running on Xen."""
    from .evtchn import EvtchnDevice
    from .gntdev import GntdevDevice

    gntdev = GntdevDevice(gntdev_path)
    try:
        evtchn = EvtchnDevice(evtchn_path)
    except BaseException:
        gntdev.close()
        raise
    return HypervisorDevices(gntdev=gntdev, evtchn=evtchn)
