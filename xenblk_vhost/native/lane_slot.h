/* One request slot of the copy path's lane (lane_kernel.c, blkio_calls.c's xb_queue_lane): what a
 * plain direct READ/WRITE taken off the ring needs after its dispatch, kept in C so the copy path's
 * grant copies and the storage requests are made for a whole batch in one call. 104 bytes; the
 * same text is in native.h (the cdef), tests/test_copy_lane.py checks both compilers agree. */
#ifndef XK_LANE_SLOT_H
#define XK_LANE_SLOT_H
#include <stdint.h>
#define XK_LANE_MAX_SEGS 11u
struct xk_lane_slot {
    uint64_t sector;   /* 512-byte units */
    uint32_t nbytes;   /* the sectors its segments cover, in bytes */
    uint8_t nseg;      /* 1..11 when stashed; 0: nothing valid here */
    uint8_t op;        /* 0 READ, 1 WRITE */
    uint8_t pad[2];
    uint8_t segs[88];  /* nseg wire segments: u32 gref, u8 first_sect, u8 last_sect, 2 bytes */
};
#endif
