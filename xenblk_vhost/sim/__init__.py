"""A simulated Xen, with the same interfaces as `xenblk_vhost.xen`.

The backend is handed a `Platform` (gntdev + evtchn) and cannot tell whether
it is real (`xenblk_vhost.xen.open_real()`) or this (`open_sim(socket)`).

Shape: three kinds of process, sharing kernel objects and nothing else.

    hypervisor process            python -m xenblk_vhost.sim.hypervisor --socket S
      owns domains, event-channel state, unmap notifications; hands out fds
      over a unix SOCK_SEQPACKET socket (SCM_RIGHTS). Control only: it is
      never on the data path.
    guest process(es)             Guest.create(S) / python -m xenblk_vhost.sim.guest
      maps its memory memfd and its grant-table memfd; writes grant entries
      as Linux gnttab does; allocates unbound ports; notifies and waits on
      eventfds.
    backend process               open_sim(S) -> a Platform: HypervisorDevices(SimGntdev, SimEvtchn)
      SimGntdev plays Xen's grant-table role *inside* the backend: it maps
      the guest's memory and grant table (as Xen can), checks each grant
      entry as Xen does, pins entries with GTF_reading/GTF_writing while
      mapped, and maps or memmoves the frames. SimEvtchn binds to the
      guest's port and gets the eventfds.

Modules: hypervisor (server), hypercall (client side of the socket, status
page), grant_table (v1 entry layout and Xen's checks), gntdev, evtchn,
guest (guest API and a scriptable guest process), _atomic (libatomic
compare-and-swap on shared memory).

Domains: `Guest.create()` makes one (memory pages, grant frames) and
`Guest.destroy()` ends it, like `xl destroy`: from then on its grants fail
with GNTST_bad_domain and its ports are closed (the backend's bound ports
become unbound, notifies are dropped), while memory the backend still has
mapped stays readable, as a dying domain's pages stay while mapped.

What this does not model of real Xen (known, deliberate):
- Grant copy does not pin: an entry is checked (ref, type, domid,
  readonly, frame) but GTF_reading/GTF_writing are not set for the few
  microseconds of the copy, so a guest's end_access racing a copy succeeds
  where Xen would make it retry. Maps do pin.
- Grant v2, transitive and sub-page grants, GNTMAP_device_map, grant
  transfer: not implemented (blkfront uses v1 permit_access only). Entries
  with another type are refused as Xen refuses a v1 type mismatch.
- Pin bookkeeping across several backend processes mapping the same ref
  *concurrently* is not locked the way Xen's active-entry lock is (each
  atomic step is atomic, the sequence is not). One backend process at a
  time per guest ref is exact.
- A backend process that dies leaves its pins set (GTF_reading stays on);
  the kernel would unmap. Its unmap notifications (clear byte, event) and
  its event channels are handled, since the hypervisor sees the socket close.
- Event channels: no per-vCPU binding, no masking API, no VIRQs/IPIs/PIRQs,
  no FIFO ABI details; ports are never reused; a port left unbound by its
  peer closing cannot be re-bound (Xen allows it).
- Xen marks a freshly bound port pending; so does the simulation, so the
  first wait() after bind returns at once on both.
- Local addresses in grant copy are trusted: a bad one crashes the backend
  process (the kernel would answer EFAULT).
- set_max_grants is recorded but not enforced (current Linux has dropped
  the limit too); maptrack exhaustion (GNTST_no_space) never happens.
- No XSM, so never GNTST_permission_denied; no paging/sharing, so never
  GNTST_eagain.
"""

from __future__ import annotations

from ..xen import HypervisorDevices


def open_sim(socket_path: str, *, domid: int = 0) -> HypervisorDevices:
    """The backend's Platform on the simulated hypervisor listening at socket_path."""
    from .evtchn import SimEvtchn
    from .gntdev import SimGntdev

    gntdev = SimGntdev(socket_path, domid=domid)
    try:
        evtchn = SimEvtchn(socket_path, domid=domid)
    except BaseException:
        gntdev.close()
        raise
    return HypervisorDevices(gntdev=gntdev, evtchn=evtchn, sim_socket=socket_path)
