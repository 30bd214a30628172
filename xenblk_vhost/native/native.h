/* xenblk-vhost's compiled kernels: the declarations cffi reads (cdef) and the C sources include.
 * Plain C types only: cffi's cdef parser reads this file as is. */

/* struct gntdev_grant_copy_segment of Linux's include/uapi/xen/gntdev.h, x86_64 layout
 * (24 bytes): the IOCTL_GNTDEV_GRANT_COPY array. tests/test_native.py checks every
 * offset against the ctypes definition in xen/gntdev.py, itself checked against gcc. */
struct xk_copy_foreign {
    uint32_t ref;
    uint16_t offset;
    uint16_t domid;
};
union xk_copy_ptr {
    uint64_t virt;
    struct xk_copy_foreign foreign;
};
struct xk_copy_seg {
    union xk_copy_ptr source;
    union xk_copy_ptr dest;
    uint16_t len;
    uint16_t flags;
    int16_t status;
};

/* The simulated hypervisor's GNTTABOP_copy over a run of segments of one foreign domain.
 * Starts at segs[start], stops before the first segment naming another domain, returns
 * its index (n when the run reaches the end). memory == NULL: the domain does not exist,
 * every segment of the run gets GNTST_bad_domain. */
int xk_sim_grant_copy(struct xk_copy_seg *segs, int start, int n, uint16_t domid, uint16_t ldomid,
                      const uint8_t *grant_table, uint32_t nr_entries, const uint32_t *active,
                      uint8_t *memory, uint32_t pages);

/* The copy path's packing of one request's blkif segments (8 bytes each on the wire:
 * uint32 gref, uint8 first_sect, uint8 last_sect, 2 bytes padding; a private copy) into
 * the grant-copy array at out: segment i covers sectors first..last of its page and the
 * local bytes right after segment i-1's. A segment with last >= 8 or first > last is not
 * packed: its index goes to refused[] (room for nseg) and it takes no local bytes.
 * Returns how many were packed; *nrefused and *covered (local bytes) are set. The same
 * result as CopyBatch.add_sector_ranges (xen/gntdev.py), which tests compare it with. */
int xk_pack_sector_ranges(struct xk_copy_seg *out, const char *raw, uint32_t nseg, int to_guest,
                          uint16_t domid, uint64_t local_addr, uint32_t *refused, uint32_t *nrefused,
                          uint64_t *covered);

/* How many of the n segments at segs have a status other than GNTST_okay (0), after the copy ran:
 * the copy path's check that a batch (2048 segments for 8 requests of 1 MiB) all copied. */
uint32_t xk_copy_failures(const struct xk_copy_seg *segs, uint32_t n);

/* One decoded + validated ring slot of a batch (intake_kernel.c): 40 bytes, the layout
 * native_intake.py reads with struct "<BBBBhHI4xQQQ". kind: XK_RW (READ/WRITE/
 * WRITE_BARRIER/FLUSH_DISKCACHE), XK_DISCARD, XK_INDIRECT (the slot half), XK_REJECT
 * (answer id, op, status at once; reason says why). op is the operation to echo for a
 * rejection (the indirect_op for an indirect request); aux is the discard flag or the
 * indirect_op; nseg the request's segment count; nr the sectors it covers (a discard's
 * nr_sectors). */
enum { XK_RW = 0, XK_DISCARD = 1, XK_INDIRECT = 2, XK_REJECT = 3 };  /* xk_req.kind */
struct xk_req {
    uint8_t kind;
    uint8_t op;
    uint8_t aux;
    uint8_t reason;
    int16_t status;
    uint16_t handle;
    uint32_t nseg;
    uint32_t pad;
    uint64_t id;
    uint64_t sector;
    uint64_t nr;
};

/* Where one ABI keeps the fields of a slot (blkif/abi.py's tables, which tests compare with gcc's),
 * and the device's limits (blkif/validate.py's RequestLimits). */
struct xk_intake_cfg {
    uint32_t entry;
    uint32_t id_off;
    uint32_t sector_off;
    uint32_t seg_off;
    uint32_t discard_nr_off;
    uint32_t indirect_handle_off;
    uint64_t sectors;
    uint32_t block_mask;
    uint32_t max_indirect;
    uint8_t read_only;
    uint8_t flush;
    uint8_t barrier;
    uint8_t discard;
};

