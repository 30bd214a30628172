/* One request slot of the copy path's lane (lane_kernel.c, blkio_calls.c's xb_queue_lane): what a
 * plain direct READ/WRITE taken off the ring needs after its dispatch, kept in C so the copy path's
 * grant copies and the storage requests are made for a whole batch in one call; a request held
 * (xk_lane_hold: a whole plain batch, copy_lane.py) also keeps here what its answer needs, so that
 * no Python slot is filled for it. 128 bytes; the same text is in native.h (the cdef),
 * tests/test_copy_lane.py checks both compilers agree. */
#ifndef XK_LANE_SLOT_H
#define XK_LANE_SLOT_H
#include <stdint.h>
#define XK_LANE_MAX_SEGS 11u
/* The libblkio tag of a storage request xb_queue_lane made: the slot index with this bit. The lane's
 * completion walk (xk_lane_complete) takes only such completions, so no state in the table has to
 * say which slots are in the storage by the lane (a stale mark could outlive a park or a takeover). */
#define XK_LANE_TAG 0x10000u
/* held: XK_HELD_NO (its Slot has the request: filled by Python), XK_HELD_YES (only this entry has it),
 * XK_HELD_WALKED (and its completion was taken by xk_lane_complete_held: to be answered). */
#define XK_HELD_NO 0u
#define XK_HELD_YES 1u
#define XK_HELD_WALKED 2u
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
#endif
