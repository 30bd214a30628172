"""The C declarations of libblkio 1.5.0 and the loaded library (cffi ABI mode).

The declarations are copied from /usr/include/blkio.h (libblkio-dev 1.5.0),
with three deliberate changes, all ABI-neutral on the 64-bit Linux ABIs we
run on (x86-64 SysV, AArch64 AAPCS: a pointer and a uintptr_t are both one
integer register / one 8-byte slot):

1. On the request-queueing functions (blkioq_read ... blkioq_flush) the data
   pointers (`buf`, `iovec`) and `user_data` are declared `uintptr_t`.
   The backend names memory by integer address (grant-mapped pages, memory
   region offsets), and user_data is an integer tag. With `void *` every
   request would pay an `ffi.cast()` per pointer (a cdata allocation);
   with uintptr_t cffi converts the Python int directly.
2. The zone API (nvme-io_uring zoned namespaces) is left out: the blkif
   protocol has no zone operations.
3. blkioq_do_io_interruptible() is left out: it needs a sigset_t, and we
   never block in do_io with signals to deliver (trio waits on the
   completion fd instead).

tests/test_storage_cdef.py checks the struct layouts against gcc compiling
the real header, and every declared function against the header's prototype
(modulo the substitutions above).

`free()` comes from libc, reached through libblkio's own dependency on
libc.so.6: blkio_get_str() returns malloc'd memory the caller must free.
"""

from __future__ import annotations

import cffi

# Function prototypes whose pointer parameters we declare as uintptr_t (see 1.).
HOT_PATH_FUNCTIONS = (
    "blkioq_read",
    "blkioq_write",
    "blkioq_readv",
    "blkioq_writev",
    "blkioq_write_zeroes",
    "blkioq_discard",
    "blkioq_flush",
)

CDEF = """
struct blkio;
struct blkioq;

struct blkio_mem_region
{
    void *addr;
    size_t len;
    uint64_t iova;
    int64_t fd_offset;
    int fd;
    uint32_t flags;
};

struct blkio_completion
{
    void *user_data;
    const char *error_msg;
    int ret;
    uint8_t reserved_[12];
};

struct timespec { long tv_sec; long tv_nsec; };

const char *blkio_get_error_msg(void);

int blkio_create(const char *driver, struct blkio **bp);
int blkio_connect(struct blkio *b);
int blkio_start(struct blkio *b);
void blkio_destroy(struct blkio **bp);

int blkio_get_bool(struct blkio *b, const char *name, bool *value);
int blkio_get_int(struct blkio *b, const char *name, int *value);
int blkio_get_uint64(struct blkio *b, const char *name, uint64_t *value);
int blkio_get_str(struct blkio *b, const char *name, char **value);

int blkio_set_bool(struct blkio *b, const char *name, bool value);
int blkio_set_int(struct blkio *b, const char *name, int value);
int blkio_set_uint64(struct blkio *b, const char *name, uint64_t value);
int blkio_set_str(struct blkio *b, const char *name, const char *value);

int blkio_alloc_mem_region(struct blkio *b, struct blkio_mem_region *region, size_t len);
void blkio_free_mem_region(struct blkio *b, const struct blkio_mem_region *region);
int blkio_map_mem_region(struct blkio *b, const struct blkio_mem_region *region);
void blkio_unmap_mem_region(struct blkio *b, const struct blkio_mem_region *region);

struct blkioq *blkio_get_queue(struct blkio *b, int index);
struct blkioq *blkio_get_poll_queue(struct blkio *b, int index);

int blkio_add_queue(struct blkio *b);
int blkio_add_poll_queue(struct blkio *b);

int blkio_remove_queue(struct blkio *b, int index);
int blkio_remove_poll_queue(struct blkio *b, int index);

enum {
    BLKIO_REQ_FUA = 1,
    BLKIO_REQ_NO_UNMAP = 2,
    BLKIO_REQ_NO_FALLBACK = 4,
};

void blkioq_read(struct blkioq *q, uint64_t start, uintptr_t buf, size_t len, uintptr_t user_data, uint32_t flags);
void blkioq_write(struct blkioq *q, uint64_t start, uintptr_t buf, size_t len, uintptr_t user_data, uint32_t flags);
void blkioq_readv(struct blkioq *q, uint64_t start, uintptr_t iovec, int iovcnt, uintptr_t user_data, uint32_t flags);
void blkioq_writev(struct blkioq *q, uint64_t start, uintptr_t iovec, int iovcnt, uintptr_t user_data, uint32_t flags);
void blkioq_write_zeroes(struct blkioq *q, uint64_t start, uint64_t len, uintptr_t user_data, uint32_t flags);
void blkioq_discard(struct blkioq *q, uint64_t start, uint64_t len, uintptr_t user_data, uint32_t flags);
void blkioq_flush(struct blkioq *q, uintptr_t user_data, uint32_t flags);

int blkioq_do_io(struct blkioq *q, struct blkio_completion *completions, int min_completions,
                 int max_completions, struct timespec *timeout);
int blkioq_get_completion_fd(struct blkioq *q);
void blkioq_set_completion_fd_enabled(struct blkioq *q, bool enable);

void free(void *ptr);
"""

LIBRARY_NAME = "libblkio.so.1"

ffi = cffi.FFI()
ffi.cdef(CDEF)
try:
    lib = ffi.dlopen(LIBRARY_NAME)
except OSError as exc:  # pragma: no cover - depends on the host
    raise ImportError(
        f"cannot load {LIBRARY_NAME} ({exc}); install libblkio1 (scripts/install-deps.sh)"
    ) from exc

# The blkio(3) man page shows a different field order than the header; a
# wrong layout would corrupt memory silently, so refuse to load instead.
if ffi.sizeof("struct blkio_mem_region") != 40 or ffi.sizeof("struct blkio_completion") != 32:
    raise ImportError("libblkio struct layout mismatch (expected 40 and 32 bytes)")

REQ_FUA = lib.BLKIO_REQ_FUA
REQ_NO_UNMAP = lib.BLKIO_REQ_NO_UNMAP
REQ_NO_FALLBACK = lib.BLKIO_REQ_NO_FALLBACK
