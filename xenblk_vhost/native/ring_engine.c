/* The ring engine: a whole wake-up's plain requests served in one call (backend/datapath/ring_engine.py
 * says when the ring worker uses it; blkio_calls.h declares the struct and the call).
 *
 * It chains what the ring worker's held-batch path (copy_lane.py's hold, RingWorker._dispatch_held,
 * _complete_held) does in one C call per step, without going back to Python in between: take the
 * requests the frontend published (a private copy, as BackRing.take_slots), decode and validate the
 * copy (xk_parse_slots: the intake's verdicts), hold the leading plain READ/WRITEs in the lane's
 * table (xk_lane_hold), record them in the journal (xk_journal_take, before anything reaches the
 * storage), copy the writes' data in (xk_lane_pack_op + the grant copy), queue them (xb_queue_lane),
 * submit and reap (blkioq_do_io), walk the completions (xk_lane_complete_held), copy the reads' data
 * out, answer (xk_lane_answer_held: journal answer then response), publish (xk_ring_push) and notify.
 * The same kernels the Python-driven path calls, in the same order: the engine adds no decision of
 * its own beyond "is this the plain case".
 *
 * Anything else stops it before it changes anything the reference path would have to undo, and it
 * says why (XB_ENGINE_* in blkio_calls.h): a request that is not plain (the reference path takes
 * it from req_cons, which the engine did not advance past it), no free slot or journal frame, a
 * bogus req_prod (the reference halts the ring), a completion that is not a held request's success
 * (left in the queue's completion array for RingWorker._reaped), a grant copy that failed (the
 * held slots go to the reference path as _dispatch_held / _complete_held send them), a storage
 * failure. Guest memory is read once per slot, into the private copy; only the copy is parsed. */
#define _GNU_SOURCE  /* SIGEV_THREAD_ID */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>
#include <blkio.h>

#include "native.h"
#include "blkio_calls.h"
#include "lane_entry.h"

#define SRING_REQ_PROD 0
#define SRING_REQ_EVENT 4
#define SRING_ENTRIES 64
#define SRING_MAX_BATCH 4096u  /* a ring's slots at most (order 4: 1024 x86_64; the ABI caps at 4096) */
#define XK_OP_INDIRECT 6
#define LANE_MAX_SEGS XK_LANE_INLINE_SEGS
#define PAGE_BYTES 4096u
#define GNTST_OKAY 0

struct gntdev_copy_arg {  /* struct ioctl_gntdev_grant_copy (x86_64): count, then the array */
    uint32_t count;
    uint32_t pad;
    struct xk_copy_seg *segments;
};

static double monotonic(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);  /* Python's time.monotonic() clock */
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* The clock read the latency histogram needs (a take, an answer), kept: the look's adaptation measures a
 * sleep between two of them instead of reading the clock around poll() (coarse_ns says what a read costs). */
static double stamp(struct xb_engine *e)
{
    return e->stamp = monotonic();
}

static uint64_t monotonic_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

uint64_t xb_clock_cost_ns(void)
{
    uint64_t least = UINT64_MAX;
    uint64_t prev = monotonic_ns();
    for (int i = 0; i < 16; i++) {  /* the least: a preemption or an interrupt inflates one read, not all */
        uint64_t now = monotonic_ns();
        if (now - prev < least)
            least = now - prev;
        prev = now;
    }
    return least;
}

/* The clock read for a batch taken: every batch, or with lat_every one in lat_every (0.0: untimed, see
 * struct xb_engine) while the look is off (its adaptation measures sleeps between stamps). */
static double take_stamp(struct xb_engine *e)
{
    if (e->lat_every > 1 && !e->spin_ns) {
        if (++e->lat_tick < e->lat_every)
            return 0.0;
        e->lat_tick = 0;
    }
    return stamp(e);
}

/* The clock read for answering the held slots ready[0..n): none when none of them was timed. */
static double answer_stamp(struct xb_engine *e, const struct xk_lane_slot *table, const uint16_t *ready, uint32_t n)
{
    if (e->lat_every > 1) {
        uint32_t i = 0;
        while (i < n && ready[i] < e->nslots && table[ready[i]].taken_at == 0.0)
            i++;
        if (i == n)
            return 0.0;
    }
    return stamp(e);
}

/* For the serve's slices (100 ms, 1 s): the coarse clock is read from the vDSO's page in any case, while
 * CLOCK_MONOTONIC is a syscall through Xen where Linux found the TSC unstable (the rig's PV dom0: 25 us a
 * read, as much as getppid; `bench_monitor.py clock`). */
static uint64_t coarse_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static inline uint32_t load_shared(const struct xb_engine *e, uint32_t off)
{
    return __atomic_load_n((const uint32_t *)(uintptr_t)(e->sring + off), __ATOMIC_ACQUIRE);
}

static void xen_copy(struct xb_engine *e, struct xk_copy_seg *segs, uint32_t n);

/* The grant copy of n packed segments; how many failed (0: all copied). The segments whose grant is
 * persistently mapped (e->pgrants) are copied here (xk_pg_copy); only the others go to Xen. */