/* Decode and validate `count` slots of a private copy (raw, cfg->entry bytes apart) into out[]:
 * the same decisions as RequestIntake.parse (blkif/decode.py, then validate.py). */
void xk_parse_slots(const uint8_t *raw, uint32_t count, const struct xk_intake_cfg *cfg,
                    struct xk_req *out);

/* An indirect request's second half: its nseg segments (a private copy of their 8-byte wire form)
 * decoded and the request (op READ or WRITE, sector) validated against cfg, the same decisions as
 * Validator.decode_indirect_segments (blkif/validate.py). Returns 0 (out->nr: the sectors covered)
 * or the reason it is rejected (out->status: the status to answer). */
int xk_check_indirect(const uint8_t *raw, uint32_t nseg, uint8_t op, uint64_t sector,
                      const struct xk_intake_cfg *cfg, struct xk_req *out);

/* The ring journal's writer (journal_kernel.c; backend/datapath/journal.py's RingJournal is the
 * reference and the format). journal_compiled.py fills it once; area is the journal's shared
 * mapping, the offsets are JournalGeometry's. Its bookkeeping lives in arrays Python allocates
 * and views too (memoryviews over them: record_answers and published run in Python where a call
 * here would cost more than the work): ctl[0] frames free, ctl[1] frames in done[]; free_[]
 * the free frames (a stack, next one last); pending[f] requests of frame f not answered;
 * tags[f] the answer tag of frame f, pre-shifted; done[2k], done[2k+1] a frame all answered
 * and its last response position, not yet published; seq[0] the last frame's seq. A compiled
 * ring engine calls these directly (xk_journal_answer per answer, xk_journal_published). */
struct xk_journal {
    uint8_t *area;
    uint32_t entry;           /* bytes of one ring slot */
    uint32_t frame_size;
    uint32_t raw_off;
    uint32_t lens_off;
    uint32_t ind_off;
    uint32_t per_frame;
    uint32_t wpf;             /* 8-byte words per frame */
    uint32_t ref0;            /* ref of request 0 of frame 0 */
    uint32_t *ctl;
    uint32_t *free_;
    uint32_t *pending;
    uint64_t *tags;
    uint32_t *done;
    uint64_t *seq;
};

/* record_taken: n slots of raw (n*entry bytes) from ring position first_pos into the next free
 * frame, its crc computed here; lens NULL for a batch without indirect requests, else 2*n bytes
 * (u16 per request: its segment bytes in ind, 0xFFFF copy failed) and ind_total bytes of segments
 * (the caller checked ind_total). Then the header's taken_to hint. Returns the first request's
 * ref, or XK_J_FULL (no free frame) / XK_J_BAD (n is 0 or more than a frame holds): nothing
 * written then. */
int64_t xk_journal_take(struct xk_journal *j, uint32_t first_pos, const uint8_t *raw, uint32_t n,
                        const uint8_t *lens, const uint8_t *ind, uint32_t ind_total);
/* record_answered: request ref answered status at response position rsp_pos. */
void xk_journal_answer(struct xk_journal *j, uint64_t ref, int32_t status, uint32_t rsp_pos);
/* record_answers: packed[k] = ref << 8 | (status & 0xFF) answered at response position first_pos + k,
 * or negative: the response of no journaled request (nothing recorded; its position still counts). */
void xk_journal_answers(struct xk_journal *j, const int64_t *packed, uint32_t n, uint32_t first_pos);
/* published: rsp_prod is published; frees the frames whose answers all lie before it. */
void xk_journal_published(struct xk_journal *j, uint32_t rsp_prod);
/* The intake's parse (xk_parse_slots) and, when no slot is an indirect request (its segments
 * are copied later, and the frame holds them), the batch's journal record from the same private
 * copy in the same call: returns the first request's ref, XK_J_INDIRECT when not recorded for
 * that reason, or xk_journal_take's refusal. */
int64_t xk_parse_record(const uint8_t *raw, uint32_t count, const struct xk_intake_cfg *cfg,
                        struct xk_req *out, struct xk_journal *j, uint32_t first_pos);
/* BackRing.push_responses on the shared ring's page (sring), then, with a journal (j not NULL),
 * xk_journal_published(j, new_prod): one call for the push. Returns whether to notify. */
