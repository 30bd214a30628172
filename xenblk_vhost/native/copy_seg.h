/* One IOCTL_GNTDEV_GRANT_COPY segment from one blkif segment (gref, first_sect..last_sect, already
 * checked by the caller: last < 8, first <= last) whose data lies at addr in our memory: to the
 * guest (the data is ours, the grant the destination) or from it. Returns the bytes it covers, so
 * the caller advances addr by them. Shared by pack_segments.c and lane_kernel.c: one place says how
 * a grant copy is filled in. Not in native.h: cffi's cdef takes declarations, not inline bodies.
 * Include it after native.h (struct xk_copy_seg; native.h has no guard: it is the cdef too). */
#ifndef XK_COPY_SEG_H
#define XK_COPY_SEG_H
#include <stdint.h>
#include <string.h>

#define GNTCOPY_SOURCE_GREF 1u
#define GNTCOPY_DEST_GREF 2u
#define SECTORS_PER_PAGE 8u

static inline uint16_t xk_fill_copy_seg(struct xk_copy_seg *s, uint32_t gref, uint32_t first, uint32_t last,
                                        int to_guest, uint16_t domid, uint64_t addr)
{
    memset(s, 0, sizeof(*s));
    struct xk_copy_foreign *f = to_guest ? &s->dest.foreign : &s->source.foreign;
    f->ref = gref;
    f->offset = (uint16_t)(first << 9);
    f->domid = domid;
    if (to_guest)
        s->source.virt = addr;
    else
        s->dest.virt = addr;
    s->len = (uint16_t)((last - first + 1) << 9);
    s->flags = to_guest ? GNTCOPY_DEST_GREF : GNTCOPY_SOURCE_GREF;
    return s->len;
}
#endif
