"""The service: the xenbus control plane and the datapath, split as blkback and QEMU split them.

    xenbus/      control: watch xenstore, run each device's xenbus state machine, publish features
    datapath/    data: map the rings, serve requests from storage, answer
    contract.py  the only seam between them: ConnectionSpec/RingSpec (plain data) and the
                 VbdDataplane Protocol (QEMU's dataplane: create, start, stop, destroy)
    features.py  what a vbd offers, decided once from its config and its storage: the control
                 plane publishes it, the datapath enforces it
"""
