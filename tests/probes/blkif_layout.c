/*
 * Layout probe for the blkif ABI, compiled by the tests against Xen's own
 * public headers (Debian libxen-dev): once with -m64 (x86_64-abi / native)
 * and once with -m32 (x86_32-abi). Prints key=value lines that the Python
 * layouts in xenblk_vhost/blkif/abi.py must match.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include <xen/io/blkif.h>
#include <xen/io/protocols.h>

#define SIZE_OF(type, field) sizeof(((type *)0)->field)

#define FIELD(label, type, field)                                        \
    printf("%s.%s.offset=%zu\n%s.%s.size=%zu\n", label, #field,          \
           offsetof(type, field), label, #field, SIZE_OF(type, field))

#define SIZEOF(label, type) printf("%s.sizeof=%zu\n", label, sizeof(type))

#define CONST(name) printf("const.%s=%lld\n", #name, (long long)(name))

int main(void)
{
    SIZEOF("blkif_request_segment", struct blkif_request_segment);
    FIELD("blkif_request_segment", struct blkif_request_segment, gref);
    FIELD("blkif_request_segment", struct blkif_request_segment, first_sect);
    FIELD("blkif_request_segment", struct blkif_request_segment, last_sect);

    SIZEOF("blkif_request", struct blkif_request);
    FIELD("blkif_request", struct blkif_request, operation);
    FIELD("blkif_request", struct blkif_request, nr_segments);
    FIELD("blkif_request", struct blkif_request, handle);
    FIELD("blkif_request", struct blkif_request, id);
    FIELD("blkif_request", struct blkif_request, sector_number);
    FIELD("blkif_request", struct blkif_request, seg);

    SIZEOF("blkif_request_discard", struct blkif_request_discard);
    FIELD("blkif_request_discard", struct blkif_request_discard, operation);
    FIELD("blkif_request_discard", struct blkif_request_discard, flag);
    FIELD("blkif_request_discard", struct blkif_request_discard, handle);
    FIELD("blkif_request_discard", struct blkif_request_discard, id);
    FIELD("blkif_request_discard", struct blkif_request_discard, sector_number);
    FIELD("blkif_request_discard", struct blkif_request_discard, nr_sectors);

    SIZEOF("blkif_request_indirect", struct blkif_request_indirect);
    FIELD("blkif_request_indirect", struct blkif_request_indirect, operation);
    FIELD("blkif_request_indirect", struct blkif_request_indirect, indirect_op);
    FIELD("blkif_request_indirect", struct blkif_request_indirect, nr_segments);
    FIELD("blkif_request_indirect", struct blkif_request_indirect, id);
    FIELD("blkif_request_indirect", struct blkif_request_indirect, sector_number);
    FIELD("blkif_request_indirect", struct blkif_request_indirect, handle);
    FIELD("blkif_request_indirect", struct blkif_request_indirect, indirect_grefs);
#ifdef __i386__
    FIELD("blkif_request_indirect", struct blkif_request_indirect, pad);
#endif

    SIZEOF("blkif_response", struct blkif_response);
    FIELD("blkif_response", struct blkif_response, id);
    FIELD("blkif_response", struct blkif_response, operation);
    FIELD("blkif_response", struct blkif_response, status);

    SIZEOF("blkif_sring", struct blkif_sring);
    FIELD("blkif_sring", struct blkif_sring, req_prod);
    FIELD("blkif_sring", struct blkif_sring, req_event);
    FIELD("blkif_sring", struct blkif_sring, rsp_prod);
    FIELD("blkif_sring", struct blkif_sring, rsp_event);
    FIELD("blkif_sring", struct blkif_sring, pvt);
    FIELD("blkif_sring", struct blkif_sring, __pad);
    FIELD("blkif_sring", struct blkif_sring, ring);
    printf("blkif_sring.entry_size=%zu\n", sizeof(union blkif_sring_entry));

    /* __RING_SIZE needs a real ring to measure: give it 16 pages. */
    {
        const size_t page = 4096;
        struct blkif_sring *s = calloc(16, page);
        for (int order = 0; order <= 4; order++)
            printf("ring_entries.%d=%u\n", order,
                   (unsigned)__RING_SIZE(s, page << order));
        free(s);
    }

    CONST(BLKIF_OP_READ);
    CONST(BLKIF_OP_WRITE);
    CONST(BLKIF_OP_WRITE_BARRIER);
    CONST(BLKIF_OP_FLUSH_DISKCACHE);
    CONST(BLKIF_OP_RESERVED_1);
    CONST(BLKIF_OP_DISCARD);
    CONST(BLKIF_OP_INDIRECT);
    CONST(BLKIF_MAX_SEGMENTS_PER_REQUEST);
    CONST(BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST);
    CONST(BLKIF_RSP_OKAY);
    CONST(BLKIF_RSP_ERROR);
    CONST(BLKIF_RSP_EOPNOTSUPP);
    CONST(BLKIF_DISCARD_SECURE);
    CONST(VDISK_CDROM);
    CONST(VDISK_REMOVABLE);
    CONST(VDISK_READONLY);
    printf("proto.x86_32=%s\nproto.x86_64=%s\nproto.arm=%s\nproto.native=%s\n",
           XEN_IO_PROTO_ABI_X86_32, XEN_IO_PROTO_ABI_X86_64,
           XEN_IO_PROTO_ABI_ARM, XEN_IO_PROTO_ABI_NATIVE);
    return 0;
}
