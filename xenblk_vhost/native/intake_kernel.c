/* The request intake's per-slot work, compiled: decode a ring slot from the backend's private
 * copy and validate it against the device (blkif/decode.py and blkif/validate.py are the
 * reference; tests/test_native_intake.py runs random and hostile slots through both and
 * requires the same verdicts). Every field is read once from the private copy, never from
 * shared memory. Rules and their order are the reference's; see its docstrings for why. */
#include <stdint.h>
#include <string.h>
#include "native.h"

enum { OP_READ = 0, OP_WRITE = 1, OP_WRITE_BARRIER = 2, OP_FLUSH = 3, OP_DISCARD = 5, OP_INDIRECT = 6 };
/* Reasons: native_intake.py maps them to decode.py's and validate.py's R_* strings. */
enum {
    XK_R_NONE = 0, XK_R_UNKNOWN_OP, XK_R_BAD_NR_SEGMENTS, XK_R_BAD_SEGMENT, XK_R_BAD_INDIRECT_OP,
    XK_R_FLUSH_DISABLED, XK_R_BARRIER_DISABLED, XK_R_DISCARD_DISABLED, XK_R_READ_ONLY,
    XK_R_OVERFLOW, XK_R_BEYOND_END, XK_R_MISALIGNED, XK_R_TOO_MANY_INDIRECT,
};
#define RSP_ERROR (-1)
#define RSP_EOPNOTSUPP (-2)
#define MAX_SEGMENTS 11u
#define MAX_INDIRECT_SEGMENTS_ABI 4096u
#define SECTORS_PER_PAGE 8u

static inline uint64_t rd64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }
static inline uint16_t rd16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return v; }

static inline void reject(struct xk_req *r, uint8_t op, int16_t status, uint8_t reason)
{
    r->kind = XK_REJECT;
    r->op = op;
    r->status = status;
    r->reason = reason;
}

/* The segment checks: a bad segment (last >= 8 or first > last) -> XK_R_BAD_SEGMENT; else *nr = the
 * sectors they cover and a segment not a multiple of block_mask + 1 sectors -> XK_R_MISALIGNED; else 0. */
static int check_segments(const uint8_t *raw, uint32_t nseg, uint32_t block_mask, uint64_t *nr)
{
    uint64_t total = 0;
    int misaligned = 0;
    for (uint32_t i = 0; i < nseg; i++) {
        uint32_t first = raw[8 * i + 4], last = raw[8 * i + 5];
        if (last >= SECTORS_PER_PAGE || first > last)
            return XK_R_BAD_SEGMENT;  /* the decoder's rule comes before the validator's */
        total += last - first + 1;
        if ((last - first + 1) & block_mask)
            misaligned = 1;
    }
    *nr = total;
    return misaligned ? XK_R_MISALIGNED : XK_R_NONE;
}

/* validate.py check_rw, after decoding (seg_misaligned: a segment's length is not whole blocks). */
static void check_rw(struct xk_req *r, const struct xk_intake_cfg *c, int seg_misaligned)
{
    uint8_t op = r->op;
    if (op >= OP_WRITE_BARRIER) {
        if (op == OP_FLUSH) {
            if (!c->flush) { reject(r, op, RSP_EOPNOTSUPP, XK_R_FLUSH_DISABLED); return; }
        } else if (!c->barrier) { reject(r, op, RSP_EOPNOTSUPP, XK_R_BARRIER_DISABLED); return; }
    }
    uint64_t nr = r->nr;
    if (c->read_only && (op == OP_WRITE || (op == OP_WRITE_BARRIER && nr))) {
        reject(r, op, RSP_ERROR, XK_R_READ_ONLY); return;
    }
    if (nr) {
        uint64_t end = r->sector + nr;
        if (end < r->sector) { reject(r, op, RSP_ERROR, XK_R_OVERFLOW); return; }
        if (end > c->sectors) { reject(r, op, RSP_ERROR, XK_R_BEYOND_END); return; }
        if (c->block_mask && ((r->sector & c->block_mask) || seg_misaligned)) {
            reject(r, op, RSP_ERROR, XK_R_MISALIGNED); return;
        }
    }
}