int xk_ring_push(uint8_t *sring, uint32_t new_prod, struct xk_journal *j);
/* A ring's responses with their journal answers (RingWorker._finish's answers, compiled): the
 * shared page, its slot mask and stride, the response's size (16 x86_64, 12 x86_32), the journal
 * (NULL: none). Made once per ring by journal_compiled.CompiledAnswers. */
struct xk_rsp_ring {
    uint8_t *sring;
    uint32_t mask;
    uint32_t entry;
    uint32_t rsp_size;
    struct xk_journal *j;
};
/* Write n responses at ring positions first_pos.. (BackRing.put_response's bytes): ids[k] the
 * request's id, packed[k] = (jref + 1) << 16 | operation << 8 | (status & 0xFF) (jref + 1 == 0: no
 * journaled request), each one's journal answer (xk_journal_answer) stored before its response.
 * The caller checked there are n consumed requests to answer. Returns how many are not RSP_OKAY. */
int xk_ring_answers(const struct xk_rsp_ring *r, uint32_t first_pos, const uint64_t *ids,
                    const uint64_t *packed, uint32_t n);
/* The same for one response (a push of one: QD1), its fields unpacked (jref -1: not journaled): the
 * packing cost more in Python than the two arguments more. */
int xk_ring_answer(const struct xk_rsp_ring *r, uint32_t pos, uint64_t id, int64_t jref, uint8_t op, int32_t status);
enum { XK_J_FULL = -1, XK_J_BAD = -2, XK_J_INDIRECT = -3 };
/* zlib's crc32 (what the reference's frames carry). */
uint32_t xk_crc32(uint32_t crc, const uint8_t *data, size_t len);

/* The copy path's lane (lane_kernel.c; backend/datapath/copy_lane.py): per request slot, a plain
 * direct READ/WRITE's sector, bytes, op and wire segments; for a held request (xk_lane_hold) also its
 * id, journal ref and taken time (lane_slot.h has the same struct for the sources, and says what held
 * holds). */
struct xk_lane_slot {
    uint64_t sector;
    uint32_t nbytes;
    uint16_t nseg;
    uint8_t op;
    uint8_t held;
    uint8_t segs[88];
    uint64_t id;
    int64_t jref;
    double taken_at;
};
/* For every batch position i with slot_of[i] >= 0: copy the decoded record recs[i] (an XK_RW READ or
 * WRITE of 1..11 segments) and its segments from the private copy raw (slot i at i*entry, segments
 * at seg_off) into table[slot_of[i]]. Returns how many were stashed, or -1 - i for the first position
 * that is not such a request (or names a slot >= nslots): nothing after it is stashed. */
int xk_lane_stash(struct xk_lane_slot *table, uint32_t nslots, const uint8_t *raw, uint32_t entry,
                  uint32_t seg_off, const struct xk_req *recs, uint32_t count, const int32_t *slot_of);
/* Pack the grant-copy segments of the slots idx[0..n) (their data at base + idx*stride, packed back
 * to back as CopyBatch.add_sector_ranges packs them), in that order, into out. Returns how many
 * segments were packed, or -1 (nothing to trust in out) if a slot has no valid entry or a segment
 * would be refused (last >= 8 or first > last): the caller packs them the reference way. */
int xk_lane_pack(struct xk_copy_seg *out, const struct xk_lane_slot *table, uint32_t nslots,
                 const uint16_t *idx, uint32_t n, int to_guest, uint16_t domid, uint64_t base, uint64_t stride);
uint32_t xk_lane_slot_size(void);
/* The tag bit of the storage requests xb_queue_lane makes (lane_entry.h's XK_LANE_TAG). */
uint32_t xk_lane_tag(void);
/* A libblkio struct blkio_completion as a queue's completion array holds it (storage/queue.py checks
 * its size against libblkio's): the request's tag, libblkio's message, its result. */
struct xk_completion {
    uint64_t user_data;
    uint64_t error_msg;
    int32_t ret;
    int32_t reserved[3];
};
/* The completion side of the lane: when every one of the n completions comps[0..n) is the success
 * (ret >= 0) of a request xb_queue_lane queued (tag XK_LANE_TAG | slot, lane_entry.h) for a valid
 * entry, write their slots in completion order to ready[0..n), pack the READs' copies back to the
 * guest into out (as xk_lane_pack with to_guest does, in that order; the owner slot of each segment
 * in owners) and return how many segments were packed. Else -1, nothing to trust in the outputs:
 * the caller completes them all the reference way. out: room for 11 * n segments, owners too. */