static uint32_t grant_copy(struct xb_engine *e, struct xk_copy_seg *segs, uint32_t n)
{
    if (!n)
        return 0;
    if (e->pgrants) {
        struct xk_copy_seg *rest = (struct xk_copy_seg *)(uintptr_t)e->pg_rest;
        uint32_t *idx = (uint32_t *)(uintptr_t)e->pg_idx;
        uint32_t m = xk_pg_copy((struct xk_pgrants *)(uintptr_t)e->pgrants, segs, n, e->domid, rest, idx);
        e->pg_segs += n - m;
        if (m) {
            xen_copy(e, rest, m);
            for (uint32_t k = 0; k < m; k++)
                segs[idx[k]].status = rest[k].status;
        }
        return m ? xk_copy_failures(segs, n) : 0;
    }
    xen_copy(e, segs, n);
    return xk_copy_failures(segs, n);
}

/* Xen's grant copy of n packed segments (statuses in them): gntdev's ioctl, or the simulated hypervisor's. */
static void xen_copy(struct xb_engine *e, struct xk_copy_seg *segs, uint32_t n)
{
    e->xen_segs += n;
    if (e->copy_kind == XB_COPY_GNTDEV) {
        struct gntdev_copy_arg arg = {n, 0, segs};
        e->syscalls++;
        if (ioctl(e->copy_fd, (unsigned long)e->copy_request, &arg) < 0) {
            for (uint32_t i = 0; i < n; i++)  /* as a whole (grant_copy_batch's OSError): all failed */
                segs[i].status = -1;
        }
    } else {
        /* the simulated hypervisor's: its checks, on the domain's tables, or GNTST_bad_domain if it died.
         * Timed (bench.py reports its share: this copy is ours, Xen's is not); the real one is not: a clock
         * read can cost a syscall (coarse_ns). */
        uint64_t t0 = monotonic_ns();
        int alive = *(volatile const uint8_t *)(uintptr_t)e->sim_alive == e->sim_alive_value;
        if (alive)
            xk_sim_grant_copy(segs, 0, (int)n, e->domid, e->ldomid, (const uint8_t *)(uintptr_t)e->sim_table,
                              e->sim_entries, (const uint32_t *)(uintptr_t)e->sim_active,
                              (uint8_t *)(uintptr_t)e->sim_memory, e->sim_pages);
        else
            xk_sim_grant_copy(segs, 0, (int)n, e->domid, e->ldomid, NULL, 0, NULL, NULL, 0);
        e->copy_ns += monotonic_ns() - t0;
    }
}

/* The distinct owner slots of the failed segments, into e->failed (CopyBatch.failed_owners' order). */
static void collect_failed(struct xb_engine *e, const struct xk_copy_seg *segs, uint32_t n)
{
    const uint16_t *owners = (const uint16_t *)(uintptr_t)e->owners;
    uint16_t *failed = (uint16_t *)(uintptr_t)e->failed;
    uint32_t k = 0;
    for (uint32_t i = 0; i < n; i++) {
        if (!segs[i].status)
            continue;
        uint32_t j = 0;
        while (j < k && failed[j] != owners[i])
            j++;
        if (j == k)
            failed[k++] = owners[i];
    }
    e->nfailed = k;
}

static void notify(struct xb_engine *e)
{
    e->notifies++;
    e->syscalls++;
    if (e->notify_kind == XB_NOTIFY_EVTCHN) {
        uint32_t port = e->notify_port;
        if (ioctl(e->notify_fd, (unsigned long)e->notify_request, &port) < 0)
            e->notify_errno = errno;
    } else {
        uint64_t one = 1;
        if (write(e->notify_fd, &one, sizeof one) < 0 && errno != EAGAIN)
            e->notify_errno = errno;  /* EAGAIN: the counter is saturated, the peer has it pending */
    }
}

/* Whether record r is one the engine takes: a plain READ/WRITE (1..11 direct segments), or, with a side
 * table, an indirect request (its slot half: the parse checked its op and segment count). */
static int engine_record(const struct xb_engine *e, const struct xk_req *r)
{
    if (xk_lane_all_plain(r, 1))
        return r->nr <= (uint64_t)LANE_MAX_SEGS * 8;
    return e->ind && r->kind == XK_INDIRECT && r->nseg && r->nseg <= e->max_ind;
}

static uint8_t *side_entry(const struct xb_engine *e, uint32_t slot)
{
    return (uint8_t *)(uintptr_t)e->ind + (size_t)slot * e->max_ind * 8;
}

/* The indirect requests among the first k records (slots taken[]): their indirect pages' segment bytes
 * copied into their slots' side table entries (ONE grant copy for the batch, only nseg * 8 bytes, as
 * IndirectPages.resolve copies them), then decoded and validated from that private copy
 * (xk_check_indirect: the reference's verdicts; the record becomes the request's, its id kept), and
 * a buffer found: its slot's small one when its data fits, else a large one (bufs[], larges[]). Stops
 * at the first it cannot serve (a page that did not copy, a rejection, no large buffer free, more than
 * a storage request carries, more segments than the engine's arrays hold): the reference path takes
 * that one and the rest from req_cons. Returns how many of the k the engine keeps. */
