/*
 * The benchmark's compiled loops (built by build_loadgen.py, cffi API mode,
 * at install time). Python sets everything up (the simulated domain, its
 * grants, the ring, the libblkio instance); these loops only run the hot
 * path, so that what the benchmark measures is the backend, not Python
 * driving it.
 *
 *   lg_run    the guest: keeps `qd` I/Os in flight on each of its rings
 *             (one thread for all rings), as Linux blkfront drives a ring;
 *             measures completions and per-I/O latency.
 *   nr_run    a null responder: a backend that answers every request OKAY
 *             without any I/O or grant access; lg_run against it is the
 *             load generator's ceiling.
 *   raw_run   the raw libblkio baseline: the same workload straight on a
 *             libblkio queue (one thread per queue), no Xen in between.
 *
 * The ring protocol comes from Xen's public headers (xen/io/blkif.h and
 * ring.h, Debian libxen-dev), as a real frontend and backend use them.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

#include <blkio.h>

/* ring.h leaves its barriers to the includer. The peer is another process
 * on x86 (TSO): stores are not reordered with stores nor loads with loads,
 * so rmb/wmb only have to stop the compiler; mb (store then load) fences. */
#define mb() __sync_synchronize()
#define rmb() __asm__ __volatile__("" ::: "memory")
#define wmb() __asm__ __volatile__("" ::: "memory")
#include <xen/io/blkif.h>

#include "loadgen.h"

_Static_assert(sizeof(struct blkif_request) == LG_REQUEST_BYTES, "native blkif_request size");

static inline uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static inline uint64_t xorshift64(uint64_t *s)
{
    uint64_t x = *s;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return *s = x;
}

/* ------------------------------------------------------------ latency samples */

struct samples {
    uint32_t *ns; /* latency in ns, saturated at UINT32_MAX (4.29 s) */
    uint64_t n, cap;
};

static int samples_init(struct samples *s, uint64_t cap)
{
    s->n = 0;
    s->cap = cap;
    s->ns = cap ? malloc(cap * sizeof(uint32_t)) : NULL;
    return cap && !s->ns ? -ENOMEM : 0;
}

static inline void samples_add(struct samples *s, uint64_t ns)
{
    if (s->n < s->cap)
        s->ns[s->n++] = ns > UINT32_MAX ? UINT32_MAX : (uint32_t)ns;
}

static int cmp_u32(const void *a, const void *b)
{
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return (x > y) - (x < y);
}

/* p50, p99 and mean of the samples into out (us); frees the samples. */
static void samples_finish(struct samples *s, struct lg_result *out)
{
    out->latency_samples = s->n;
    if (s->n) {
        double sum = 0;
        qsort(s->ns, s->n, sizeof(uint32_t), cmp_u32);
        for (uint64_t i = 0; i < s->n; i++)
            sum += s->ns[i];
        out->p50_us = s->ns[(s->n - 1) / 2] / 1e3;
        out->p99_us = s->ns[(s->n - 1) * 99 / 100] / 1e3;
        out->mean_us = sum / s->n / 1e3;
    }
    free(s->ns);
    s->ns = NULL;
}

/* ------------------------------------------------------------ offsets */

/* The next request's start, in units of the request size, within the span. */
static inline uint64_t next_unit(const struct lg_workload *w, uint64_t *cursor, uint64_t *rng)
{
    if (w->random)
        return xorshift64(rng) % w->span_units;
    uint64_t u = *cursor;
    *cursor = u + 1 == w->span_units ? 0 : u + 1;
    return u;
}

/* ------------------------------------------------------------ the measured window */

/* Warm-up, then `seconds` measured: what completed between the first clock
 * reading past the warm-up and the first past the end, over that time. */
struct window {
    uint64_t from, to, length, done_at_from;
    int measuring, stopping;
};

static void window_start(struct window *win, const struct lg_workload *w, uint64_t t)
{
    win->length = (uint64_t)(w->seconds * 1e9);
    win->from = t + (uint64_t)(w->warmup_s * 1e9);
    win->to = win->from + win->length;
    win->done_at_from = 0;
    win->measuring = win->stopping = 0;
}

/* At time t with `done` completions so far; fills out's count and time once the window closes. */
static inline void window_update(struct window *win, uint64_t t, uint64_t done, struct lg_result *out)
{
    if (!win->measuring && t >= win->from) {
        win->measuring = 1;
        win->done_at_from = done;
        win->from = t;
        /* The window is `seconds` long from its first reading, even when the process was descheduled
         * past its planned end (a loaded machine): else it would close at once, empty, and a rate
         * computed over it would divide by zero. */
        win->to = t + win->length;
    }
    if (!win->stopping && t >= win->to) {
        win->stopping = 1;
        out->completed = done - win->done_at_from;
        out->seconds = (t - win->from) / 1e9;
    }
}