int xk_lane_complete(struct xk_copy_seg *out, const struct xk_lane_slot *table, uint32_t nslots,
                     const struct xk_completion *comps, uint32_t n, uint16_t *ready, uint16_t *owners,
                     uint16_t domid, uint64_t base, uint64_t stride);
/* A whole batch of plain requests held in the table (no Python slot filled): for every batch position
 * i, record recs[i] (a READ or WRITE of 1..11 segments, as xk_lane_stash requires) and its segments
 * from raw go to table[slots[i]] with its id, journal ref (first_ref + i; first_ref < 0: -1) and
 * taken_at, held XK_HELD_YES. counts[0..3]: READ requests, READ sectors, WRITE requests, WRITE
 * sectors. All or nothing: -1 - i for the first position refused (not such a request, a slot >= nslots
 * or held already: the slots must be distinct free ones), nothing written then. Returns count. */
int xk_lane_hold(struct xk_lane_slot *table, uint32_t nslots, const uint8_t *raw, uint32_t entry,
                 uint32_t seg_off, const struct xk_req *recs, uint32_t count, const uint16_t *slots,
                 int64_t first_ref, double taken_at, uint64_t *counts);
/* xk_lane_pack for the entries among idx[0..n) whose op is `op` only (the writes' copy in of a held
 * batch), each from its own buffer (lane_entry.h: a held indirect entry's may be its large one), the owner
 * slot of each segment in owners; out and owners have room for `room` segments. Returns how many
 * segments, or -1 (one refused, or they do not fit). */
int xk_lane_pack_op(struct xk_copy_seg *out, const struct xk_lane_slot *table, uint32_t nslots,
                    const uint16_t *idx, uint32_t n, uint8_t op, int to_guest, uint16_t domid, uint64_t base,
                    uint64_t stride, uint16_t *owners, uint32_t room);
/* xk_lane_complete for held requests: every completion must be the success of a request xb_queue_lane
 * queued whose entry is held XK_HELD_YES (each slot once: it becomes XK_HELD_WALKED, its answer is due),
 * and the reads' segments must fit in `room` (out and owners); else -1, the entries as they were,
 * nothing to trust in the outputs. */
int xk_lane_complete_held(struct xk_copy_seg *out, struct xk_lane_slot *table, uint32_t nslots,
                          const struct xk_completion *comps, uint32_t n, uint16_t *ready, uint16_t *owners,
                          uint16_t domid, uint64_t base, uint64_t stride, uint32_t room);
/* Answer the walked held slots ready[0..n) OKAY, in that order, at ring positions first_pos.. (each as
 * xk_ring_answer: its journal answer, then its response), entries back to XK_HELD_NO; the latency of each
 * (now - taken_at) counted as LatencyHistogram.observe counts it: buckets[b] (b: how many of the nbounds
 * bounds are below it; all nbounds + 1 zeroed first; an entry whose taken_at is 0.0 is not timed: the ring
 * engine's lat_every), their sum in *total. Returns the mask of the buckets
 * counted (bit b), or -1 (nothing written) if an entry is not a walked held one. A held indirect entry's
 * large buffer goes back on the data path's free stack: large[(*nlarge)++] (lane_entry.h). */
int64_t xk_lane_answer_held(const struct xk_rsp_ring *r, uint32_t first_pos, struct xk_lane_slot *table,
                            uint32_t nslots, const uint16_t *ready, uint32_t n, double now, const double *bounds,
                            uint32_t nbounds, uint64_t *buckets, double *total, uint32_t *large, uint32_t *nlarge);
/* The ring engine's hold of one request (a plain one, or an indirect one whose segments xk_check_indirect
 * accepted: r is its record then, with its id), any size up to 4096 segments, in table[slot] (free, not
 * held): its segments at address segs (an indirect one's, in the lane's side table), its data at buf (used
 * only above 11 segments: 11 or fewer are held as a direct request, in the slot's small buffer), large its
 * large buffer's offset or 0xFFFFFFFF; id, jref, taken_at as xk_lane_hold; counts[0..3] added to (not
 * zeroed). 0, or -1 (nothing written) if it is not such a request or the slot is not free. */