static void parse_one(const uint8_t *s, const struct xk_intake_cfg *c, struct xk_req *r)
{
    uint8_t op = s[0];
    memset(r, 0, sizeof(*r));
    r->id = rd64(s + c->id_off);
    r->sector = rd64(s + c->sector_off);
    r->handle = rd16(s + 2);
    r->op = op;
    if (op <= OP_FLUSH) {
        uint32_t nseg = s[1];
        r->kind = XK_RW;
        r->nseg = nseg;
        if (nseg == 0) {
            if (op <= OP_WRITE) { reject(r, op, RSP_ERROR, XK_R_BAD_NR_SEGMENTS); return; }
            check_rw(r, c, 0);
            return;
        }
        if (nseg > MAX_SEGMENTS) { reject(r, op, RSP_ERROR, XK_R_BAD_NR_SEGMENTS); return; }
        uint64_t nr;
        int why = check_segments(s + c->seg_off, nseg, c->block_mask, &nr);
        if (why == XK_R_BAD_SEGMENT) { reject(r, op, RSP_ERROR, XK_R_BAD_SEGMENT); return; }
        r->nr = nr;
        check_rw(r, c, why == XK_R_MISALIGNED);
        return;
    }
    if (op == OP_DISCARD) {
        uint64_t nr = rd64(s + c->discard_nr_off);
        r->kind = XK_DISCARD;
        r->aux = s[1];
        r->nr = nr;
        if (!c->discard) { reject(r, op, RSP_EOPNOTSUPP, XK_R_DISCARD_DISABLED); return; }
        if (c->read_only) { reject(r, op, RSP_ERROR, XK_R_READ_ONLY); return; }
        if (nr) {
            uint64_t end = r->sector + nr;
            if (end < r->sector) { reject(r, op, RSP_ERROR, XK_R_OVERFLOW); return; }
            if (end > c->sectors) { reject(r, op, RSP_ERROR, XK_R_BEYOND_END); return; }
        }
        if ((r->sector | nr) & c->block_mask) { reject(r, op, RSP_ERROR, XK_R_MISALIGNED); return; }
        return;
    }
    if (op == OP_INDIRECT) {
        uint8_t iop = s[1];
        uint32_t nseg = rd16(s + 2);
        r->kind = XK_INDIRECT;
        r->aux = iop;
        r->nseg = nseg;
        r->handle = rd16(s + c->indirect_handle_off);
        if (iop > OP_WRITE) { reject(r, iop, RSP_ERROR, XK_R_BAD_INDIRECT_OP); return; }
        if (nseg == 0 || nseg > MAX_INDIRECT_SEGMENTS_ABI) { reject(r, iop, RSP_ERROR, XK_R_BAD_NR_SEGMENTS); return; }
        if (nseg > c->max_indirect) { reject(r, iop, RSP_ERROR, XK_R_TOO_MANY_INDIRECT); return; }
        if (c->read_only && iop == OP_WRITE) { reject(r, iop, RSP_ERROR, XK_R_READ_ONLY); return; }
        return;
    }
    reject(r, op, RSP_EOPNOTSUPP, XK_R_UNKNOWN_OP);  /* 4 (never valid) and 7..255 */
}

void xk_parse_slots(const uint8_t *raw, uint32_t count, const struct xk_intake_cfg *cfg,
                    struct xk_req *out)
{
    for (uint32_t i = 0; i < count; i++)
        parse_one(raw + (uint64_t)i * cfg->entry, cfg, &out[i]);
}

int xk_check_indirect(const uint8_t *raw, uint32_t nseg, uint8_t op, uint64_t sector,
                      const struct xk_intake_cfg *cfg, struct xk_req *out)
{
    uint64_t nr;
    memset(out, 0, sizeof(*out));
    int why = check_segments(raw, nseg, cfg->block_mask, &nr);
    if (why == XK_R_BAD_SEGMENT) {  /* the decoder's rule, before any of the validator's */
        reject(out, op, RSP_ERROR, XK_R_BAD_SEGMENT);
        return XK_R_BAD_SEGMENT;
    }
    out->kind = XK_RW;
    out->op = op;
    out->nseg = nseg;
    out->sector = sector;
    out->nr = nr;
    check_rw(out, cfg, why == XK_R_MISALIGNED);
    return out->kind == XK_REJECT ? out->reason : XK_R_NONE;
}
