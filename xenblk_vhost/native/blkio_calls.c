/* See blkio_calls.h: direct calls of libblkio's request-queueing functions and blkioq_do_io. */
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <blkio.h>

#include "blkio_calls.h"
#include "lane_slot.h"

#define QUEUE(q) ((struct blkioq *)(q))
#define PTR(p) ((void *)(p))

void xb_read(uintptr_t q, uint64_t start, uintptr_t buf, size_t len, uintptr_t tag, uint32_t flags)
{
    blkioq_read(QUEUE(q), start, PTR(buf), len, PTR(tag), flags);
}

void xb_write(uintptr_t q, uint64_t start, uintptr_t buf, size_t len, uintptr_t tag, uint32_t flags)
{
    blkioq_write(QUEUE(q), start, (const void *)buf, len, PTR(tag), flags);
}

void xb_readv(uintptr_t q, uint64_t start, uintptr_t iovec, int iovcnt, uintptr_t tag, uint32_t flags)
{
    blkioq_readv(QUEUE(q), start, (struct iovec *)iovec, iovcnt, PTR(tag), flags);
}

void xb_writev(uintptr_t q, uint64_t start, uintptr_t iovec, int iovcnt, uintptr_t tag, uint32_t flags)
{
    blkioq_writev(QUEUE(q), start, (struct iovec *)iovec, iovcnt, PTR(tag), flags);
}

void xb_write_zeroes(uintptr_t q, uint64_t start, uint64_t len, uintptr_t tag, uint32_t flags)
{
    blkioq_write_zeroes(QUEUE(q), start, len, PTR(tag), flags);
}

void xb_discard(uintptr_t q, uint64_t start, uint64_t len, uintptr_t tag, uint32_t flags)
{
    blkioq_discard(QUEUE(q), start, len, PTR(tag), flags);
}

void xb_flush(uintptr_t q, uintptr_t tag, uint32_t flags)
{
    blkioq_flush(QUEUE(q), PTR(tag), flags);
}

void xb_set_completion_fd_enabled(uintptr_t q, bool enable)
{
    blkioq_set_completion_fd_enabled(QUEUE(q), enable);
}

int xb_do_io(uintptr_t q, uintptr_t completions, int min_completions, int max_completions, uintptr_t timeout)
{
    return blkioq_do_io(QUEUE(q), (struct blkio_completion *)completions, min_completions, max_completions,
                        (struct timespec *)timeout);
}

uint32_t xb_lane_slot_size(void) { return (uint32_t)sizeof(struct xk_lane_slot); }

uint32_t xb_lane_tag(void) { return XK_LANE_TAG; }

int xb_queue_lane(uintptr_t q, uintptr_t table, uint32_t nslots, uintptr_t idx, uint32_t n, uint64_t base,
                  uint64_t stride)
{
    const struct xk_lane_slot *t = (const struct xk_lane_slot *)table;
    const uint16_t *ix = (const uint16_t *)idx;
    for (uint32_t k = 0; k < n; k++) {  /* all or nothing: the caller queues them the reference way */
        if (ix[k] >= nslots || !xk_entry_ok(&t[ix[k]]))
            return -1;
    }
    for (uint32_t k = 0; k < n; k++) {
        uint32_t s = ix[k];
        const struct xk_lane_slot *e = &t[s];
        void *buf = PTR(xk_entry_buf(e, base, stride, s));  /* (a held indirect one's may be a large buffer) */
        void *tag = PTR(XK_LANE_TAG | (uintptr_t)s);  /* its completion says: queued here, one part */
        if (e->op)
            blkioq_write(QUEUE(q), e->sector << 9, buf, e->nbytes, tag, 0);
        else
            blkioq_read(QUEUE(q), e->sector << 9, buf, e->nbytes, tag, 0);
    }
    return (int)n;
}
