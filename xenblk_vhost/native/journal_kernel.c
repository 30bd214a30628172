/* The ring journal's batch record, compiled: the stores of record_taken in
 * backend/datapath/journal.py's RingJournal (the reference, whose docstring is the format and
 * why it survives a SIGKILL). Python keeps the bookkeeping (which frame, the seq, the answers:
 * one word each, as cheap as a call here would be); this writes the frame. The same bytes in
 * the same order: tests/test_native_journal.py runs random call sequences (batches, indirect
 * copies, answers in any order, publishes, takeovers) through both and requires identical areas.
 * What it saves: the interpreter's ~15 buffer, struct and crc operations per batch. */
#include <stdint.h>
#include <string.h>
#include "native.h"

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the journal format is little-endian: the stores below assume a little-endian host"
#endif

enum {
    HEADER_SIZE = 4096,
    TAKEN_TO = 2048,        /* u32 in the header: ring position after the last request recorded */
    ANSWERS = 32,           /* byte offset of a frame's answer words */
    FRAME_FIELDS = 20,      /* seq u64, first_pos u32, n u16, flags u16, ind_total u32: what the crc covers */
    HAS_INDIRECT = 1,
};

/* zlib's CRC-32 (reflected, polynomial 0xEDB88320, pre- and post-inverted): the reference
 * computes zlib.crc32, and both must find the same frames valid. Byte at a time: here only
 * for the 20 header bytes (the caller passes zlib's crc of the copy: its crc32 is many times
 * faster on kilobytes than a table loop). Table made on first use. */
static uint32_t crc_table[256];
static int crc_ready;

static void crc_init(void)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        crc_table[i] = c;
    }
    crc_ready = 1;
}

uint32_t xk_crc32(uint32_t crc, const uint8_t *data, size_t len)
{
    if (!crc_ready)
        crc_init();
    crc = ~crc;
    while (len--)
        crc = crc_table[(crc ^ *data++) & 0xFF] ^ (crc >> 8);
    return ~crc;
}

static inline void store32(uint8_t *p, uint32_t v)
{
    __atomic_store_n((uint32_t *)(void *)p, v, __ATOMIC_RELAXED);
}

void xk_journal_frame(const struct xk_journal_geom *g, uint32_t f, uint64_t seq, uint64_t first_pos,
                      const uint8_t *raw, uint32_t n, const uint8_t *lens, const uint8_t *ind, uint32_t ind_total,
                      uint32_t crc)
{
    uint8_t *base = g->area + HEADER_SIZE + (size_t)f * g->frame_size;
    size_t nbytes = (size_t)n * g->entry;
    uint32_t pos = (uint32_t)first_pos;
    uint16_t flags = lens ? HAS_INDIRECT : 0;
    if (!lens)
        ind_total = 0;

    memset(base + ANSWERS, 0, 8 * (size_t)n);
    memcpy(base + g->raw_off, raw, nbytes);
    if (lens) {
        memcpy(base + g->lens_off, lens, 2 * (size_t)n);
        memcpy(base + g->ind_off, ind, ind_total);
    }
    uint8_t hdr[24];
    uint16_t n16 = (uint16_t)n;
    memcpy(hdr, &seq, 8);
    memcpy(hdr + 8, &pos, 4);
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
    store32(g->area + TAKEN_TO, pos + n);
}