/* Latencies count only inside the window. */
static inline int window_open(const struct window *win)
{
    return win->measuring && !win->stopping;
}

/* ------------------------------------------------------------ event channels */

static inline void kick(int fd)
{
    uint64_t one = 1;
    /* EAGAIN: the counter is saturated, the peer has an event pending already */
    if (write(fd, &one, sizeof one) < 0 && errno != EAGAIN) {
        /* nothing better to do: the peer is gone and the run will time out */
    }
}

static inline void clear_event(int fd)
{
    uint64_t v;
    if (read(fd, &v, sizeof v) < 0) {
        /* EAGAIN: someone else consumed it, nothing pending */
    }
}

/* ------------------------------------------------------------ the guest (lg_run) */

/* An I/O of the workload is `parts` requests (ids io * parts + k): a
 * frontend splits what the backend's segment limit does not let through in
 * one request, as blkfront does. It completes with its last response. */
struct front {
    struct blkif_front_ring fr;
    const struct lg_ring *cfg;
    uint16_t *free_ios; /* stack of I/Os not in flight */
    unsigned nfree;
    uint64_t *submitted_at; /* per I/O, ns */
    uint16_t *parts_left; /* per I/O */
    uint64_t cursor;
};

int lg_run(const struct lg_workload *w, const struct lg_ring *rings, unsigned nrings, struct lg_result *out)
{
    struct front *fronts = calloc(nrings, sizeof *fronts);
    struct pollfd *pfds = calloc(nrings, sizeof *pfds);
    struct samples lat;
    const unsigned parts = w->parts, part_sectors = parts ? w->unit_sectors / parts : 0;
    uint64_t rng = w->seed | 1, t, done = 0;
    struct window win;
    int rc = 0;
    unsigned r;

    memset(out, 0, sizeof *out);
    lat.ns = NULL;
    if (!fronts || !pfds || samples_init(&lat, w->max_latency_samples)) {
        rc = -ENOMEM;
        goto out;
    }
    for (r = 0; r < nrings; r++) {
        struct front *f = &fronts[r];
        f->cfg = &rings[r];
        FRONT_RING_INIT(&f->fr, (struct blkif_sring *)rings[r].sring, rings[r].ring_bytes);
        if (!parts || w->unit_sectors % parts || (uint64_t)w->qd * parts > RING_SIZE(&f->fr)) {
            rc = -EINVAL;
            goto out;
        }
        f->free_ios = calloc(w->qd, sizeof(uint16_t));
        f->submitted_at = calloc(w->qd, sizeof(uint64_t));
        f->parts_left = calloc(w->qd, sizeof(uint16_t));
        if (!f->free_ios || !f->submitted_at || !f->parts_left) {
            rc = -ENOMEM;
            goto out;
        }
        for (unsigned i = 0; i < w->qd; i++)
            f->free_ios[i] = (uint16_t)(w->qd - 1 - i);
        f->nfree = w->qd;
        f->cursor = (w->span_units / nrings) * r; /* sequential streams start apart */
        pfds[r].fd = rings[r].wait_fd;
        pfds[r].events = POLLIN;
    }

    window_start(&win, w, now_ns());
    for (;;) {
        int progress = 0, inflight = 0;
        window_update(&win, now_ns(), done, out);
        for (r = 0; r < nrings; r++) {
            struct front *f = &fronts[r];
            RING_IDX rp = f->fr.sring->rsp_prod, i;
            int notify;
            rmb(); /* the responses before the index that publishes them */
            t = now_ns(); /* (after reading rsp_prod: no latency comes out short) */
            for (i = f->fr.rsp_cons; i != rp; i++) {
                struct blkif_response *rsp = RING_GET_RESPONSE(&f->fr, i);
                uint64_t id = rsp->id, io = id / parts;
                int16_t status = rsp->status;
                if (io >= w->qd || !f->parts_left[io]) {
                    out->bad_responses++;
                    continue;
                }
                if (status != BLKIF_RSP_OKAY)
                    out->errors++;
                if (--f->parts_left[io])
                    continue;
                if (window_open(&win))
                    samples_add(&lat, t - f->submitted_at[io]);
                f->free_ios[f->nfree++] = (uint16_t)io;
                done++;
            }
            if (f->fr.rsp_cons != rp)
                progress = 1;
            f->fr.rsp_cons = rp;
            if (!win.stopping) {
                while (f->nfree && RING_FREE_REQUESTS(&f->fr) >= parts) {
                    uint16_t io = f->free_ios[--f->nfree];
                    uint64_t sector = next_unit(w, &f->cursor, &rng) * w->unit_sectors;
                    for (unsigned k = 0; k < parts; k++, sector += part_sectors) {
                        size_t id = (size_t)io * parts + k;
                        struct blkif_request *req = RING_GET_REQUEST(&f->fr, f->fr.req_prod_pvt);
                        memcpy(req, f->cfg->templates + id * LG_REQUEST_BYTES, LG_REQUEST_BYTES);
                        if (req->operation == BLKIF_OP_INDIRECT)
                            ((struct blkif_request_indirect *)req)->sector_number = sector;
                        else
                            req->sector_number = sector;
                        f->fr.req_prod_pvt++;
                    }
                    f->submitted_at[io] = t;
                    f->parts_left[io] = (uint16_t)parts;
                    progress = 1;
                }
                RING_PUSH_REQUESTS_AND_CHECK_NOTIFY(&f->fr, notify);
                if (notify) {
                    kick(f->cfg->kick_fd);
                    out->notifies++;
                }
            }
            inflight += w->qd - f->nfree;
        }
        if (win.stopping && !inflight)
            break;
        if (progress)
            continue;
        /* Nothing to do: ask for an event at the next response, check once
         * more (RING_FINAL_CHECK_FOR_RESPONSES), then sleep on the channels. */
        int more = 0;
        for (r = 0; r < nrings; r++) {
            int work;
            RING_FINAL_CHECK_FOR_RESPONSES(&fronts[r].fr, work);
            more |= work;
        }
        if (more)
            continue;
        int n = poll(pfds, nrings, 10000);
        if (n == 0) {
            rc = -ETIMEDOUT; /* the backend stopped answering: give up, say so */
            break;
        }
        if (n < 0 && errno != EINTR) {
            rc = -errno;
            break;
        }
        out->waits++;
        for (r = 0; r < nrings; r++)
            if (pfds[r].revents & POLLIN)
                clear_event(pfds[r].fd);
    }
    if (win.measuring && !win.stopping) { /* left early: what there is */
        win.to = 0;
        window_update(&win, now_ns(), done, out);
    }
    out->total = done;
    samples_finish(&lat, out);
out:
    if (fronts)
        for (r = 0; r < nrings; r++) {
            free(fronts[r].free_ios);
            free(fronts[r].submitted_at);
            free(fronts[r].parts_left);
        }
    free(fronts);
    free(pfds);
    free(lat.ns);
    return rc;
}

