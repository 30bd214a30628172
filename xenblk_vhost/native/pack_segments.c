/* Packing blkif segments into IOCTL_GNTDEV_GRANT_COPY segments, compiled: for an
 * indirect request of 256 segments this was ~60 us of Python (one struct.pack_into per
 * segment), the largest part of the backend's own CPU on 1 MiB I/O. Reads only the
 * private copy it is given; validates every segment again (the decoder already has). */
#include <stdint.h>
#include <string.h>
#include "native.h"
#include "copy_seg.h"

int xk_pack_sector_ranges(struct xk_copy_seg *out, const char *raw, uint32_t nseg, int to_guest,
                          uint16_t domid, uint64_t local_addr, uint32_t *refused, uint32_t *nrefused,
                          uint64_t *covered)
{
    uint64_t addr = local_addr;
    uint32_t packed = 0, bad = 0;
    for (uint32_t i = 0; i < nseg; i++) {
        const uint8_t *r = (const uint8_t *)raw + (uint64_t)i * 8;
        uint32_t gref;
        memcpy(&gref, r, 4);  /* little-endian host, as the ring (blkif/ring.py refuses others) */
        uint32_t first = r[4], last = r[5];
        if (last >= SECTORS_PER_PAGE || first > last) {
            refused[bad++] = i;
            continue;
        }
        addr += xk_fill_copy_seg(&out[packed++], gref, first, last, to_guest, domid, addr);
    }
    *nrefused = bad;
    *covered = addr - local_addr;
    return (int)packed;
}

uint32_t xk_copy_failures(const struct xk_copy_seg *segs, uint32_t n)
{
    uint32_t bad = 0;
    for (uint32_t i = 0; i < n; i++)
        bad += segs[i].status != 0;
    return bad;
}
