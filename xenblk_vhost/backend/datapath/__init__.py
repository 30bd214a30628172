"""The datapath: shared rings -> storage -> responses, in batches (blkback's blkback.c).

    vbd.py                one vbd: its storage, and one RingWorker per ring while connected (the
                          VbdDataplane of backend/contract.py)
    ring_policy.py        RingPolicy: the plain, frozen facts one ring is served by
    ring_worker.py        one ring's intake and reaper tasks
    slots.py              the bounded pool of in-flight request slots; Slot.load() fills one
    data_path.py          DataPath: how a request's data reaches the guest's pages (the Protocol)
    copy_path.py          grant copy into one libblkio memory region per ring
    map_path.py           grant map (per batch, or persistent grants)
    persistent_grants.py  the per-ring persistent grant LRU cache
    grant_copy.py         building grant-copy batches; one bad page fails one request
    indirect_pages.py     indirect segment pages copied out once, then decoded
    storage_ops.py        one slot's step on a libblkio queue, split to the storage's limits
    barrier.py            the vbd-wide write barrier gate
    stats.py              per-ring counters (blkback's names) and the latency histogram

Nothing here imports the control plane (backend/xenbus/).
"""