int xk_lane_hold_one(struct xk_lane_slot *table, uint32_t nslots, uint16_t slot, const struct xk_req *r,
                     uint64_t segs, uint64_t buf, uint32_t large, int64_t jref, double taken_at, uint64_t *counts);
/* The held slots (XK_HELD_YES or XK_HELD_WALKED) in index order into out (room for nslots); how many. */
uint32_t xk_lane_held_slots(const struct xk_lane_slot *table, uint32_t nslots, uint16_t *out);
/* 1 if every one of the count records is a READ or WRITE of 1..11 direct segments (what the lane
 * takes whole, without building the intake's objects), else 0. */
int xk_lane_all_plain(const struct xk_req *recs, uint32_t count);

/* A ring's persistently mapped grants (feature-persistent on the copy path: pgrant_table.c;
 * backend/datapath/copy_grants.py owns one and fills it): gref -> the address of its page mapped
 * read-write in this process, for the ring engine's copies, which become a memcpy for a segment
 * whose gref is here instead of a part of Xen's GNTTABOP_copy. Open addressing (linear probing from
 * the gref's Fibonacci hash, deletion by backward shift); key gref + 1, 0: empty. The owner changes
 * it only while no engine call runs. used: set by every hit (the owner's LRU reads and clears it).
 * miss[0..nmiss): grefs the owner is to map: those of a request the engine stopped before (xk_pg_need) and
 * those of segments that went to Xen for want of a mapping (the owner maps them, or enters them without an
 * address, and sets nmiss to 0; more than miss_room are not recorded); hits: segments copied here, cumulative. */
struct xk_pgrant_slot {
    uint32_t key;
    uint32_t used;
    uint64_t addr;
};
struct xk_pgrants {
    struct xk_pgrant_slot *slots;
    uint32_t mask;            /* slots - 1: a power of two of at least twice max */
    uint32_t shift;           /* 32 - log2(slots) */
    uint32_t count;
    uint32_t max;
    uint32_t *miss;
    uint32_t miss_room;
    uint32_t nmiss;
    uint64_t hits;
    uint32_t open;            /* 1 while the owner maps what the engine asks for (its cache has room): see xk_pg_need */
    uint32_t pad;
};
/* Whether the nseg 8-byte wire segments at segs (their gref first) include one the owner should map before the
 * request that carries them is served: a gref not in the table at all (an entry with address 0 is one the owner
 * could not map) while the table is open. Such grefs are recorded as misses. Linux blkfront ends its access to
 * a persistent grant that the backend has not mapped when the request completes (and grants the page anew
 * next time), so a page mapped only after its request would never be seen again. */
int xk_pg_need(struct xk_pgrants *t, const uint8_t *segs, uint32_t nseg, uint32_t stride);
/* The page address of gref (its used flag set), 0 if it is not mapped here. */
uint64_t xk_pg_find(struct xk_pgrants *t, uint32_t gref);
/* gref's page is at addr: 1 added, 0 replaced, -1 refused (the table holds max, or gref is 2**32 - 1). */
int xk_pg_put(struct xk_pgrants *t, uint32_t gref, uint64_t addr);
/* gref forgotten (before its page is unmapped): 1, or 0 if it was not here. */
int xk_pg_del(struct xk_pgrants *t, uint32_t gref);
/* The grefs whose used flag is set, flags cleared, into out (up to room; the rest stay flagged). */
uint32_t xk_pg_take_used(struct xk_pgrants *t, uint32_t *out, uint32_t room);
/* The persistent part of a grant copy of segs[0..n) (packed as for IOCTL_GNTDEV_GRANT_COPY, the foreign
 * side domid's): a segment with one foreign side whose gref is in t and whose range lies in the page is
 * copied with memcpy, status GNTST_okay (0); every other one is appended to rest[] and its index to
 * idx[] (room for n each), its gref recorded as a miss, for Xen's copy (whose statuses the caller puts
 * back: segs[idx[k]].status = rest[k].status). Returns how many went to rest. */
uint32_t xk_pg_copy(struct xk_pgrants *t, struct xk_copy_seg *segs, uint32_t n, uint16_t domid,
                    struct xk_copy_seg *rest, uint32_t *idx);
