/* One request slot of the copy path's lane (lane_kernel.c, blkio_calls.c's xb_queue_lane): what a
 * plain direct READ/WRITE taken off the ring needs after its dispatch, kept in C so the copy path's
 * grant copies and the storage requests are made for a whole batch in one call. 104 bytes; the
 * same text is in native.h (the cdef), tests/test_copy_lane.py checks both compilers agree. */
#ifndef XK_LANE_SLOT_H
#define XK_LANE_SLOT_H
#include <stdint.h>
#define XK_LANE_MAX_SEGS 11u
/* The libblkio tag of a storage request xb_queue_lane made: the slot index with this bit. The lane's
 * completion walk (xk_lane_complete) takes only such completions, so no state in the table has to
 * say which slots are in the storage by the lane (a stale mark could outlive a park or a takeover). */
#define XK_LANE_TAG 0x10000u
struct xk_lane_slot {
    uint64_t sector;   /* 512-byte units */
    uint32_t nbytes;   /* the sectors its segments cover, in bytes */
    uint8_t nseg;      /* 1..11 when stashed; 0: nothing valid here */
    uint8_t op;        /* 0 READ, 1 WRITE */
    uint8_t pad[2];
    uint8_t segs[88];  /* nseg wire segments: u32 gref, u8 first_sect, u8 last_sect, 2 bytes */
};
#endif
