/* libblkio's hot-path calls, compiled (cffi API mode) for xenblk_vhost/storage/queue.py.
 *
 * cffi's ABI mode (storage/cdef.py: dlopen of libblkio.so.1) pays libffi's
 * generic call machinery on every blkioq_* call, about as much again as the
 * work libblkio does to queue a request. These wrappers are direct C calls.
 * Pointers travel as uintptr_t (the queue, buffers, iovecs, the completion
 * array and the timeout): the ABI-mode cdata belong to another FFI instance,
 * and the datapath names memory by integer address anyway. The queue pointer
 * is the one storage/queue.py got from blkio_get_queue(); a closed queue
 * never reaches these (Queue swaps its calls for a raising stub first).
 *
 * This file is both the cdef (cffi parses it) and the sources' header.
 */
void xb_read(uintptr_t q, uint64_t start, uintptr_t buf, size_t len, uintptr_t tag, uint32_t flags);
void xb_write(uintptr_t q, uint64_t start, uintptr_t buf, size_t len, uintptr_t tag, uint32_t flags);
void xb_readv(uintptr_t q, uint64_t start, uintptr_t iovec, int iovcnt, uintptr_t tag, uint32_t flags);
void xb_writev(uintptr_t q, uint64_t start, uintptr_t iovec, int iovcnt, uintptr_t tag, uint32_t flags);
void xb_write_zeroes(uintptr_t q, uint64_t start, uint64_t len, uintptr_t tag, uint32_t flags);
void xb_discard(uintptr_t q, uint64_t start, uint64_t len, uintptr_t tag, uint32_t flags);
void xb_flush(uintptr_t q, uintptr_t tag, uint32_t flags);
void xb_set_completion_fd_enabled(uintptr_t q, bool enable);
int xb_do_io(uintptr_t q, uintptr_t completions, int min_completions, int max_completions, uintptr_t timeout);
/* The copy path's lane (lane_slot.h, backend/datapath/copy_lane.py): queue a READ or WRITE for
 * each slot idx[0..n) (a uint16_t array) of the lane table (nslots struct xk_lane_slot): from
 * sector*512, nbytes at the entry's buffer (base + idx*stride; a held indirect entry's own: lane_entry.h),
 * tag XK_LANE_TAG | idx (lane_entry.h), in that order. Checks every entry first and queues nothing (-1)
 * if one is not a stashed READ/WRITE; else returns n. */
int xb_queue_lane(uintptr_t q, uintptr_t table, uint32_t nslots, uintptr_t idx, uint32_t n, uint64_t base,
                  uint64_t stride);
uint32_t xb_lane_slot_size(void);
uint32_t xb_lane_tag(void);  /* lane_entry.h's XK_LANE_TAG */

/* The ring engine (ring_engine.c; backend/datapath/ring_engine.py fills this once per ring and reads
 * it back after each call): a wake-up's plain requests taken, held, recorded, copied, queued,
 * completed, answered, published and notified in one call. Addresses travel as uintptr_t (the
 * shared ring page, the compiled intake's struct xk_intake_cfg, CompiledAnswers' struct xk_rsp_ring,
 * the compiled journal's struct xk_journal, the lane's table, the queue and its completion array).
 * "in/out" fields are the ring worker's state, which it copies in before and back after a call. */
