/* The copy path's lane, compiled: the per-request packing of plain direct READ/WRITE requests'
 * grant copies, for a whole batch in one call (backend/datapath/copy_lane.py says when it is used;
 * CopyBatch.add_sector_ranges is the reference, tests/test_copy_lane.py compares them). Reads only
 * the private copy and the table it filled itself, never shared memory. */
#include <stdint.h>
#include <string.h>
#include "native.h"
#include "copy_seg.h"
#include "lane_entry.h"

#define XK_RW_KIND 0u
#define LANE_MAX_SEGS XK_LANE_INLINE_SEGS

uint32_t xk_lane_slot_size(void) { return (uint32_t)sizeof(struct xk_lane_slot); }

uint32_t xk_lane_tag(void) { return XK_LANE_TAG; }

int xk_lane_all_plain(const struct xk_req *recs, uint32_t count)
{
    for (uint32_t i = 0; i < count; i++) {
        const struct xk_req *r = &recs[i];
        if (r->kind != XK_RW_KIND || r->op > 1 || r->nseg == 0 || r->nseg > LANE_MAX_SEGS)
            return 0;
    }
    return 1;
}

/* Whether record r is one the lane takes: a direct READ or WRITE of 1..11 segments. */
static int plain_record(const struct xk_req *r)
{
    return r->kind == XK_RW_KIND && r->op <= 1 && r->nseg != 0 && r->nseg <= LANE_MAX_SEGS
           && r->nr <= (uint64_t)LANE_MAX_SEGS * SECTORS_PER_PAGE;
}

/* Entry t from record r (checked by plain_record) and its wire segments. */
static void stash_one(struct xk_lane_slot *t, const struct xk_req *r, const uint8_t *segs)
{
    t->sector = r->sector;
    t->nbytes = (uint32_t)(r->nr << 9);
    t->nseg = (uint16_t)r->nseg;
    t->op = r->op;
    memcpy(t->segs, segs, (size_t)r->nseg * 8);
}

int xk_lane_stash(struct xk_lane_slot *table, uint32_t nslots, const uint8_t *raw, uint32_t entry,
                  uint32_t seg_off, const struct xk_req *recs, uint32_t count, const int32_t *slot_of)
{
    int stashed = 0;
    for (uint32_t i = 0; i < count; i++) {
        int32_t s = slot_of[i];
        if (s < 0)
            continue;
        if ((uint32_t)s >= nslots || !plain_record(&recs[i]))
            return -1 - (int)i;
        stash_one(&table[s], &recs[i], raw + (uint64_t)i * entry + seg_off);
        table[s].held = XK_HELD_NO;  /* the ring worker fills its Slot too */
        stashed++;
    }
    return stashed;
}

int xk_lane_hold(struct xk_lane_slot *table, uint32_t nslots, const uint8_t *raw, uint32_t entry,
                 uint32_t seg_off, const struct xk_req *recs, uint32_t count, const uint16_t *slots,
                 int64_t first_ref, double taken_at, uint64_t *counts)
{
    for (uint32_t i = 0; i < count; i++) {  /* all or nothing: the caller fills the Slots instead */
        if (slots[i] >= nslots || table[slots[i]].held != XK_HELD_NO || !plain_record(&recs[i]))
            return -1 - (int)i;
    }
    memset(counts, 0, 4 * sizeof *counts);
    for (uint32_t i = 0; i < count; i++) {
        const struct xk_req *r = &recs[i];
        struct xk_lane_slot *t = &table[slots[i]];
        stash_one(t, r, raw + (uint64_t)i * entry + seg_off);
        t->id = r->id;
        t->jref = first_ref >= 0 ? first_ref + (int64_t)i : -1;
        t->taken_at = taken_at;
        t->held = XK_HELD_YES;
        counts[2 * r->op] += 1;  /* as _dispatch counts: rd_req, rd_sect, wr_req, wr_sect */
        counts[2 * r->op + 1] += r->nr;
    }
    return (int)count;
}

