/* The ring journal's writer, compiled: the stores and the bookkeeping of
 * backend/datapath/journal.py's RingJournal (the reference, whose docstring is the format and
 * why it survives a SIGKILL). The same bytes in the same order, the same frames chosen:
 * tests/test_native_journal.py runs random call sequences (batches, indirect copies, answers in
 * any order, publishes, takeovers) through both and requires identical areas.
 * What it saves: the batch record costs no call of its own when the intake's parse writes it
 * (xk_parse_record: the private copy is in hand, the frame is a memcpy and a crc), and a compiled
 * ring engine can record answers and publishes without the interpreter (xk_journal_answer,
 * xk_journal_published). The state is in arrays Python views as well (native.h says which). */
#include <stdint.h>
#include <string.h>
#include "native.h"

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the journal format is little-endian: the stores below assume a little-endian host"
#endif

enum {
    HEADER_SIZE = 4096,
    HEADER_WORDS = HEADER_SIZE / 8,
    TAKEN_TO = 2048,        /* u32 in the header: ring position after the last request recorded */
    PUBLISHED = 2052,       /* u32 in the header: rsp_prod last published */
    ANSWERS = 32,           /* byte offset of a frame's answer words */
    FRAME_FIELDS = 20,      /* seq u64, first_pos u32, n u16, flags u16, ind_total u32: what the crc covers */
    HAS_INDIRECT = 1,
    TAG_SHIFT = 40,
    STATUS_SHIFT = 32,
    CTL_FREE = 0,
    CTL_DONE = 1,
    SRING_RSP_PROD = 8,     /* struct blkif_sring (blkif/abi.py SRING): rsp_prod, rsp_event */
    SRING_RSP_EVENT = 12,
    SRING_ENTRIES = 64,     /* the slots start after the four indices and the pad */
};
#define TAG_MOD ((1u << 24) - 1)

/* zlib's CRC-32 (reflected, polynomial 0xEDB88320, pre- and post-inverted): the reference
 * computes zlib.crc32, and both must find the same frames valid. Eight bytes per step from
 * eight tables (table k: the crc of a byte followed by k zero bytes), made before first use. */
static uint32_t crc_tables[8][256];

__attribute__((constructor)) static void crc_init(void)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        crc_tables[0][i] = c;
    }
    for (int t = 1; t < 8; t++)
        for (uint32_t i = 0; i < 256; i++) {
            uint32_t c = crc_tables[t - 1][i];
            crc_tables[t][i] = (c >> 8) ^ crc_tables[0][c & 0xFF];
        }
}

uint32_t xk_crc32(uint32_t crc, const uint8_t *data, size_t len)
{
    crc = ~crc;
    while (len >= 8) {
        uint32_t lo, hi;
        memcpy(&lo, data, 4);
        memcpy(&hi, data + 4, 4);
        lo ^= crc;
        crc = crc_tables[7][lo & 0xFF] ^ crc_tables[6][(lo >> 8) & 0xFF] ^
              crc_tables[5][(lo >> 16) & 0xFF] ^ crc_tables[4][lo >> 24] ^
              crc_tables[3][hi & 0xFF] ^ crc_tables[2][(hi >> 8) & 0xFF] ^
              crc_tables[1][(hi >> 16) & 0xFF] ^ crc_tables[0][hi >> 24];
        data += 8;
        len -= 8;
    }
    while (len--)
        crc = crc_tables[0][(crc ^ *data++) & 0xFF] ^ (crc >> 8);
    return ~crc;
}

static inline void store32(uint8_t *p, uint32_t v)
{
    __atomic_store_n((uint32_t *)(void *)p, v, __ATOMIC_RELAXED);
}

static inline void store64(uint8_t *p, uint64_t v)
{
    __atomic_store_n((uint64_t *)(void *)p, v, __ATOMIC_RELAXED);
}