static uint32_t take_indirect(struct xb_engine *e, const uint8_t *raw, struct xk_req *recs, uint32_t k,
                              const uint16_t *taken, uint64_t *bufs, uint32_t *larges, int *map_first)
{
    struct xk_copy_seg *segs = (struct xk_copy_seg *)(uintptr_t)e->segs;
    uint16_t *owners = (uint16_t *)(uintptr_t)e->owners;
    uint32_t m = 0;
    for (uint32_t i = 0; i < k; i++) {
        if (recs[i].kind != XK_INDIRECT)
            continue;
        uint32_t need = recs[i].nseg * 8;
        uint64_t dest = (uint64_t)(uintptr_t)side_entry(e, taken[i]);
        for (uint32_t p = 0; need; p++) {  /* (nseg <= max_ind <= 4096: at most 8 pages) */
            uint32_t len = need < PAGE_BYTES ? need : PAGE_BYTES;
            uint32_t gref;
            memcpy(&gref, raw + (size_t)i * e->entry + e->grefs_off + 4 * p, 4);
            struct xk_copy_seg *g = &segs[m];
            memset(g, 0, sizeof *g);
            g->source.foreign.ref = gref;
            g->source.foreign.domid = e->domid;
            g->dest.virt = dest;
            g->len = (uint16_t)len;
            g->flags = 1;  /* GNTCOPY_source_gref */
            owners[m++] = (uint16_t)i;
            dest += len;
            need -= len;
        }
    }
    uint32_t keep = k;
    if (m && grant_copy(e, segs, m)) {
        for (uint32_t g = 0; g < m; g++)  /* the first request whose pages did not all copy */
            if (segs[g].status != GNTST_OKAY && owners[g] < keep)
                keep = owners[g];
    }
    const struct xk_intake_cfg *cfg = (const struct xk_intake_cfg *)(uintptr_t)e->cfg;
    uint32_t *large = (uint32_t *)(uintptr_t)e->large;
    uint32_t *nlarge = (uint32_t *)(uintptr_t)e->nlarge;
    uint64_t nsegs = 0;
    for (uint32_t i = 0; i < keep; i++) {
        struct xk_req *r = &recs[i];
        larges[i] = XK_LANE_NO_LARGE;
        bufs[i] = e->base + (uint64_t)taken[i] * e->stride;
        nsegs += r->nseg;
        if (nsegs > e->room_segs)
            return i;
        if (r->kind != XK_INDIRECT)
            continue;
        struct xk_req checked;
        if (xk_check_indirect(side_entry(e, taken[i]), r->nseg, r->aux, r->sector, cfg, &checked))
            return i;  /* the reference answers it (its own copy, its own verdict) */
        if (e->pgrants && xk_pg_need((struct xk_pgrants *)(uintptr_t)e->pgrants, side_entry(e, taken[i]), r->nseg, 8)) {
            *map_first = 1;  /* its data pages are to be mapped first (its indirect pages are copied again then) */
            return i;
        }
        uint64_t bytes = checked.nr << 9;
        if (e->max_transfer && bytes > e->max_transfer)
            return i;  /* the reference splits it in parts */
        if (bytes > e->stride) {  /* CopyDataPath._attach: a large buffer, or wait for one */
            if (!*nlarge)
                return i;
            larges[i] = large[--*nlarge];
            bufs[i] = e->region + larges[i];
        }
        checked.id = r->id;
        *r = checked;
    }
    return keep;
}

/* Give back the large buffers take_indirect took for records [from, k). */
static void untake_large(struct xb_engine *e, const uint32_t *larges, uint32_t from, uint32_t k)
{
    uint32_t *large = (uint32_t *)(uintptr_t)e->large;
    uint32_t *nlarge = (uint32_t *)(uintptr_t)e->nlarge;
    for (uint32_t i = k; i-- > from;)  /* popped in order: pushed back in reverse */
        if (larges[i] != XK_LANE_NO_LARGE)
            large[(*nlarge)++] = larges[i];
}

/* Take, hold, record, copy in and queue the next batch of plain (and indirect) requests. Returns how many
 * were queued (0: the ring has none now, or cannot take one: *stop says why), or -XB_ENGINE_* (the batch
 * is held, not queued). */
