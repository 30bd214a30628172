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