int xk_lane_hold_one(struct xk_lane_slot *table, uint32_t nslots, uint16_t slot, const struct xk_req *r,
                     uint64_t segs, uint64_t buf, uint32_t large, int64_t jref, double taken_at, uint64_t *counts)
{
    if (slot >= nslots || table[slot].held != XK_HELD_NO || r->kind != XK_RW_KIND || r->op > 1 || r->nseg == 0
        || r->nseg > XK_LANE_MAX_IND || r->nr > (uint64_t)r->nseg * SECTORS_PER_PAGE)
        return -1;
    struct xk_lane_slot *t = &table[slot];
    t->sector = r->sector;
    t->nbytes = (uint32_t)(r->nr << 9);
    t->nseg = (uint16_t)r->nseg;
    t->op = r->op;
    if (r->nseg <= XK_LANE_INLINE_SEGS) {  /* as a direct request: inline, in its small buffer */
        memcpy(t->segs, (const void *)(uintptr_t)segs, (size_t)r->nseg * 8);
    } else {
        struct xk_lane_ext x = {segs, buf, large, 0};
        memcpy(t->segs, &x, sizeof x);
    }
    t->id = r->id;
    t->jref = jref;
    t->taken_at = taken_at;
    t->held = XK_HELD_YES;
    counts[2 * r->op] += 1;
    counts[2 * r->op + 1] += r->nr;
    return 0;
}

/* Pack entry t's segments (its data at addr) into out, which has room for `room`; how many, or -1 if
 * one would be refused (or they do not fit). */
static int pack_slot(struct xk_copy_seg *out, const struct xk_lane_slot *t, int to_guest, uint16_t domid,
                     uint64_t addr, uint32_t room)
{
    if (!xk_entry_ok(t) || t->nseg > room)
        return -1;
    const uint8_t *segs = xk_entry_segs(t);
    for (uint32_t i = 0; i < t->nseg; i++) {
        const uint8_t *w = segs + 8 * i;
        uint32_t gref;
        memcpy(&gref, w, 4);  /* little-endian host, as the ring */
        uint32_t first = w[4], last = w[5];
        if (last >= SECTORS_PER_PAGE || first > last)
            return -1;
        addr += xk_fill_copy_seg(&out[i], gref, first, last, to_guest, domid, addr);
    }
    return (int)t->nseg;
}

int xk_lane_pack(struct xk_copy_seg *out, const struct xk_lane_slot *table, uint32_t nslots,
                 const uint16_t *idx, uint32_t n, int to_guest, uint16_t domid, uint64_t base, uint64_t stride)
{
    int packed = 0;
    for (uint32_t k = 0; k < n; k++) {
        uint32_t s = idx[k];
        /* (Python's lane.pack reserves 11 per slot: a bigger entry is never packed here) */
        if (s >= nslots || table[s].nseg > LANE_MAX_SEGS)
            return -1;
        int got = pack_slot(out + packed, &table[s], to_guest, domid, base + (uint64_t)s * stride,
                            LANE_MAX_SEGS * n - (uint32_t)packed);
        if (got < 0)
            return -1;
        packed += got;
    }
    return packed;
}

int xk_lane_pack_op(struct xk_copy_seg *out, const struct xk_lane_slot *table, uint32_t nslots,
                    const uint16_t *idx, uint32_t n, uint8_t op, int to_guest, uint16_t domid, uint64_t base,
                    uint64_t stride, uint16_t *owners, uint32_t room)
{
    int packed = 0;
    for (uint32_t k = 0; k < n; k++) {
        uint32_t s = idx[k];
        if (s >= nslots)
            return -1;
        if (table[s].op != op)
            continue;
        int got = pack_slot(out + packed, &table[s], to_guest, domid, xk_entry_buf(&table[s], base, stride, s),
                            room - (uint32_t)packed);
        if (got < 0)
            return -1;
        for (int i = 0; i < got; i++)
            owners[packed + i] = (uint16_t)s;
        packed += got;
    }
    return packed;
}

/* Whether completion c is a lane request's success whose entry can be trusted: queued by
 * xb_queue_lane (its tag), a stashed READ/WRITE of 1..11 segments (a READ's segments are checked by
 * pack_slot as it packs them). */
static int lane_success(const struct xk_completion *c, const struct xk_lane_slot *table, uint32_t nslots)
{
    uint64_t tag = c->user_data;
    if ((tag & ~(uint64_t)0xFFFF) != XK_LANE_TAG || (tag & 0xFFFF) >= nslots || c->ret < 0)
        return 0;
    return xk_entry_ok(&table[tag & 0xFFFF]);
}