static int take_batch(struct xb_engine *e, int *stop)
{
    uint32_t rp = load_shared(e, SRING_REQ_PROD);  /* acquire: the slots after it */
    if ((uint32_t)(rp - e->rsp_prod_pvt) > e->size) {  /* RING_REQUEST_PROD_OVERFLOW: the reference halts */
        *stop = XB_ENGINE_PYTHON;
        return 0;
    }
    uint32_t n = rp - e->req_cons;
    uint32_t room = e->size - (e->req_cons - e->rsp_prod_pvt);
    if (room < n)
        n = room;
    if (!n) {
        if (rp != e->req_cons)
            *stop = XB_ENGINE_PYTHON;  /* (every response slot owed: cannot happen with slots free) */
        return 0;
    }
    struct xk_journal *j = (struct xk_journal *)(uintptr_t)e->journal;
    if (n > e->nfree)
        n = e->nfree;
    if (j && n > j->per_frame)
        n = j->per_frame;
    if (!n || (j && !j->ctl[0])) {  /* no free slot or journal frame: the reference waits for one */
        *stop = XB_ENGINE_PYTHON;
        return 0;
    }
    uint8_t *raw = (uint8_t *)(uintptr_t)e->raw;
    const uint8_t *slots = (const uint8_t *)(uintptr_t)(e->sring + SRING_ENTRIES);
    for (uint32_t i = 0; i < n; i++)  /* the private copy: guest memory read once */
        memcpy(raw + (size_t)i * e->entry, slots + (size_t)((e->req_cons + i) & (e->size - 1)) * e->entry, e->entry);
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
    const struct xk_intake_cfg *cfg = (const struct xk_intake_cfg *)(uintptr_t)e->cfg;
    struct xk_req *recs = (struct xk_req *)(uintptr_t)e->recs;
    xk_parse_slots(raw, n, cfg, recs);
    uint32_t k = 0, nind = 0;
    struct xk_pgrants *pg = (struct xk_pgrants *)(uintptr_t)e->pgrants;
    int map_first = 0;  /* the engine stops before a request whose pages are to be mapped first */
    while (k < n && engine_record(e, &recs[k])) {
        if (pg) {  /* a direct request's data pages, an indirect one's indirect pages */
            const uint8_t *slot = raw + (size_t)k * e->entry;
            int ind = recs[k].kind == XK_INDIRECT;
            uint32_t pages = ind ? (recs[k].nseg * 8 + PAGE_BYTES - 1) / PAGE_BYTES : recs[k].nseg;
            if (xk_pg_need(pg, slot + (ind ? e->grefs_off : cfg->seg_off), pages, ind ? 4 : 8)) {
                map_first = 1;
                break;
            }
        }
        nind += recs[k++].kind == XK_INDIRECT;
    }
    uint16_t *stack = (uint16_t *)(uintptr_t)e->stack;
    uint16_t *taken = (uint16_t *)(uintptr_t)e->taken;
    for (uint32_t i = 0; i < k; i++)
        taken[i] = stack[e->nfree - 1 - i];  /* the slots k free.pop() would give, in that order */
    uint64_t bufs[SRING_MAX_BATCH];
    uint32_t larges[SRING_MAX_BATCH];
    if (k > SRING_MAX_BATCH)
        k = SRING_MAX_BATCH;
    if (nind)
        k = take_indirect(e, raw, recs, k, taken, bufs, larges, &map_first);
    if (k < n)  /* after these: the reference path takes the rest from req_cons, or their pages are mapped first */
        *stop = map_first ? XB_ENGINE_MAP : XB_ENGINE_PYTHON;
    if (!k)
        return 0;

    struct xk_lane_slot *table = (struct xk_lane_slot *)(uintptr_t)e->table;
    uint64_t counts[4] = {0, 0, 0, 0};
    double now = take_stamp(e);
    uint32_t ind_total = 0;
    uint16_t *lens = (uint16_t *)(uintptr_t)e->lens;
    uint8_t *jind = (uint8_t *)(uintptr_t)e->jind;
    for (uint32_t i = 0; i < k; i++) {
        const struct xk_req *r = &recs[i];
        int indirect = nind && raw[(size_t)i * e->entry] == XK_OP_INDIRECT;  /* (recs[i] is its checked record) */
        uint64_t segs = indirect ? (uint64_t)(uintptr_t)side_entry(e, taken[i])
                                 : (uint64_t)(uintptr_t)(raw + (size_t)i * e->entry + cfg->seg_off);
        uint64_t buf = nind ? bufs[i] : e->base + (uint64_t)taken[i] * e->stride;
        uint32_t lg = nind ? larges[i] : XK_LANE_NO_LARGE;
        if (xk_lane_hold_one(table, e->nslots, taken[i], r, segs, buf, lg, -1, now, counts) < 0) {
            for (uint32_t u = 0; u < i; u++)  /* (free slots are never held: cannot happen) nothing done */
                table[taken[u]].held = XK_HELD_NO;
            if (nind)
                untake_large(e, larges, 0, k);
            *stop = XB_ENGINE_PYTHON;
            return 0;
        }
        if (j && nind) {  /* the frame keeps each indirect request's segments, as record_taken(indirect) */
            lens[i] = indirect ? (uint16_t)(r->nseg * 8) : 0;
            if (indirect) {
                memcpy(jind + ind_total, (const void *)(uintptr_t)segs, (size_t)r->nseg * 8);
                ind_total += r->nseg * 8;
            }
        }
    }
    if (j) {  /* before anything reaches the storage */
        int64_t first = nind ? xk_journal_take(j, e->req_cons, raw, k, (const uint8_t *)lens, jind, ind_total)
                             : xk_journal_take(j, e->req_cons, raw, k, NULL, NULL, 0);
        if (first < 0) {  /* (a free frame was checked above: cannot happen) undo the hold */
            for (uint32_t i = 0; i < k; i++)
                table[taken[i]].held = XK_HELD_NO;
            if (nind)
                untake_large(e, larges, 0, k);
            *stop = XB_ENGINE_PYTHON;
            return 0;
        }
        for (uint32_t i = 0; i < k; i++)
            table[taken[i]].jref = first + (int64_t)i;
    }
    e->req_cons += k;
    e->nfree -= k;
    if (e->nfree < e->low)
        e->low = e->nfree;
    e->taken_n += k;
    e->held_n = k;
    if (nind)
        for (uint32_t i = 0; i < k; i++)
            e->indirect_taken += raw[(size_t)i * e->entry] == XK_OP_INDIRECT;
    for (int c = 0; c < 4; c++)
        e->counts[c] += counts[c];

    if (counts[2]) {  /* the writes' data in: one grant copy for the batch */
        struct xk_copy_seg *segs = (struct xk_copy_seg *)(uintptr_t)e->segs;
        int packed = xk_lane_pack_op(segs, table, e->nslots, taken, k, 1, 0, e->domid, e->base, e->stride,
                                     (uint16_t *)(uintptr_t)e->owners, e->room_segs);
        if (packed < 0) {
            e->nfailed = 0;
            return -XB_ENGINE_UNPREPARED;
        }
        if (grant_copy(e, segs, (uint32_t)packed)) {
            collect_failed(e, segs, (uint32_t)packed);
            return -XB_ENGINE_COPY_IN_FAILED;
        }
    }
    if (xb_queue_lane(e->q, e->table, e->nslots, (uintptr_t)taken, k, e->base, e->stride) < 0) {
        e->nfailed = 0;
        return -XB_ENGINE_COPY_IN_FAILED;  /* (checked by the hold: cannot happen) queue them the reference way */
    }
    e->queued += k;
    e->held += k;
    e->unsubmitted = 1;
    return (int)k;
}

