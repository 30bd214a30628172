/* libblkio's hot-path calls, compiled (cffi API mode) for xenblk_vhost/storage/queue.py.
 *
 * cffi's ABI mode (storage/cdef.py: dlopen of libblkio.so.1) pays libffi's
 * generic call machinery on every blkioq_* call, about as much again as the
 * work libblkio does to queue a request. These wrappers are direct C calls.
 * Pointers travel as uintptr_t (the queue, buffers, iovecs, the completion
 * array and the timeout): the ABI-mode cdata belong to another FFI instance,
 * and the datapath names memory by integer address anyway. The queue pointer
 * is the one storage/queue.py got from blkio_get_queue(); a closed queue
 * never reaches these (Queue swaps its calls for a raising stub first).
 *
 * This file is both the cdef (cffi parses it) and the sources' header.
 */
void xb_read(uintptr_t q, uint64_t start, uintptr_t buf, size_t len, uintptr_t tag, uint32_t flags);
void xb_write(uintptr_t q, uint64_t start, uintptr_t buf, size_t len, uintptr_t tag, uint32_t flags);
void xb_readv(uintptr_t q, uint64_t start, uintptr_t iovec, int iovcnt, uintptr_t tag, uint32_t flags);
void xb_writev(uintptr_t q, uint64_t start, uintptr_t iovec, int iovcnt, uintptr_t tag, uint32_t flags);
void xb_write_zeroes(uintptr_t q, uint64_t start, uint64_t len, uintptr_t tag, uint32_t flags);
void xb_discard(uintptr_t q, uint64_t start, uint64_t len, uintptr_t tag, uint32_t flags);
void xb_flush(uintptr_t q, uintptr_t tag, uint32_t flags);
void xb_set_completion_fd_enabled(uintptr_t q, bool enable);
int xb_do_io(uintptr_t q, uintptr_t completions, int min_completions, int max_completions, uintptr_t timeout);
/* The copy path's lane (lane_slot.h, backend/datapath/copy_lane.py): queue a READ or WRITE for
 * each slot idx[0..n) (a uint16_t array) of the lane table (nslots struct xk_lane_slot): from
 * sector*512, nbytes at base + idx*stride, tag XK_LANE_TAG | idx (lane_slot.h), in that order. Checks every entry first and
 * queues nothing (-1) if one is not a stashed READ/WRITE; else returns n. */
int xb_queue_lane(uintptr_t q, uintptr_t table, uint32_t nslots, uintptr_t idx, uint32_t n, uint64_t base,
                  uint64_t stride);
uint32_t xb_lane_slot_size(void);
uint32_t xb_lane_tag(void);  /* lane_slot.h's XK_LANE_TAG */