/* ------------------------------------------------------------ the null responder (nr_run) */

int nr_run(const struct lg_ring *rings, unsigned nrings, int stop_fd, struct nr_result *out)
{
    struct blkif_back_ring *brs = calloc(nrings, sizeof *brs);
    struct pollfd *pfds = calloc(nrings + 1, sizeof *pfds);
    unsigned r;
    int rc = 0;

    memset(out, 0, sizeof *out);
    if (!brs || !pfds) {
        rc = -ENOMEM;
        goto out;
    }
    for (r = 0; r < nrings; r++) {
        BACK_RING_INIT(&brs[r], (struct blkif_sring *)rings[r].sring, rings[r].ring_bytes);
        pfds[r].fd = rings[r].wait_fd;
        pfds[r].events = POLLIN;
    }
    pfds[nrings].fd = stop_fd;
    pfds[nrings].events = POLLIN;
    for (;;) {
        int progress = 0;
        for (r = 0; r < nrings; r++) {
            struct blkif_back_ring *br = &brs[r];
            RING_IDX rp = br->sring->req_prod, rc_;
            int notify;
            rmb();
            if (RING_REQUEST_PROD_OVERFLOW(br, rp)) {
                rc = -EPROTO; /* a bogus producer index: our own generator is broken */
                goto out;
            }
            for (rc_ = br->req_cons; rc_ != rp; rc_++) {
                struct blkif_request *req = RING_GET_REQUEST(br, rc_);
                /* one read of each field we use */
                uint8_t op = *(volatile uint8_t *)&req->operation;
                uint64_t id = *(volatile uint64_t *)&req->id;
                if (op == BLKIF_OP_INDIRECT)
                    op = *(volatile uint8_t *)&((struct blkif_request_indirect *)req)->indirect_op;
                struct blkif_response *rsp = RING_GET_RESPONSE(br, br->rsp_prod_pvt);
                rsp->id = id;
                rsp->operation = op;
                rsp->status = BLKIF_RSP_OKAY;
                br->rsp_prod_pvt++;
                out->served++;
            }
            if (br->req_cons != rp)
                progress = 1;
            br->req_cons = rp;
            RING_PUSH_RESPONSES_AND_CHECK_NOTIFY(br, notify);
            if (notify) {
                kick(rings[r].kick_fd);
                out->notifies++;
            }
        }
        if (progress)
            continue;
        int more = 0;
        for (r = 0; r < nrings; r++) {
            int work;
            RING_FINAL_CHECK_FOR_REQUESTS(&brs[r], work);
            more |= work;
        }
        if (more)
            continue;
        int n = poll(pfds, nrings + 1, -1);
        if (n < 0 && errno != EINTR) {
            rc = -errno;
            break;
        }
        if (pfds[nrings].revents)
            break; /* told to stop */
        out->waits++;
        for (r = 0; r < nrings; r++)
            if (pfds[r].revents & POLLIN)
                clear_event(pfds[r].fd);
    }
out:
    free(brs);
    free(pfds);
    return rc;
}

