/* The lane's constants, and where a lane entry's segments and data are (struct xk_lane_slot: lane_slot.h,
 * native.h): the one place lane_kernel.c, ring_engine.c and blkio_calls.c take them from. Include it after
 * the struct's definition (native.h, or lane_slot.h, which includes it).
 *
 * An entry of 1..11 segments keeps them inline and its data in its slot's small buffer (base + slot *
 * stride): every request the Python-driven lane stashes, and the ring engine's plain ones (an indirect
 * request of 11 segments or fewer is held the same way: the same storage request, the same copies).
 * A bigger one exists only while the ring engine holds it (held != XK_HELD_NO): an indirect request of
 * up to XK_LANE_MAX_IND segments, whose segments (the private copy of its indirect pages, validated) lie
 * in the lane's side table and whose data lies in a buffer of its own (a large one, or its small one when
 * its segments cover no more); segs[] then holds a struct xk_lane_ext saying where. An entry that is not
 * held is never trusted with more than 11 segments: its pointers may be stale. */
#ifndef XK_LANE_ENTRY_H
#define XK_LANE_ENTRY_H
#include <stdint.h>
#include <string.h>

#define XK_LANE_INLINE_SEGS 11u
/* The libblkio tag of a storage request xb_queue_lane made: the slot index with this bit. The lane's
 * completion walk (xk_lane_complete) takes only such completions, so no state in the table has to
 * say which slots are in the storage by the lane (a stale mark could outlive a park or a takeover). */
#define XK_LANE_TAG 0x10000u
/* held: XK_HELD_NO (its Slot has the request: filled by Python), XK_HELD_YES (only this entry has it),
 * XK_HELD_WALKED (and its completion was taken by xk_lane_complete_held: to be answered). */
#define XK_HELD_NO 0u
#define XK_HELD_YES 1u
#define XK_HELD_WALKED 2u
#define XK_LANE_MAX_IND 4096u   /* blkif's limit on an indirect request's segments */
#define XK_LANE_NO_LARGE 0xFFFFFFFFu

struct xk_lane_ext {
    uint64_t segs;      /* address of its nseg wire segments (the side table) */
    uint64_t buf;       /* address of its data */
    uint32_t large;     /* its large buffer's offset in the data path's region, XK_LANE_NO_LARGE: none */
    uint32_t pad;
};

static inline void xk_entry_ext(const struct xk_lane_slot *t, struct xk_lane_ext *x)
{
    memcpy(x, t->segs, sizeof *x);
}

/* Whether entry t may be trusted: a READ/WRITE of 1..11 inline segments, or a held one of more. */
static inline int xk_entry_ok(const struct xk_lane_slot *t)
{
    return t->nseg != 0 && t->op <= 1
           && (t->nseg <= XK_LANE_INLINE_SEGS || (t->held != XK_HELD_NO && t->nseg <= XK_LANE_MAX_IND));
}

/* Entry t's wire segments (t checked by xk_entry_ok). */
static inline const uint8_t *xk_entry_segs(const struct xk_lane_slot *t)
{
    if (t->nseg <= XK_LANE_INLINE_SEGS)
        return t->segs;
    struct xk_lane_ext x;
    xk_entry_ext(t, &x);
    return (const uint8_t *)(uintptr_t)x.segs;
}

/* Entry t's data address: slot s's small buffer, or where its xk_lane_ext says. */
static inline uint64_t xk_entry_buf(const struct xk_lane_slot *t, uint64_t base, uint64_t stride, uint32_t s)
{
    if (t->nseg <= XK_LANE_INLINE_SEGS)
        return base + (uint64_t)s * stride;
    struct xk_lane_ext x;
    xk_entry_ext(t, &x);
    return x.buf;
}
#endif
