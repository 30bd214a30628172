/*
 * Ring-decision probe: runs Xen's own ring.h macros (from Debian libxen-dev)
 * over index states read from stdin, one state per line, and prints what
 * each macro decided, so the tests can check that xenblk_vhost/blkif/ring.py
 * decides the same. All states arrive in one batch: one process per run.
 *
 * Input lines (all numbers decimal, indices are 32-bit RING_IDX):
 *   B order req_prod req_event rsp_prod rsp_event req_cons rsp_prod_pvt
 *   F order req_prod req_event rsp_prod rsp_event req_prod_pvt rsp_cons
 * Output, one line per input line:
 *   B prod_overflow cons_overflow unconsumed drain push_notify rsp_prod_after
 *     final_work req_event_after
 *   F rsp_prod_overflow free_requests unconsumed push_notify req_prod_after
 *     final_work rsp_event_after
 * where `drain` is how many requests a blkback-style consumer takes: -1 if
 * RING_REQUEST_PROD_OVERFLOW rejects req_prod, else the count of indices
 * from req_cons up to req_prod before RING_REQUEST_CONS_OVERFLOW stops it.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/*
 * ring.h leaves its barriers to the includer (with the default interface
 * version xen_mb() is mb()). This probe is single-threaded, so any full
 * fence will do.
 */
#define mb() __sync_synchronize()
#define rmb() __sync_synchronize()
#define wmb() __sync_synchronize()
#include <xen/io/blkif.h>

#define PAGE 4096u

static void set_shared(struct blkif_sring *s, RING_IDX req_prod, RING_IDX req_event,
                       RING_IDX rsp_prod, RING_IDX rsp_event)
{
    s->req_prod = req_prod;
    s->req_event = req_event;
    s->rsp_prod = rsp_prod;
    s->rsp_event = rsp_event;
}

int main(void)
{
    struct blkif_sring *s = calloc(16, PAGE);
    char kind;
    unsigned order;
    RING_IDX rq, rqe, rp, rpe, a, b;

    if (!s)
        return 2;
    while (scanf(" %c %u %u %u %u %u %u %u", &kind, &order, &rq, &rqe, &rp, &rpe, &a, &b) == 8) {
        unsigned size = PAGE << order;
        if (order > 4)
            return 3;
        if (kind == 'B') {
            struct blkif_back_ring r;
            int notify, work, prod_over, cons_over;
            unsigned unconsumed;
            long long drain;

            BACK_RING_ATTACH(&r, s, 0, size);
            r.req_cons = a;
            r.rsp_prod_pvt = b;
            set_shared(s, rq, rqe, rp, rpe);

            prod_over = RING_REQUEST_PROD_OVERFLOW(&r, rq);
            cons_over = RING_REQUEST_CONS_OVERFLOW(&r, r.req_cons);
            unconsumed = RING_HAS_UNCONSUMED_REQUESTS(&r);
            if (prod_over) {
                drain = -1;
            } else {
                RING_IDX i;
                drain = 0;
                for (i = r.req_cons; i != rq && !RING_REQUEST_CONS_OVERFLOW(&r, i); i++)
                    drain++;
            }

            RING_PUSH_RESPONSES_AND_CHECK_NOTIFY(&r, notify);
            RING_IDX rsp_after = s->rsp_prod;

            set_shared(s, rq, rqe, rp, rpe);
            RING_FINAL_CHECK_FOR_REQUESTS(&r, work);
            printf("B %d %d %u %lld %d %u %d %u\n", !!prod_over, !!cons_over, unconsumed,
                   drain, !!notify, rsp_after, !!work, s->req_event);
        } else if (kind == 'F') {
            struct blkif_front_ring r;
            int notify, work, over;
            unsigned free_reqs, unconsumed;

            FRONT_RING_ATTACH(&r, s, 0, size);
            r.req_prod_pvt = a;
            r.rsp_cons = b;
            set_shared(s, rq, rqe, rp, rpe);

            over = RING_RESPONSE_PROD_OVERFLOW(&r, rp);
            free_reqs = RING_FREE_REQUESTS(&r);
            unconsumed = RING_HAS_UNCONSUMED_RESPONSES(&r);

            RING_PUSH_REQUESTS_AND_CHECK_NOTIFY(&r, notify);
            RING_IDX req_after = s->req_prod;

            set_shared(s, rq, rqe, rp, rpe);
            RING_FINAL_CHECK_FOR_RESPONSES(&r, work);
            printf("F %d %u %u %d %u %d %u\n", !!over, free_reqs, unconsumed, !!notify,
                   req_after, !!work, s->rsp_event);
        } else {
            return 4;
        }
    }
    free(s);
    return 0;
}