/* ------------------------------------------------------------ raw libblkio (raw_run) */

struct raw_thread {
    const struct lg_workload *w;
    const struct raw_queue *q;
    unsigned index, nqueues;
    struct samples lat;
    struct lg_result res;
    int rc;
};

static void *raw_thread_main(void *arg)
{
    struct raw_thread *th = arg;
    const struct lg_workload *w = th->w;
    struct blkioq *q = (struct blkioq *)th->q->q;
    uint32_t bytes = w->unit_sectors * 512u;
    struct blkio_completion *comps = calloc(w->qd, sizeof *comps);
    uint64_t *submitted_at = calloc(w->qd, sizeof(uint64_t));
    uint64_t rng = (w->seed + 0x9e3779b97f4a7c15ull * (th->index + 1)) | 1;
    uint64_t cursor = (w->span_units / th->nqueues) * th->index;
    uint64_t t, done = 0;
    unsigned inflight = 0;
    struct window win;

    if (!comps || !submitted_at) {
        th->rc = -ENOMEM;
        goto out;
    }
    t = now_ns();
    window_start(&win, w, t);
#define RAW_SUBMIT(id_)                                                                         \
    do {                                                                                        \
        uint64_t off_ = next_unit(w, &cursor, &rng) * bytes;                                    \
        char *buf_ = th->q->buffers + (size_t)(id_) * bytes;                                    \
        submitted_at[id_] = t;                                                                  \
        if (w->write)                                                                           \
            blkioq_write(q, off_, buf_, bytes, (void *)(uintptr_t)(id_), 0);                    \
        else                                                                                    \
            blkioq_read(q, off_, buf_, bytes, (void *)(uintptr_t)(id_), 0);                     \
        inflight++;                                                                             \
    } while (0)
    for (unsigned i = 0; i < w->qd; i++)
        RAW_SUBMIT(i);
    while (inflight) {
        int n = blkioq_do_io(q, comps, 1, (int)inflight, NULL);
        if (n < 0) {
            th->rc = n;
            break;
        }
        t = now_ns();
        window_update(&win, t, done, &th->res);
        for (int i = 0; i < n; i++) {
            uintptr_t id = (uintptr_t)comps[i].user_data;
            inflight--;
            done++;
            if (comps[i].ret < 0)
                th->res.errors++;
            if (window_open(&win))
                samples_add(&th->lat, t - submitted_at[id]);
            if (!win.stopping)
                RAW_SUBMIT(id);
        }
    }
#undef RAW_SUBMIT
    th->res.total = done;
out:
    free(comps);
    free(submitted_at);
    return NULL;
}

int raw_run(const struct lg_workload *w, const struct raw_queue *queues, unsigned nqueues, struct lg_result *out)
{
    struct raw_thread *th = calloc(nqueues, sizeof *th);
    pthread_t *tids = calloc(nqueues, sizeof *tids);
    struct samples all;
    unsigned i, started = 0;
    int rc = 0;

    memset(out, 0, sizeof *out);
    all.ns = NULL;
    if (!th || !tids || samples_init(&all, w->max_latency_samples)) {
        rc = -ENOMEM;
        goto out;
    }
    for (i = 0; i < nqueues; i++) {
        th[i].w = w;
        th[i].q = &queues[i];
        th[i].index = i;
        th[i].nqueues = nqueues;
        if (samples_init(&th[i].lat, w->max_latency_samples / nqueues)) {
            rc = -ENOMEM;
            goto join;
        }
    }
    for (i = 0; i < nqueues; i++) {
        if (pthread_create(&tids[i], NULL, raw_thread_main, &th[i])) {
            rc = -EAGAIN;
            break;
        }
        started++;
    }
join:
    for (i = 0; i < started; i++)
        pthread_join(tids[i], NULL);
    for (i = 0; i < nqueues && th; i++) {
        if (th[i].rc && !rc)
            rc = th[i].rc;
        out->completed += th[i].res.completed;
        out->total += th[i].res.total;
        out->errors += th[i].res.errors;
        if (th[i].res.seconds > out->seconds)
            out->seconds = th[i].res.seconds;
        for (uint64_t k = 0; k < th[i].lat.n; k++)
            samples_add(&all, th[i].lat.ns[k]);
        free(th[i].lat.ns);
    }
    samples_finish(&all, out);
out:
    free(th);
    free(tids);
    free(all.ns);
    return rc;
}
