/* One request slot of the copy path's lane (lane_kernel.c, blkio_calls.c's xb_queue_lane): what a
 * plain direct READ/WRITE taken off the ring needs after its dispatch, kept in C so the copy path's
 * grant copies and the storage requests are made for a whole batch in one call; a request held
 * (xk_lane_hold: a whole plain batch, copy_lane.py) also keeps here what its answer needs, so that
 * no Python slot is filled for it. 128 bytes; the same text is in native.h (the cdef),
 * tests/test_copy_lane.py checks both compilers agree. */
#ifndef XK_LANE_SLOT_H
#define XK_LANE_SLOT_H
#include <stdint.h>
struct xk_lane_slot {
    uint64_t sector;   /* 512-byte units */
    uint32_t nbytes;   /* the sectors its segments cover, in bytes */
    uint16_t nseg;     /* 1..11 when stashed; 12..XK_LANE_MAX_IND held only (lane_entry.h); 0: nothing valid */
    uint8_t op;        /* 0 READ, 1 WRITE */
    uint8_t held;      /* XK_HELD_*: whether the fields below are the request's (and its Slot stale) */
    uint8_t segs[88];  /* nseg <= 11: the wire segments (u32 gref, u8 first_sect, u8 last_sect, 2 bytes);
                        * more (an indirect request the ring engine holds): struct xk_lane_ext (lane_entry.h) */
    uint64_t id;       /* held only: the request's id, */
    int64_t jref;      /* its journal ref (-1: no journal), */
    double taken_at;   /* the clock read of the batch that took it (the latency histogram's start) */
};
/* (the lane's constants, and where an entry's segments and data are) */
#include "lane_entry.h"
#endif