int64_t xk_journal_take(struct xk_journal *j, uint32_t first_pos, const uint8_t *raw, uint32_t n,
                        const uint8_t *lens, const uint8_t *ind, uint32_t ind_total)
{
    if (n == 0 || n > j->per_frame)
        return XK_J_BAD;
    uint32_t nfree = j->ctl[CTL_FREE];
    if (!nfree || !j->area)  /* no area: released (its mapping may be gone) */
        return XK_J_FULL;
    uint32_t f = j->free_[--nfree];
    j->ctl[CTL_FREE] = nfree;
    uint64_t seq = ++j->seq[0];

    uint8_t *base = j->area + HEADER_SIZE + (size_t)f * j->frame_size;
    size_t nbytes = (size_t)n * j->entry;
    uint16_t flags = lens ? HAS_INDIRECT : 0;
    if (!lens)
        ind_total = 0;

    memset(base + ANSWERS, 0, 8 * (size_t)n);
    memcpy(base + j->raw_off, raw, nbytes);
    uint32_t crc = xk_crc32(0, raw, nbytes);
    if (lens) {
        memcpy(base + j->lens_off, lens, 2 * (size_t)n);
        memcpy(base + j->ind_off, ind, ind_total);
        crc = xk_crc32(crc, lens, 2 * (size_t)n);
        crc = xk_crc32(crc, ind, ind_total);
    }
    uint8_t hdr[24];
    uint16_t n16 = (uint16_t)n;
    memcpy(hdr, &seq, 8);
    memcpy(hdr + 8, &first_pos, 4);
    memcpy(hdr + 12, &n16, 2);
    memcpy(hdr + 14, &flags, 2);
    memcpy(hdr + 16, &ind_total, 4);
    crc = xk_crc32(crc, hdr, FRAME_FIELDS);
    if (!crc)
        crc = 1;  /* 0 is what a zeroed header holds: never a valid crc */
    memcpy(hdr + 20, &crc, 4);
    /* The copy, then the header that makes it valid, then the hint: a kill in between leaves the
     * hint at the start of a complete batch, which the takeover accepts, never past a frame not
     * yet written. Compiler barriers: the kill comes between two instructions of this thread. */
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
    memcpy(base, hdr, sizeof hdr);
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
    store32(j->area + TAKEN_TO, first_pos + n);

    j->pending[f] = n;
    j->tags[f] = ((uint64_t)(seq % TAG_MOD) + 1) << TAG_SHIFT;
    return (int64_t)j->ref0 + (int64_t)f * j->wpf;
}

void xk_journal_answer(struct xk_journal *j, uint64_t ref, int32_t status, uint32_t rsp_pos)
{
    if (!j->area)
        return;
    uint32_t f = (uint32_t)((ref - j->ref0) / j->wpf);
    store64(j->area + 8 * ref, j->tags[f] | ((uint64_t)((uint32_t)status & 0xFF) << STATUS_SHIFT) | rsp_pos);
    if (!--j->pending[f]) {
        uint32_t k = j->ctl[CTL_DONE];
        j->done[2 * k] = f;
        j->done[2 * k + 1] = rsp_pos;
        j->ctl[CTL_DONE] = k + 1;
    }
}

void xk_journal_published(struct xk_journal *j, uint32_t rsp_prod)
{
    if (!j->area)
        return;
    store32(j->area + PUBLISHED, rsp_prod);
    uint32_t n = j->ctl[CTL_DONE], keep = 0, nfree = j->ctl[CTL_FREE];
    for (uint32_t k = 0; k < n; k++) {
        uint32_t f = j->done[2 * k], last = j->done[2 * k + 1];
        if ((uint32_t)(rsp_prod - last - 1) < 0x80000000u) {  /* last < rsp_prod, modulo 2**32 */
            store64(j->area + 8 * (HEADER_WORDS + (size_t)f * j->wpf), 0);  /* seq 0: the frame is free */
            j->free_[nfree++] = f;
        } else {
            j->done[2 * keep] = f;
            j->done[2 * keep + 1] = last;
            keep++;
        }
    }
    j->ctl[CTL_DONE] = keep;
    j->ctl[CTL_FREE] = nfree;
}