/* Walk n completions in the queue's array: the held requests' answers, or a reason to stop. */
static int complete(struct xb_engine *e, uint32_t n)
{
    struct xk_lane_slot *table = (struct xk_lane_slot *)(uintptr_t)e->table;
    struct xk_copy_seg *segs = (struct xk_copy_seg *)(uintptr_t)e->segs;
    uint16_t *ready = (uint16_t *)(uintptr_t)e->ready;
    int packed = xk_lane_complete_held(segs, table, e->nslots, (const struct xk_completion *)(uintptr_t)e->completions,
                                       n, ready, (uint16_t *)(uintptr_t)e->owners, e->domid, e->base, e->stride,
                                       e->room_segs);
    if (packed < 0) {  /* an error, or not a held request's: RingWorker._reaped completes them all */
        e->reaped = n;
        return XB_ENGINE_REAPED;
    }
    if (grant_copy(e, segs, (uint32_t)packed)) {  /* a read's copy out failed: walked, answered by Python */
        collect_failed(e, segs, (uint32_t)packed);
        e->reaped = n;
        return XB_ENGINE_COPY_OUT_FAILED;
    }
    double total = 0.0;
    double now = answer_stamp(e, table, ready, n);  /* (ready[]: xk_lane_complete_held's walked held slots) */
    int64_t mask = xk_lane_answer_held((const struct xk_rsp_ring *)(uintptr_t)e->rsp, e->rsp_prod_pvt, table,
                                       e->nslots, ready, n, now, (const double *)(uintptr_t)e->bounds,
                                       e->nbounds, (uint64_t *)(uintptr_t)e->call_buckets, &total,
                                       (uint32_t *)(uintptr_t)e->large, (uint32_t *)(uintptr_t)e->nlarge);
    if (mask < 0)
        return XB_ENGINE_BUG;
    const uint64_t *got = (const uint64_t *)(uintptr_t)e->call_buckets;
    uint64_t *sums = (uint64_t *)(uintptr_t)e->buckets;
    for (uint32_t b = 0; b <= e->nbounds; b++)
        sums[b] += got[b];
    e->lat_mask |= (uint64_t)mask;
    e->lat_total += total;
    e->rsp_prod_pvt += n;
    e->completed += n;
    e->held -= n;
    uint16_t *stack = (uint16_t *)(uintptr_t)e->stack;
    for (uint32_t i = 0; i < n; i++)  /* as pool.free.extend(ready) */
        stack[e->nfree++] = ready[i];
    e->unpushed = 1;
    return 0;
}

static void push(struct xb_engine *e)
{
    if (!e->unpushed)
        return;
    e->unpushed = 0;
    if (xk_ring_push((uint8_t *)(uintptr_t)e->sring, e->rsp_prod_pvt, (struct xk_journal *)(uintptr_t)e->journal))
        notify(e);
}

/* Submit what is queued and walk what completed, until a reap comes back short of the array. */
static int reap(struct xb_engine *e)
{
    for (;;) {
        e->syscalls += e->unsubmitted;  /* (io_uring enters the kernel to submit; a reap alone reads its ring) */
        e->unsubmitted = 0;
        int n = blkioq_do_io((struct blkioq *)e->q, (struct blkio_completion *)e->completions, 0,
                             (int)e->max_completions, NULL);
        if (n < 0) {
            e->error = -n;
            return XB_ENGINE_STORAGE_ERROR;
        }
        if (!n)
            return 0;
        int rc = complete(e, (uint32_t)n);
        if (rc)
            return rc;
        if ((uint32_t)n < e->max_completions)
            return 0;
    }
}

static void reset_outs(struct xb_engine *e)
{
    e->taken_n = e->queued = e->completed = e->reaped = e->held_n = e->nfailed = e->spurious = 0;
    e->spins = e->syscalls = e->sleeps = e->pg_segs = e->xen_segs = 0;
    e->notify_errno = 0;
    e->low = e->nfree;
}

/* How long the look lasts adapts to the ring, as KVM's halt polling does (halt_poll_ns, grow and shrink):
 * after a look that found nothing, the sleep that follows says whether a look could have: one that ended
 * sooner than spin_ns doubles it (from XB_SPIN_GROW_NS), a longer one halves it (none below
 * XB_SPIN_FLOOR_NS). The sleep is measured between the last stamp before it and the first after (see
 * spin_adapt). A frontend that answers within microseconds (the simulator's load generator, a busy
 * guest) keeps it near spin_ns; one a millisecond away (the rig's guest at queue depth one) brings it to
 * none within a few requests: there the looks only cost dom0 syscalls. */
