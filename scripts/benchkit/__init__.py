"""The benchmark kit behind scripts/bench.py (and scripts/bench_storage.py's targets).

    workloads   what the guest asks for (the matrix)
    targets     the storage: page-cached file (io_uring), qemu-storage-daemon null-co (vhost-user)
    guest       the simulated guest process, driving its rings with the compiled load generator
    sim_cases   a run on the simulated hypervisor: the bridge (xenblk-vhost) or the null responder
    raw         the raw libblkio baseline
    profile     where the backend's CPU goes (SIGPROF sampler)
    chart       the PNG
    loadgen.c   the compiled loops (load generator, null responder, raw libblkio),
                built by build_loadgen.py into the venv (scripts/install-deps.sh runs it)
"""
