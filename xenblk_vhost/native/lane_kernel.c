/* The copy path's lane, compiled: the per-request packing of plain direct READ/WRITE requests'
 * grant copies, for a whole batch in one call (backend/datapath/copy_lane.py says when it is used;
 * CopyBatch.add_sector_ranges is the reference, tests/test_copy_lane.py compares them). Reads only
 * the private copy and the table it filled itself, never shared memory. */
#include <stdint.h>
#include <string.h>
#include "native.h"
#include "copy_seg.h"

#define XK_RW_KIND 0u
#define LANE_MAX_SEGS 11u
#define XK_LANE_TAG 0x10000u  /* lane_slot.h's (native.h has the struct, not the header): CopyLane checks */

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

int xk_lane_stash(struct xk_lane_slot *table, uint32_t nslots, const uint8_t *raw, uint32_t entry,
                  uint32_t seg_off, const struct xk_req *recs, uint32_t count, const int32_t *slot_of)
{
    int stashed = 0;
    for (uint32_t i = 0; i < count; i++) {
        int32_t s = slot_of[i];
        if (s < 0)
            continue;
        const struct xk_req *r = &recs[i];
        if ((uint32_t)s >= nslots || r->kind != XK_RW_KIND || r->op > 1 || r->nseg == 0 || r->nseg > LANE_MAX_SEGS
            || r->nr > (uint64_t)LANE_MAX_SEGS * SECTORS_PER_PAGE)
            return -1 - (int)i;
        struct xk_lane_slot *t = &table[s];
        t->sector = r->sector;
        t->nbytes = (uint32_t)(r->nr << 9);
        t->nseg = (uint8_t)r->nseg;
        t->op = r->op;
        memcpy(t->segs, raw + (uint64_t)i * entry + seg_off, (size_t)r->nseg * 8);
        stashed++;
    }
    return stashed;
}

/* Pack entry t's segments (its data at addr) into out; how many, or -1 if one would be refused. */
static int pack_slot(struct xk_copy_seg *out, const struct xk_lane_slot *t, int to_guest, uint16_t domid,
                     uint64_t addr)
{
    if (t->nseg == 0 || t->nseg > LANE_MAX_SEGS)
        return -1;
    for (uint32_t i = 0; i < t->nseg; i++) {
        const uint8_t *w = t->segs + 8 * i;
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
        if (s >= nslots)
            return -1;
        int got = pack_slot(out + packed, &table[s], to_guest, domid, base + (uint64_t)s * stride);
        if (got < 0)
            return -1;
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
    const struct xk_lane_slot *t = &table[tag & 0xFFFF];
    return t->nseg != 0 && t->nseg <= LANE_MAX_SEGS && t->op <= 1;
}

int xk_lane_complete(struct xk_copy_seg *out, const struct xk_lane_slot *table, uint32_t nslots,
                     const struct xk_completion *comps, uint32_t n, uint16_t *ready, uint16_t *owners,
                     uint16_t domid, uint64_t base, uint64_t stride)
{
    for (uint32_t k = 0; k < n; k++) {  /* all or nothing: any other completion, the reference way */
        if (!lane_success(&comps[k], table, nslots))
            return -1;
    }
    int packed = 0;
    for (uint32_t k = 0; k < n; k++) {
        uint32_t s = (uint32_t)(comps[k].user_data & 0xFFFF);
        ready[k] = (uint16_t)s;
        if (table[s].op != 0)
            continue;  /* a WRITE: nothing to copy back */
        int got = pack_slot(out + packed, &table[s], 1, domid, base + (uint64_t)s * stride);
        if (got < 0)
            return -1;
        for (int i = 0; i < got; i++)
            owners[packed + i] = (uint16_t)s;
        packed += got;
    }
    return packed;
}