#define XB_SPIN_FLOOR_NS 2000u
#define XB_SPIN_GROW_NS 10000u

static void spin_shrink(struct xb_engine *e)
{
    e->spin_cur_ns /= 2;
    if (e->spin_cur_ns < XB_SPIN_FLOOR_NS)
        e->spin_cur_ns = 0;
}

static void spin_grow(struct xb_engine *e)
{
    uint64_t next = e->spin_cur_ns ? 2ull * e->spin_cur_ns : XB_SPIN_GROW_NS;
    e->spin_cur_ns = next > e->spin_ns ? e->spin_ns : (uint32_t)next;
}

/* After a sleep: `from` the last stamp before it (an answer, or the take that put requests in the storage),
 * e->stamp the first after it. Between them also lie the look that came before the sleep (looked_ns) and
 * the work before the first stamp: a sleep shorter than spin_ns shows as less than spin_ns + looked_ns. */
static void spin_adapt(struct xb_engine *e, double from, uint32_t looked_ns)
{
    if ((e->stamp - from) * 1e9 < (double)e->spin_ns + (double)looked_ns)
        spin_grow(e);
    else
        spin_shrink(e);
}

/* Adaptive polling (xb_engine_serve's, e->spin_ns): before asking the frontend for an event, look at the
 * ring, and with requests in the storage at its completions, for a while (spin_cur_ns, see spin_grow), as
 * SPDK's and io_uring's pollers do: a frontend at queue depth one pushes its next request within
 * microseconds of our answer, and an event and a sleep cost both sides more than the look (on a VM the idle
 * vCPU's wake-up alone was ~50 us). Returns 1 when work came (a request published, or completions
 * answered), 0 after spin_cur_ns without any, or -XB_ENGINE_* when the reap stopped. req_event is not armed
 * meanwhile: the frontend sends no event for what it publishes while we look. */
static int spin_for_work(struct xb_engine *e)
{
    if (!e->spin_cur_ns)
        return 0;
    uint64_t until = monotonic_ns() + e->spin_cur_ns;
    do {
        if (load_shared(e, SRING_REQ_PROD) != e->req_cons)
            return 1;
        if (e->held) {
            uint32_t before = e->completed;
            int rc = reap(e);
            push(e);
            if (rc)
                return -rc;
            if (e->completed != before)
                return 1;
        }
        sched_yield();  /* (a thread this core would run meanwhile, an io_uring worker, runs: measured) */
    } while (monotonic_ns() < until);
    return 0;
}

/* Serve batches until the ring is empty (its final check done) or something stops it; spin: look for
 * more work (spin_for_work) before the final check, when this call served some or requests are in the
 * storage. */
static int cycle(struct xb_engine *e, int spin)
{
    for (uint32_t batch = 0;; batch++) {
        int stop = 0;
        int k = take_batch(e, &stop);
        if (k < 0) {
            push(e);
            return -k;
        }
        int rc = reap(e);  /* page-cache reads complete here: the whole cycle in this call */
        push(e);
        if (rc)
            return rc;
        if (stop)
            return stop;
        if (!k) {
            if (spin && (batch || e->held)) {  /* (after work, or for the storage's: an idle ring sleeps at once) */
                int got = spin_for_work(e);
                if (got < 0)
                    return -got;
                if (got) {
                    e->spins++;
                    continue;
                }
            }
            /* RING_FINAL_CHECK_FOR_REQUESTS: ask for an event at the next request, then look again */
            __atomic_store_n((uint32_t *)(uintptr_t)(e->sring + SRING_REQ_EVENT), e->req_cons + 1, __ATOMIC_RELAXED);
            __atomic_thread_fence(__ATOMIC_SEQ_CST);
            if (load_shared(e, SRING_REQ_PROD) == e->req_cons)
                return XB_ENGINE_IDLE;
            continue;
        }
        if (batch + 1 >= e->max_batches)
            return XB_ENGINE_MORE;  /* let the other rings and tasks run */
    }
}

int xb_engine_run(struct xb_engine *e)
{
    reset_outs(e);
    return cycle(e, 0);
}

/* EvtchnPort._drain / SimPort._consume: whether an event was pending (then consumed, the port unmasked). */
static int consume_event(struct xb_engine *e)
{
    if (e->notify_kind != XB_NOTIFY_EVTCHN) {
        uint64_t count;
        e->syscalls++;
        return read(e->wait_fd, &count, sizeof count) == (ssize_t)sizeof count;
    }
    uint32_t ports[256];
    int got = 0;
    for (;;) {
        ssize_t r = read(e->wait_fd, ports, sizeof ports);
        e->syscalls++;
        if (r < 0) {
            if (errno == EFBIG) {  /* the kernel's queue overflowed: reset it, count it as an event */
                e->syscalls++;
                ioctl(e->wait_fd, (unsigned long)e->reset_request, 0);
                got = 1;
            }
            break;
        }
        if (r < (ssize_t)sizeof ports[0])
            break;
        got = 1;
        if (r < (ssize_t)sizeof ports)
            break;  /* a short read: the queue is empty (a read copies all it holds, up to the count) */
    }
    if (got) {
        uint32_t port = e->notify_port;
        e->syscalls++;
        if (write(e->wait_fd, &port, sizeof port) < 0)
            e->notify_errno = errno;
    }
    return got;
}