enum {
    XB_ENGINE_IDLE = 0,             /* the ring is empty and req_event asks for the next request */
    XB_ENGINE_MORE = 1,             /* max_batches served: call again after letting others run */
    XB_ENGINE_PYTHON = 2,           /* the next request is for the reference path (or no slot or frame) */
    XB_ENGINE_REAPED = 3,           /* `reaped` completions in the queue's array are for RingWorker._reaped */
    XB_ENGINE_COPY_IN_FAILED = 4,   /* the last batch (taken[0..held_n)) is held, not queued; failed[0..nfailed) */
    XB_ENGINE_UNPREPARED = 5,       /* the last batch is held, its copy in not packed: the reference prepares it */
    XB_ENGINE_COPY_OUT_FAILED = 6,  /* `reaped` completions walked (ready[]), a read's copy out failed[] */
    XB_ENGINE_STORAGE_ERROR = 7,    /* blkioq_do_io failed with errno `error` */
    XB_ENGINE_BUG = 8,              /* an entry the walk returned was not walked: never */
    XB_ENGINE_MAP = 9               /* the next request's pages are to be mapped first (persistent grants: the misses
                                     * of struct xk_pgrants); nothing of it taken: map them, call again */
};
enum { XB_COPY_GNTDEV = 1, XB_COPY_SIM = 2 };          /* copy_kind */
enum { XB_NOTIFY_EVTCHN = 1, XB_NOTIFY_EVENTFD = 2 };  /* notify_kind */
struct xb_engine {
    /* the ring: the shared page, its slots, BackRing's private indices (in/out) */
    uintptr_t sring;
    uint32_t size;
    uint32_t entry;
    uint32_t req_cons;
    uint32_t rsp_prod_pvt;
    uintptr_t cfg;
    uintptr_t rsp;
    uintptr_t journal;        /* 0: no journal */
    uintptr_t raw;            /* scratch: the private copy (size slots) */
    uintptr_t recs;           /* scratch: its records (size struct xk_req) */
    /* the copy path's lane: its table, the slots' buffers (base + slot * stride) */
    uintptr_t table;
    uint32_t nslots;
    uint64_t base;
    uint64_t stride;
    uintptr_t taken;          /* uint16[nslots]: the last batch's slots */
    uintptr_t ready;          /* uint16[room]: the last walk's slots, in completion order */
    uintptr_t owners;         /* uint16[room_segs]: each packed segment's slot */
    uintptr_t failed;         /* uint16[room]: the slots whose grant copy failed */
    uintptr_t segs;           /* struct xk_copy_seg[room_segs] */
    uint32_t room_segs;       /* segs' and owners' room: a batch or walk needing more stops the engine */
    /* indirect requests (lane_entry.h); ind 0: the engine takes none. ind: the lane's side table (max_ind *
     * 8 bytes per slot) their indirect pages are copied into; grefs_off: indirect_grefs in a slot; large,
     * nlarge: the data path's free large buffers (uint32 region offsets, a stack; its depth), shared with
     * CopyDataPath; region: the region's address; max_transfer: the most a storage request may carry (0:
     * any); lens (uint16[size]) and jind (per frame * max_ind * 8 bytes): scratch for the journal */
    uintptr_t ind;
    uint32_t max_ind;
    uint32_t grefs_off;
    uintptr_t large;
    uintptr_t nlarge;
    uint64_t region;
    uint64_t max_transfer;
    uintptr_t lens;
    uintptr_t jind;
    /* free slots: SlotPool.free's stack (top last), in/out; low: its lowest depth in the call */
    uintptr_t stack;
    uint32_t nfree;
    uint32_t low;
    /* the storage queue: blkioq, its completion array (max_completions) */
    uintptr_t q;
    uintptr_t completions;
    uint32_t max_completions;
    uint32_t max_batches;
    /* the grant copy: gntdev's ioctl, or the simulated hypervisor's tables of the frontend's domain */
    int32_t copy_kind;
    int32_t copy_fd;
    uint64_t copy_request;
    uint16_t domid;
    uint16_t ldomid;
    uint32_t sim_entries;
    uintptr_t sim_table;
    uintptr_t sim_active;
    uintptr_t sim_memory;
    uint32_t sim_pages;
    uint8_t sim_alive_value;
    uintptr_t sim_alive;
    /* the notify: /dev/xen/evtchn's ioctl for port, or an eventfd write */
    int32_t notify_kind;
    int32_t notify_fd;
    uint64_t notify_request;
    uint32_t notify_port;
    /* latency: LatencyHistogram's bounds; counts and sum accumulated until the ring worker folds them */
    uintptr_t bounds;
    uint32_t nbounds;
    uintptr_t buckets;        /* uint64[nbounds + 1], accumulated */
    uintptr_t call_buckets;   /* uint64[nbounds + 1], scratch */
    uint64_t lat_mask;
    double lat_total;
    /* out, per call */
    uint64_t counts[4];       /* accumulated: rd_req, rd_sect, wr_req, wr_sect */
    uint32_t taken_n;
    uint32_t queued;
    uint32_t completed;       /* answered */
    uint32_t reaped;
    uint32_t held_n;
    uint32_t nfailed;
    int32_t notify_errno;
    int32_t error;
    int32_t unpushed;
    /* xb_engine_serve's waits: the channel's fd readable while an event is pending (XB_NOTIFY_EVTCHN:
     * /dev/xen/evtchn's, drained and the port unmasked as EvtchnPort does, IOCTL_EVTCHN_RESET on
     * overflow; else an eventfd), the queue's completion fd; held: requests held in the storage (in/out) */
    int32_t wait_fd;
    int32_t completion_fd;
    uint64_t reset_request;
    uint32_t held;
    uint32_t spurious;        /* out: wake-ups that brought nothing in this serve (it returns at the second
                               * in a row: XB_FREE_SPURIOUS) */
    uint32_t spin_ns;         /* in: xb_engine_serve's adaptive polling: how long it looks at the ring (and the
                               * storage's completions) before asking the frontend for an event and sleeping */
    uint32_t spins;           /* out: times that look found work (no event, no sleep) */
    uint32_t spin_cur_ns;     /* in/out: that look's length now, 0..spin_ns: it adapts (ring_engine.c, spin_grow) */
    double stamp;             /* internal: the engine's last clock read (a take, an answer: monotonic seconds) */
    uint32_t lat_every;       /* in: the latency histogram times one batch taken in lat_every (0, 1: every one),
                               * and only while spin_ns is 0 (the look's adaptation needs every stamp); where a
                               * clock read is a syscall (xb_clock_cost_ns), each untimed batch saves two.
                               * Untimed requests (taken_at 0.0) are answered and counted, not timed. */
    uint32_t lat_tick;        /* internal: batches taken since the last timed one */
    /* cumulative, for bench.py: notifies made, nanoseconds spent in the simulator's grant copy (the real one is
     * not timed: see ring_engine.c grant_copy) */
    uint64_t notifies;
    uint64_t copy_ns;
    uint64_t indirect_taken;  /* cumulative: indirect requests the engine took */
    /* out, per call: the kernel calls the engine made itself (poll, the channel's read and unmask, the grant
     * copy and notify ioctls, the completion fd's read; blkioq_do_io counted once when it had requests to
     * submit, as io_uring's enter; not the clock's reads), and of them the sleeps (poll): in a PV dom0 each
     * is a trip through Xen (getppid: 21-32 us on the rig's), so per request they are its cost's floor */
    uint32_t syscalls;
    uint32_t sleeps;
    uint32_t unsubmitted;     /* internal: requests queued since the last blkioq_do_io */
    /* feature-persistent on the copy path: the ring's struct xk_pgrants (native.h; 0: none) and scratch for the
     * segments that still go to Xen (struct xk_copy_seg[room_segs], uint32[room_segs]) */
    uintptr_t pgrants;
    uintptr_t pg_rest;
    uintptr_t pg_idx;
    /* out, per call: grant-copy segments the engine copied itself from persistently mapped pages (pgrants), and
     * those it handed to Xen's grant copy */
    uint32_t pg_segs;
    uint32_t xen_segs;
    uint32_t idle_untimed;    /* in: xb_engine_serve's sleep has no timeout while the call has nothing to report
                               * (nothing taken, answered or spurious) and nothing is in the storage: an idle
                               * ring then costs its process no wake-up at all (each cost the rig's TCG dom0
                               * milliseconds of Python); whatever needs the ring meanwhile wakes it (wake_fd) */
    uint32_t block_wait;      /* in: xb_engine_serve's sleeps with nothing in the storage block in read(2) on
                               * wait_fd (made blocking for the call, as it was after) instead of poll(2) and then
                               * the read: one kernel call less a wake-up, a trip through Xen each in a PV dom0.
                               * The read has no second fd and no timeout: it ends at an event, at
                               * xb_wake_signal() sent to the serving thread (whoever wakes the call must send
                               * it, again until the call has returned: a signal between the serving thread's
                               * last look and its read is not seen), or at timeout_ms (a POSIX timer aimed at
                               * the serving thread, armed once a call, firing again every 2 ms until the call
                               * disarms it, for the same reason). So only for a caller that can signal the
                               * serving thread: the service's serve thread (RingWorker._serve_acquire), a ring
                               * worker process's main thread with a thread watching wake_fd for it
                               * (channel_watch.py): the read does not watch wake_fd. */
    int32_t fd_flags;         /* internal: wait_fd's file status flags as found (0: not read yet; O_RDWR is not 0) */
};
/* The signal xb_engine_serve's block_wait read is woken by (a real-time one), its handler installed (once:
 * it does nothing, and without SA_RESTART, so the read fails with EINTR). Returns the signal's number, or
 * -1 (errno) when the handler could not be installed. */
