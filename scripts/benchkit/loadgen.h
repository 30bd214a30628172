/* The interface of loadgen.c; build_loadgen.py hands this file to cffi's
 * cdef as is, so it holds nothing but plain declarations. */
#define LG_REQUEST_BYTES 112

/* What to run: the same description for the guest and the raw baseline. */
struct lg_workload {
    unsigned qd;                   /* I/Os in flight per ring / queue */
    unsigned unit_sectors;         /* I/O size in 512-byte sectors */
    unsigned parts;                /* lg_run: requests per I/O (its templates are qd * parts) */
    uint64_t span_units;           /* offsets lie in [0, span_units) I/O sizes */
    int random;                    /* random offsets, else sequential (one stream per ring) */
    int write;                     /* raw_run: write, else read (the guest's templates say) */
    double warmup_s;               /* run, but do not count, for this long first */
    double seconds;                /* then measure for this long */
    uint64_t seed;
    uint64_t max_latency_samples;  /* latencies kept for the percentiles (the first ones) */
};

/* One ring as the guest (lg_run) or the null responder (nr_run) sees it. */
struct lg_ring {
    void *sring;                   /* the shared ring pages, contiguous */
    unsigned ring_bytes;           /* 4096 << order */
    int wait_fd;                   /* our end's pending eventfd */
    int kick_fd;                   /* the peer's pending eventfd */
    const char *templates;         /* lg_run: qd * parts requests of LG_REQUEST_BYTES (request i has id i),
                                      complete but for the sector */
};

struct lg_result {
    uint64_t completed;            /* I/Os, in the measured window */
    double seconds;                /* length of the measured window */
    uint64_t total;                /* every completion, warm-up and drain included */
    uint64_t errors;               /* responses / completions with an error status */
    uint64_t bad_responses;        /* responses with an id we never sent */
    uint64_t notifies;             /* event channel kicks sent */
    uint64_t waits;                /* sleeps on the event channels */
    uint64_t latency_samples;
    double p50_us, p99_us, mean_us;
};

struct nr_result {
    uint64_t served;
    uint64_t notifies;
    uint64_t waits;
};

/* One libblkio queue for raw_run: `qd` buffers of the request size at `buffers`
 * (inside a memory region of the instance). */
struct raw_queue {
    void *q;                       /* struct blkioq * */
    char *buffers;
};

int lg_run(const struct lg_workload *w, const struct lg_ring *rings, unsigned nrings, struct lg_result *out);
int nr_run(const struct lg_ring *rings, unsigned nrings, int stop_fd, struct nr_result *out);
int raw_run(const struct lg_workload *w, const struct raw_queue *queues, unsigned nqueues, struct lg_result *out);
