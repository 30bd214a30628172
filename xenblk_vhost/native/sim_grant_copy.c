/* The simulated hypervisor's grant copy, compiled: the same decisions as
 * xenblk_vhost/sim/grant_table.py SharedGrantTable.check_for_copy and
 * sim/gntdev.py's copy loop (tests/test_native.py runs both on the same
 * random and hostile tables and compares every status and byte).
 *
 * It runs in the backend's process where real Xen would do the work in a
 * hypercall; in Python it cost ~1.3 us per 4 KiB segment, most of the
 * simulator's share of the benchmark's backend CPU.
 *
 * The grant table is guest memory: each entry is read once (one 32-bit
 * load of flags+domid, one of the frame), then only the copies are used. */
#include <stdint.h>
#include <string.h>
#include "native.h"

#define PAGE_SIZE 4096u
#define GNTCOPY_SOURCE_GREF 1u
#define GNTCOPY_DEST_GREF 2u
#define GTF_type_mask 3u
#define GTF_permit_access 1u
#define GTF_readonly 4u

#define GNTST_okay 0
#define GNTST_general_error (-1)
#define GNTST_bad_domain (-2)
#define GNTST_bad_gntref (-3)
#define GNTST_bad_page (-9)
#define GNTST_bad_copy_arg (-10)

static inline uint32_t load32(const uint8_t *p)
{
    return __atomic_load_n((const uint32_t *)p, __ATOMIC_RELAXED);
}

/* (status, frame) of one copy access to grant `ref`, as acquire_grant_for_copy checks it. */
static int check_for_copy(uint32_t ref, uint16_t ldomid, int write, const uint8_t *table,
                          uint32_t nr_entries, const uint32_t *active, uint32_t *frame)
{
    if (ref >= nr_entries)
        return GNTST_bad_gntref;
    uint32_t combo = load32(table + (uint64_t)ref * 8);
    uint32_t entry_frame = load32(table + (uint64_t)ref * 8 + 4);
    uint32_t flags = combo & 0xffffu, domid = combo >> 16;
    uint32_t pins = __atomic_load_n(&active[(uint64_t)ref * 2], __ATOMIC_RELAXED);
    if ((flags & GTF_type_mask) == GTF_permit_access && domid == ldomid) {
        if (write && (flags & GTF_readonly) && !(pins >> 16))
            return GNTST_general_error;
        *frame = entry_frame;
        return GNTST_okay;
    }
    /* Xen checks type and domid only of an entry not already pinned. */
    if (!pins)
        return GNTST_general_error;
    if (write && !(pins >> 16) && (flags & GTF_readonly))
        return GNTST_general_error;
    *frame = __atomic_load_n(&active[(uint64_t)ref * 2 + 1], __ATOMIC_RELAXED);
    return GNTST_okay;
}

int xk_sim_grant_copy(struct xk_copy_seg *segs, int start, int n, uint16_t domid, uint16_t ldomid,
                      const uint8_t *grant_table, uint32_t nr_entries, const uint32_t *active,
                      uint8_t *memory, uint32_t pages)
{
    for (int i = start; i < n; i++) {
        struct xk_copy_seg *s = &segs[i];
        uint16_t flags = s->flags;
        int to_guest;
        const struct xk_copy_foreign *f;
        uint64_t local;
        if (flags == GNTCOPY_DEST_GREF) {
            to_guest = 1;
            f = &s->dest.foreign;
            local = s->source.virt;
        } else if (flags == GNTCOPY_SOURCE_GREF) {
            to_guest = 0;
            f = &s->source.foreign;
            local = s->dest.virt;
        } else {
            s->status = GNTST_bad_copy_arg;  /* grant to grant, or local to local: not ours */
            continue;
        }
        if (f->domid != domid)
            return i;
        uint32_t off = f->offset, len = s->len;
        if (off + len > PAGE_SIZE) {
            s->status = GNTST_bad_copy_arg;
            continue;
        }
        if (memory == NULL) {
            s->status = GNTST_bad_domain;
            continue;
        }
        if (!len) {
            s->status = GNTST_okay;
            continue;
        }
        uint32_t frame = 0;
        int st = check_for_copy(f->ref, ldomid, to_guest, grant_table, nr_entries, active, &frame);
        if (st) {
            s->status = (int16_t)st;
            continue;
        }
        if (frame >= pages) {
            s->status = GNTST_bad_page;
            continue;
        }
        uint8_t *guest = memory + (uint64_t)frame * PAGE_SIZE + off;
        if (to_guest)
            memmove(guest, (void *)(uintptr_t)local, len);
        else
            memmove((void *)(uintptr_t)local, guest, len);
        s->status = GNTST_okay;
    }
    return n;
}
