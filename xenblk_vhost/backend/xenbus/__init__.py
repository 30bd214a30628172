"""The control plane: blkback's xenbus.c as trio tasks.

    service.py          watches backend/<kind> for the configured domains' devices; one Device task each
    device.py           one device's xenbus life: probe, InitWait, connect, close, release
    state_machine.py    what to do on a frontend state (blkback's frontend_changed), as pure decisions
    frontend_params.py  the frontend's ring-ref/event-channel/protocol nodes, validated into a ConnectionSpec
    guest_warnings.py   rate-limited log lines for what guests cause

It asks the datapath for a vbd only through backend/contract.py (VbdDataplane:
create, start, stop, destroy) and never imports datapath/ modules other than
the default factory (datapath/vbd.py's Vbd.open, named in device.py).
"""