/* block_wait (blkio_calls.h): the wake signal, and a timer per serving thread that sends it at the call's
 * timeout and again every XB_WAKE_REFIRE_NS until the call disarms it (made at the thread's first timed
 * sleep, deleted at its exit: a thread key's destructor). The again: the signal is seen only by a read it
 * interrupts, and the timer can fire before a read starts - between the serve's last look at the clock
 * and the read, or before that look, the coarse clock lagging the timer's by up to a tick (4 ms at 250 Hz):
 * a call whose slice is a few ms sleeps past it, a read that nothing else ends (the engine's tests' 3 ms
 * slices in a ring worker process hung so, its frontend waiting for the same thread's trio loop). */
#define XB_WAKE_REFIRE_NS 2000000u
static int wake_signo = -1;
static pthread_once_t wake_once = PTHREAD_ONCE_INIT;
static pthread_key_t wake_timer_key;

static void wake_handler(int sig)
{
    (void)sig;  /* its only work is the EINTR of the read it interrupts */
}

static void wake_timer_free(void *p)
{
    timer_delete(*(timer_t *)p);
    free(p);
}

static void wake_setup(void)
{
    int sig = SIGRTMIN + 5;  /* (glibc keeps the first ones; nothing in our process uses real-time signals) */
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = wake_handler;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = 0;  /* no SA_RESTART */
    if (sigaction(sig, &sa, NULL) == 0 && pthread_key_create(&wake_timer_key, wake_timer_free) == 0)
        wake_signo = sig;
}

int xb_wake_signal(void)
{
    pthread_once(&wake_once, wake_setup);
    return wake_signo;
}

/* This thread's timer set to send the wake signal at CLOCK_MONOTONIC `at_ns` (coarse_ns's clock, finer).
 * 0, or -1 when there is none: the caller then polls (a blocking read must not go without its timeout). */
static int arm_wake_timer(uint64_t at_ns)
{
    timer_t *t = pthread_getspecific(wake_timer_key);
    if (!t) {
        t = malloc(sizeof *t);
        if (!t)
            return -1;
        struct sigevent sev;
        memset(&sev, 0, sizeof sev);
        sev.sigev_notify = SIGEV_THREAD_ID;
        sev.sigev_signo = wake_signo;
#ifdef sigev_notify_thread_id
        sev.sigev_notify_thread_id = (pid_t)syscall(SYS_gettid);
#else
        sev._sigev_un._tid = (pid_t)syscall(SYS_gettid);  /* (glibc < 2.35 names it only so) */
#endif
        if (timer_create(CLOCK_MONOTONIC, &sev, t) < 0) {
            free(t);
            return -1;
        }
        if (pthread_setspecific(wake_timer_key, t)) {
            wake_timer_free(t);
            return -1;
        }
    }
    struct itimerspec its;
    memset(&its, 0, sizeof its);
    its.it_value.tv_sec = (time_t)(at_ns / 1000000000u);
    its.it_value.tv_nsec = (long)(at_ns % 1000000000u);
    its.it_interval.tv_nsec = XB_WAKE_REFIRE_NS;
    return timer_settime(*t, TIMER_ABSTIME, &its, NULL);
}

/* This thread's timer stopped (at the end of a call that armed it: it re-fires until then). */
static void disarm_wake_timer(void)
{
    timer_t *t = pthread_getspecific(wake_timer_key);
    if (t) {
        struct itimerspec its;
        memset(&its, 0, sizeof its);
        timer_settime(*t, 0, &its, NULL);
    }
}

/* What a serve call's blocking sleeps set up once: wait_fd blocking, the timer armed. */
struct block_state {
    int blocking;
    int armed;
};

/* block_wait's sleep: read(2) on wait_fd, blocking, until an event (1: consumed, the port unmasked, as
 * consume_event), the wake signal or the timer (-1: the call goes back to its caller), or 0: cannot block
 * here (wait_fd's flags or the timer refused: block_wait is turned off, the caller polls). until_ns: the
 * call's timeout (0: none, an untimed sleep). */
static int block_for_event(struct xb_engine *e, uint64_t until_ns, struct block_state *bs)
{
    if (!bs->blocking) {
        if (!e->fd_flags) {
            e->syscalls++;
            int flags = fcntl(e->wait_fd, F_GETFL);
            if (flags <= 0) {
                e->block_wait = 0;
                return 0;
            }
            e->fd_flags = flags;
        }
        e->syscalls++;
        if (fcntl(e->wait_fd, F_SETFL, e->fd_flags & ~O_NONBLOCK) < 0) {
            e->block_wait = 0;
            return 0;
        }
        bs->blocking = 1;
    }
    if (until_ns && !bs->armed) {
        e->syscalls++;
        if (arm_wake_timer(until_ns) < 0) {
            e->block_wait = 0;
            return 0;
        }
        bs->armed = 1;
    }
    e->sleeps++;
    /* consume_event's read, blocking now (one port per fd, queued once until it is unmasked: its first read
     * is short, so it does not read again); nothing consumed: EINTR, the wake signal or the timer */
    return consume_event(e) ? 1 : -1;
}

static int serve(struct xb_engine *e, int wake_fd, int timeout_ms, struct block_state *bs);