int xb_wake_signal(void);
/* Wake-ups in a row that brought nothing and that xb_engine_serve absorbs (looking at the ring a while)
 * before it returns XB_ENGINE_IDLE for the caller's backoff (notify_backoff.py's FREE_SPURIOUS). */
enum { XB_FREE_SPURIOUS = 1 };
/* Serve the ring until it is empty (XB_ENGINE_IDLE) or something is not for the engine. */
int xb_engine_run(struct xb_engine *e);
/* xb_engine_run, then, while the ring is empty, sleep in poll() on the event channel, the completion
 * fd (while requests are held in the storage) and wake_fd (-1: none) and serve again, without going
 * back to the caller: XB_ENGINE_MORE after timeout_ms without an event (with idle_untimed: only once
 * the call has something to report or requests in the storage), when wake_fd is readable, on a
 * signal, or every timeout_ms under load; XB_ENGINE_IDLE after wake-ups that brought nothing, more than
 * XB_FREE_SPURIOUS in a row (the caller's notify-storm backoff decides; spurious counts them all); anything
 * else as xb_engine_run. */
int xb_engine_serve(struct xb_engine *e, int wake_fd, int timeout_ms);
/* The reaper's n completions (already in the queue's array): walked, answered, published. 0 or XB_ENGINE_*. */
int xb_engine_reap(struct xb_engine *e, uint32_t n);
/* What one clock_gettime(CLOCK_MONOTONIC) costs on this host, nanoseconds (the least of a few back-to-back
 * reads): tens of ns where the vDSO reads it, microseconds where it is a syscall (a PV dom0 whose TSC
 * Linux marked unstable: ~25 us on the rig's). ring_engine.py sets lat_every and the look's default by it. */
uint64_t xb_clock_cost_ns(void);
