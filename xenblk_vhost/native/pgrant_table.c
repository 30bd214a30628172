/* A ring's persistently mapped grants and the grant copy's memcpy part (native.h: struct xk_pgrants).
 *
 * With feature-persistent a frontend reuses a fixed set of granted pages for all its I/O and revokes
 * none while connected (blkfront bounces its data through them), so the backend can map each one once
 * and copy to and from it itself: a memcpy in place of Xen's GNTTABOP_copy work and, when every segment
 * of a batch is mapped, no grant copy hypercall at all. A mapped grant cannot be revoked under us (Xen
 * refuses to end access to a granted page that is mapped), so the address stays valid until the owner
 * unmaps it, which it does only between engine calls, after taking it out of here. */
#include <stdint.h>
#include <string.h>

#include "native.h"

#define PG_PAGE 4096u
#define PG_SOURCE_GREF 1u  /* GNTCOPY_source_gref */
#define PG_DEST_GREF 2u    /* GNTCOPY_dest_gref */

static inline uint32_t pg_home(const struct xk_pgrants *t, uint32_t key)
{
    return (uint32_t)((uint64_t)(uint32_t)(key * 2654435769u) >> t->shift) & t->mask;  /* (Fibonacci hashing) */
}

static struct xk_pgrant_slot *pg_lookup(struct xk_pgrants *t, uint32_t gref)
{
    if (gref == UINT32_MAX || !t->mask)
        return NULL;
    uint32_t key = gref + 1;
    for (uint32_t i = pg_home(t, key), n = 0; n <= t->mask; i = (i + 1) & t->mask, n++) {
        struct xk_pgrant_slot *s = &t->slots[i];
        if (s->key == key)
            return s;
        if (!s->key)
            return NULL;
    }
    return NULL;
}

int xk_pg_need(struct xk_pgrants *t, const uint8_t *segs, uint32_t nseg, uint32_t stride)
{
    if (!t->open)
        return 0;
    int need = 0;
    for (uint32_t i = 0; i < nseg; i++) {
        uint32_t gref;
        memcpy(&gref, segs + (size_t)i * stride, 4);
        if (gref != UINT32_MAX && !pg_lookup(t, gref)) {
            need = 1;
            if (t->nmiss < t->miss_room)
                t->miss[t->nmiss++] = gref;
        }
    }
    return need;
}

uint64_t xk_pg_find(struct xk_pgrants *t, uint32_t gref)
{
    struct xk_pgrant_slot *s = pg_lookup(t, gref);
    if (!s)
        return 0;
    s->used = 1;
    return s->addr;
}

int xk_pg_put(struct xk_pgrants *t, uint32_t gref, uint64_t addr)
{
    struct xk_pgrant_slot *s = pg_lookup(t, gref);
    if (s) {
        s->addr = addr;
        return 0;
    }
    if (gref == UINT32_MAX || t->count >= t->max || t->count >= t->mask)  /* (one slot stays empty: lookups end) */
        return -1;
    uint32_t key = gref + 1;
    uint32_t i = pg_home(t, key);
    while (t->slots[i].key)
        i = (i + 1) & t->mask;
    t->slots[i].key = key;
    t->slots[i].used = 0;
    t->slots[i].addr = addr;
    t->count++;
    return 1;
}

int xk_pg_del(struct xk_pgrants *t, uint32_t gref)
{
    struct xk_pgrant_slot *s = pg_lookup(t, gref);
    if (!s)
        return 0;
    uint32_t hole = (uint32_t)(s - t->slots);
    /* backward shift: move up every entry of the run after the hole that may live at or before it */
    for (uint32_t j = (hole + 1) & t->mask; t->slots[j].key; j = (j + 1) & t->mask) {
        uint32_t home = pg_home(t, t->slots[j].key);
        /* j's entry may move to hole unless its home lies cyclically in (hole, j] */
        int stays = hole <= j ? (hole < home && home <= j) : (hole < home || home <= j);
        if (!stays) {
            t->slots[hole] = t->slots[j];
            hole = j;
        }
    }
    memset(&t->slots[hole], 0, sizeof t->slots[hole]);
    t->count--;
    return 1;
}

uint32_t xk_pg_take_used(struct xk_pgrants *t, uint32_t *out, uint32_t room)
{
    uint32_t n = 0;
    for (uint32_t i = 0; t->mask && i <= t->mask && n < room; i++) {
        struct xk_pgrant_slot *s = &t->slots[i];
        if (s->key && s->used) {
            s->used = 0;
            out[n++] = s->key - 1;
        }
    }
    return n;
}

uint32_t xk_pg_copy(struct xk_pgrants *t, struct xk_copy_seg *segs, uint32_t n, uint16_t domid,
                    struct xk_copy_seg *rest, uint32_t *idx)
{
    uint32_t m = 0;
    for (uint32_t i = 0; i < n; i++) {
        struct xk_copy_seg *g = &segs[i];
        uint32_t dir = g->flags & (PG_SOURCE_GREF | PG_DEST_GREF);
        const struct xk_copy_foreign *f = dir == PG_DEST_GREF ? &g->dest.foreign : &g->source.foreign;
        uint64_t page = 0;
        if ((dir == PG_DEST_GREF || dir == PG_SOURCE_GREF) && g->flags == dir && f->domid == domid && g->len
            && (uint32_t)f->offset + g->len <= PG_PAGE)
            page = xk_pg_find(t, f->ref);
        if (!page) {
            if (dir == PG_DEST_GREF || dir == PG_SOURCE_GREF) {
                if (t->nmiss < t->miss_room)
                    t->miss[t->nmiss++] = f->ref;
            }
            rest[m] = *g;
            idx[m++] = i;
            continue;
        }
        if (dir == PG_DEST_GREF)
            memcpy((void *)(uintptr_t)(page + f->offset), (const void *)(uintptr_t)g->source.virt, g->len);
        else
            memcpy((void *)(uintptr_t)g->dest.virt, (const void *)(uintptr_t)(page + f->offset), g->len);
        g->status = 0;
        t->hits++;
    }
    return m;
}