int xb_engine_serve(struct xb_engine *e, int wake_fd, int timeout_ms)
{
    struct block_state bs = {0, 0};
    int rc = serve(e, wake_fd, timeout_ms, &bs);
    if (bs.armed) {  /* (a signal it sent before this lands in the caller: a no-op handler, an EINTR retried) */
        e->syscalls++;
        disarm_wake_timer();
    }
    if (bs.blocking) {  /* wait_fd as it was: the caller's reads must not block */
        e->syscalls++;
        fcntl(e->wait_fd, F_SETFL, e->fd_flags);
    }
    return rc;
}

static int serve(struct xb_engine *e, int wake_fd, int timeout_ms, struct block_state *bs)
{
    reset_outs(e);
    uint64_t until = coarse_ns() + (uint64_t)timeout_ms * 1000000u;
    uint32_t taken_at_wake = 0;
    uint32_t taken_at_spurious = 0;
    int woken = 0, spurious_in_a_row = 0;
    double slept_from = 0.0;  /* the stamp before the last sleep, while the look's adaptation waits for the next */
    uint32_t looked_ns = 0;
    int adapting = 0;
    for (;;) {
        int rc = cycle(e, e->spin_ns != 0);
        if (adapting && e->stamp != slept_from) {
            adapting = 0;
            spin_adapt(e, slept_from, looked_ns);
        }
        if (rc == XB_ENGINE_MORE) {
            if (coarse_ns() < until)
                continue;  /* (under load: back to the caller every timeout_ms) */
            return rc;
        }
        if (rc)
            return rc;
        if (woken && e->taken_n == taken_at_wake) {
            e->spurious++;
            if (e->taken_n != taken_at_spurious)
                spurious_in_a_row = 0;  /* work since the last one: not in a row */
            taken_at_spurious = e->taken_n;
            /* A second in a row: the caller's backoff decides how long to sleep on it (a guest that only
             * kicks). The first one in a row is most often an event for a request we took while looking or
             * in the final check (published as req_event was armed): the next request is then usually close
             * behind, so look a while (with spin_ns), as after work, then sleep again. Going back to the
             * caller for it cost the rig's inline ring a trip through trio per return (the ring then stays
             * there for a while): with the look off, 5 % of QD1 requests and 18 requests a return. */
            if (++spurious_in_a_row > XB_FREE_SPURIOUS)
                return XB_ENGINE_IDLE;
            woken = 0;
            int got = spin_for_work(e);
            if (got < 0)
                return -got;
            if (got) {
                e->spins++;
                continue;
            }
        }
        if (coarse_ns() >= until)
            return XB_ENGINE_MORE;
        struct pollfd fds[3] = {{e->wait_fd, POLLIN, 0}, {wake_fd, POLLIN, 0}, {-1, POLLIN, 0}};
        int waiting_io = e->held > 0 && e->completion_fd >= 0;
        if (waiting_io) {  /* enabled only while we sleep; then look once more (blkio(3)) */
            blkioq_set_completion_fd_enabled((struct blkioq *)e->q, true);
            fds[2].fd = e->completion_fd;
            uint32_t before = e->completed;
            rc = reap(e);
            push(e);
            if (rc || e->completed != before) {
                blkioq_set_completion_fd_enabled((struct blkioq *)e->q, false);
                if (rc)
                    return rc;
                continue;
            }
        }
        if (e->spin_ns && !adapting) {
            adapting = 1;
            slept_from = e->stamp;
            looked_ns = e->spin_cur_ns;
        }
        /* (idle_untimed: a call with nothing to report and nothing in the storage sleeps until something
         * happens; one that has, at most timeout_ms: the caller folds what it did, checks for a stall) */
        int quiet = !waiting_io && !e->taken_n && !e->completed && !e->spurious;
        if (e->block_wait && !waiting_io && wake_signo > 0) {
            int got = block_for_event(e, e->idle_untimed && quiet ? 0 : until, bs);
            if (got < 0)
                return XB_ENGINE_MORE;  /* woken by the caller, or the timeout */
            if (got > 0) {
                woken = 1;
                taken_at_wake = e->taken_n;
                continue;
            }
        }
        e->syscalls++;
        e->sleeps++;
        int r = poll(fds, 3, e->idle_untimed && quiet ? -1 : timeout_ms);
        if (waiting_io)
            blkioq_set_completion_fd_enabled((struct blkioq *)e->q, false);
        if (r <= 0 || (fds[1].revents & (POLLIN | POLLHUP | POLLERR)))
            return XB_ENGINE_MORE;  /* a timeout, a signal, or the caller is wanted */
        if (fds[0].revents & (POLLERR | POLLNVAL))
            return XB_ENGINE_MORE;
        if (fds[2].revents & POLLIN) {
            uint64_t count;
            e->syscalls++;
            if (read(e->completion_fd, &count, sizeof count) < 0 && errno != EAGAIN)
                return XB_ENGINE_MORE;
            rc = reap(e);
            push(e);
            if (rc)
                return rc;
        }
        woken = 0;
        if (fds[0].revents & POLLIN) {
            consume_event(e);
            woken = 1;
            taken_at_wake = e->taken_n;
        }
    }
}

int xb_engine_reap(struct xb_engine *e, uint32_t n)
{
    reset_outs(e);
    int rc = n ? complete(e, n) : 0;
    if (!rc && n >= e->max_completions)
        rc = reap(e);
    push(e);
    return rc;
}