int xk_lane_complete(struct xk_copy_seg *out, const struct xk_lane_slot *table, uint32_t nslots,
                     const struct xk_completion *comps, uint32_t n, uint16_t *ready, uint16_t *owners,
                     uint16_t domid, uint64_t base, uint64_t stride)
{
    for (uint32_t k = 0; k < n; k++) {  /* all or nothing: any other completion, the reference way */
        if (!lane_success(&comps[k], table, nslots))
            return -1;
        ready[k] = (uint16_t)(comps[k].user_data & 0xFFFF);
    }
    for (uint32_t k = 0; k < n; k++)  /* (not held: never more than 11 segments) */
        if (table[ready[k]].nseg > LANE_MAX_SEGS)
            return -1;
    return xk_lane_pack_op(out, table, nslots, ready, n, 0, 1, domid, base, stride, owners,
                           LANE_MAX_SEGS * n);  /* the reads back */
}

/* Put the entries marked walked by xk_lane_complete_held's first k completions back to held. */
static void unwalk(struct xk_lane_slot *table, const uint16_t *ready, uint32_t k)
{
    for (uint32_t i = 0; i < k; i++)
        table[ready[i]].held = XK_HELD_YES;
}

int xk_lane_complete_held(struct xk_copy_seg *out, struct xk_lane_slot *table, uint32_t nslots,
                          const struct xk_completion *comps, uint32_t n, uint16_t *ready, uint16_t *owners,
                          uint16_t domid, uint64_t base, uint64_t stride, uint32_t room)
{
    for (uint32_t k = 0; k < n; k++) {
        /* Held, and not yet walked: a second completion of one slot is refused (never answered twice). */
        if (!lane_success(&comps[k], table, nslots) || table[comps[k].user_data & 0xFFFF].held != XK_HELD_YES) {
            unwalk(table, ready, k);
            return -1;
        }
        ready[k] = (uint16_t)(comps[k].user_data & 0xFFFF);
        table[ready[k]].held = XK_HELD_WALKED;
    }
    int packed = xk_lane_pack_op(out, table, nslots, ready, n, 0, 1, domid, base, stride, owners, room);  /* reads back */
    if (packed < 0)
        unwalk(table, ready, n);
    return packed;
}

/* The latency bucket of elapsed: how many bounds lie below it (bisect_left, as observe() finds it). */
static uint32_t bucket_of(double elapsed, const double *bounds, uint32_t nbounds)
{
    uint32_t b = 0;
    while (b < nbounds && bounds[b] < elapsed)
        b++;
    return b;
}

int64_t xk_lane_answer_held(const struct xk_rsp_ring *r, uint32_t first_pos, struct xk_lane_slot *table,
                            uint32_t nslots, const uint16_t *ready, uint32_t n, double now, const double *bounds,
                            uint32_t nbounds, uint64_t *buckets, double *total, uint32_t *large, uint32_t *nlarge)
{
    for (uint32_t k = 0; k < n; k++)
        if (ready[k] >= nslots || table[ready[k]].held != XK_HELD_WALKED)
            return -1;
    memset(buckets, 0, ((size_t)nbounds + 1) * sizeof *buckets);
    int64_t mask = 0;
    double sum = 0.0;
    for (uint32_t k = 0; k < n; k++) {
        struct xk_lane_slot *t = &table[ready[k]];
        xk_ring_answer(r, first_pos + k, t->id, t->jref, t->op, 0);
        if (t->nseg > XK_LANE_INLINE_SEGS) {  /* its large buffer back to the data path's free stack */
            struct xk_lane_ext x;
            xk_entry_ext(t, &x);
            if (x.large != XK_LANE_NO_LARGE && large)
                large[(*nlarge)++] = x.large;
        }
        t->held = XK_HELD_NO;
        if (t->taken_at == 0.0)
            continue;  /* untimed (the ring engine's lat_every): answered and counted, not timed */
        double elapsed = now - t->taken_at;
        uint32_t b = bucket_of(elapsed, bounds, nbounds);
        buckets[b]++;
        mask |= (int64_t)1 << b;
        sum += elapsed;
    }
    *total = sum;
    return mask;
}

uint32_t xk_lane_held_slots(const struct xk_lane_slot *table, uint32_t nslots, uint16_t *out)
{
    uint32_t n = 0;
    for (uint32_t s = 0; s < nslots; s++)
        if (table[s].held != XK_HELD_NO)
            out[n++] = (uint16_t)s;
    return n;
}