int64_t xk_parse_record(const uint8_t *raw, uint32_t count, const struct xk_intake_cfg *cfg,
                        struct xk_req *out, struct xk_journal *j, uint32_t first_pos)
{
    xk_parse_slots(raw, count, cfg, out);
    for (uint32_t i = 0; i < count; i++)
        if (out[i].kind == XK_INDIRECT)  /* the frame needs its segments, copied later */
            return XK_J_INDIRECT;
    return xk_journal_take(j, first_pos, raw, count, NULL, NULL, 0);
}

/* RING_PUSH_RESPONSES_AND_CHECK_NOTIFY with the journal's publish folded in (blkif/ring.py's
 * BackRing.push_responses is the reference: tests/test_native_journal.py compares the stores and
 * the verdict): publish rsp_prod = new_prod (the responses before it were written by the caller,
 * earlier in program order: x86 keeps stores in order), xen_mb(), read rsp_event; then, with a
 * journal, published(new_prod). Returns whether to notify the frontend. */
int xk_ring_push(uint8_t *sring, uint32_t new_prod, struct xk_journal *j)
{
    uint32_t old = __atomic_load_n((uint32_t *)(void *)(sring + SRING_RSP_PROD), __ATOMIC_RELAXED);
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
    store32(sring + SRING_RSP_PROD, new_prod);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);  /* our rsp_prod before we read their rsp_event */
    uint32_t event = __atomic_load_n((uint32_t *)(void *)(sring + SRING_RSP_EVENT), __ATOMIC_RELAXED);
    if (j)
        xk_journal_published(j, new_prod);
    return (uint32_t)(new_prod - event) < (uint32_t)(new_prod - old);
}

void xk_journal_answers(struct xk_journal *j, const int64_t *packed, uint32_t n, uint32_t first_pos)
{
    for (uint32_t k = 0; k < n; k++)
        if (packed[k] >= 0)
            xk_journal_answer(j, (uint64_t)packed[k] >> 8, (int32_t)(packed[k] & 0xFF), first_pos + k);
}

/* One response written at ring position pos (BackRing.put_response's bytes: id, operation, a zero
 * pad byte, status, zeros to the response's size), after its journal answer when it has one
 * (packed = (jref + 1) << 16 | operation << 8 | (status & 0xFF); jref + 1 == 0: not journaled).
 * The journal store comes first: a kill between the two leaves an answer the takeover publishes,
 * never a response the journal does not know (it is not visible before the push anyway). */
static inline int put_one(const struct xk_rsp_ring *r, uint32_t pos, uint64_t id, uint64_t packed)
{
    int8_t status = (int8_t)(packed & 0xFF);
    uint64_t ref1 = packed >> 16;
    if (ref1 && r->j)
        xk_journal_answer(r->j, ref1 - 1, status, pos);
    uint8_t rsp[16] = {0};
    int16_t st16 = status;  /* RSP_OKAY 0, RSP_ERROR -1, RSP_EOPNOTSUPP -2: int8 holds them all */
    memcpy(rsp, &id, 8);
    rsp[8] = (uint8_t)(packed >> 8);
    memcpy(rsp + 10, &st16, 2);
    memcpy(r->sring + SRING_ENTRIES + (size_t)(pos & r->mask) * r->entry, rsp, r->rsp_size);
    return status != 0;
}

int xk_ring_answer(const struct xk_rsp_ring *r, uint32_t pos, uint64_t id, int64_t jref, uint8_t op, int32_t status)
{
    return put_one(r, pos, id, (uint64_t)(jref + 1) << 16 | (uint64_t)op << 8 | ((uint32_t)status & 0xFF));
}

int xk_ring_answers(const struct xk_rsp_ring *r, uint32_t first_pos, const uint64_t *ids,
                    const uint64_t *packed, uint32_t n)
{
    int errors = 0;
    for (uint32_t k = 0; k < n; k++)
        errors += put_one(r, first_pos + k, ids[k], packed[k]);
    return errors;
}
