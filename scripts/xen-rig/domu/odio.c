/*
 * odio: O_DIRECT write/verify for the guest workload of the xen-rig.
 *
 * busybox dd has no iflag/oflag=direct, and a plain "write then read back"
 * cannot tell a misplaced write from a lost one. So every 512-byte sector gets
 * a self-describing pattern: a header {magic, seed, absolute sector number}
 * followed by bytes derived from (seed, sector). A verify failure then says
 * what was found instead: zeros, another write's seed, or the right seed at the
 * wrong sector (an offset bug in the backend).
 *
 *   odio write  DEV OFFSET LENGTH [-s SEED] [-c CHUNK] [-j JOBS] [-b BUFOFF] [-d] [-f] [-l MS]
 *   odio verify DEV OFFSET LENGTH [-s SEED] [-c CHUNK] [-j JOBS] [-b BUFOFF] [-l MS]
 *   odio zero   DEV OFFSET LENGTH [-c CHUNK]          (expects all-zero sectors)
 *
 * OFFSET, LENGTH, CHUNK take K/M/G suffixes and must be multiples of 512.
 * -j JOBS forks JOBS processes that take chunks round-robin, so several
 *    requests are in flight at once (and spread over blk-mq hardware queues).
 * -b BUFOFF places the I/O buffer BUFOFF bytes (a multiple of 512) past a
 *    page boundary, so the frontend builds segments with first_sect != 0.
 * -d opens with O_DSYNC (each write is a FUA or write+flush), -f ends a
 *    write with fdatasync (a cache flush request).
 * -l MS prints, on stdout, every pwrite/pread/fdatasync that took MS
 *    milliseconds or more: "odio: STALL START MS OP DEV@BYTE", START in
 *    CLOCK_REALTIME seconds (Xen keeps a PV guest's clock with dom0's, so
 *    dom0 can tell which of its actions the stall spans).
 * Exit 0 on success, 1 on a data mismatch or I/O error, 2 on bad usage.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define SECTOR 512
#define MAGIC 0x58424b56u /* "VKBX" little-endian */

static uint64_t splitmix(uint64_t *s)
{
	uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
	return z ^ (z >> 31);
}

static void fill_sector(unsigned char *p, uint32_t seed, uint64_t sector)
{
	uint64_t st = ((uint64_t)seed << 40) ^ sector;
	uint32_t magic = MAGIC;
	memcpy(p, &magic, 4);
	memcpy(p + 4, &seed, 4);
	memcpy(p + 8, &sector, 8);
	for (int i = 16; i < SECTOR; i += 8) {
		uint64_t v = splitmix(&st);
		memcpy(p + i, &v, 8);
	}
}

static void describe(const unsigned char *p, char *out, size_t n)
{
	uint32_t magic, seed;
	uint64_t sector;
	int zero = 1;
	for (int i = 0; i < SECTOR; i++)
		if (p[i]) { zero = 0; break; }
	memcpy(&magic, p, 4);
	memcpy(&seed, p + 4, 4);
	memcpy(&sector, p + 8, 8);
	if (zero)
		snprintf(out, n, "all zeros");
	else if (magic == MAGIC)
		snprintf(out, n, "pattern of seed %" PRIu32 " for sector %" PRIu64, seed, sector);
	else
		snprintf(out, n, "foreign data (first bytes %02x%02x%02x%02x)", p[0], p[1], p[2], p[3]);
}

static uint64_t parse_size(const char *s)
{
	char *end;
	errno = 0;
	unsigned long long v = strtoull(s, &end, 0);
	if (errno || end == s) {
		fprintf(stderr, "odio: bad size '%s'\n", s);
		exit(2);
	}
	switch (*end) {
	case 'k': case 'K': v <<= 10; end++; break;
	case 'm': case 'M': v <<= 20; end++; break;
	case 'g': case 'G': v <<= 30; end++; break;
	}
	if (*end) {
		fprintf(stderr, "odio: bad size '%s'\n", s);
		exit(2);
	}
	return v;
}

enum mode { WRITE, VERIFY, ZERO };

struct job {
	enum mode mode;
	const char *dev;
	uint64_t off, len, chunk, bufoff;
	uint32_t seed;
	int jobs, dsync, fsync_end;
	long stall_ms; /* -l: report I/Os at least this slow (0: none) */
};

static double now_s(clockid_t clock)
{
	struct timespec t;
	clock_gettime(clock, &t);
	return t.tv_sec + t.tv_nsec / 1e9;
}

/* One line per slow I/O, written whole (several processes share stdout). */
static void stall(const struct job *j, double start_real, double took_s, const char *op, uint64_t pos)
{
	if (!j->stall_ms || took_s * 1000 < j->stall_ms)
		return;
	char line[256];
	int n = snprintf(line, sizeof line, "odio: STALL %.3f %.1f %s %s@%" PRIu64 "\n",
			 start_real, took_s * 1000, op, j->dev, pos);
	if (n > 0 && write(1, line, (size_t)n) < 0)
		return;
}

/* One process's share of the work: chunks k, k+jobs, k+2*jobs, ... */
static int run_share(const struct job *j, int k)
{
	int flags = O_DIRECT | (j->mode == WRITE ? O_WRONLY : O_RDONLY) | (j->dsync ? O_DSYNC : 0);
	int fd = open(j->dev, flags);
	if (fd < 0) {
		fprintf(stderr, "odio: open %s: %s\n", j->dev, strerror(errno));
		return 1;
	}
	unsigned char *mem;
	if (posix_memalign((void **)&mem, 4096, j->chunk + 4096)) {
		fprintf(stderr, "odio: out of memory\n");
		return 1;
	}
	unsigned char *buf = mem + j->bufoff;
	unsigned char *want = malloc(SECTOR);
	int bad = 0;
	uint64_t nchunks = (j->len + j->chunk - 1) / j->chunk;
	for (uint64_t c = k; c < nchunks; c += j->jobs) {
		uint64_t pos = j->off + c * j->chunk;
		uint64_t n = j->len - c * j->chunk < j->chunk ? j->len - c * j->chunk : j->chunk;
		if (j->mode == WRITE)
			for (uint64_t s = 0; s < n / SECTOR; s++)
				fill_sector(buf + s * SECTOR, j->seed, pos / SECTOR + s);
		uint64_t done = 0;
		while (done < n) {
			double real0 = now_s(CLOCK_REALTIME), mono0 = now_s(CLOCK_MONOTONIC);
			ssize_t r = j->mode == WRITE ? pwrite(fd, buf + done, n - done, pos + done)
						     : pread(fd, buf + done, n - done, pos + done);
			stall(j, real0, now_s(CLOCK_MONOTONIC) - mono0, j->mode == WRITE ? "pwrite" : "pread", pos + done);
			if (r <= 0) {
				fprintf(stderr, "odio: %s %s at byte %" PRIu64 " (%" PRIu64 " bytes): %s\n",
					j->mode == WRITE ? "pwrite" : "pread", j->dev, pos + done, n - done,
					r == 0 ? "short transfer (end of device?)" : strerror(errno));
				return 1;
			}
			done += r;
		}
		if (j->mode == WRITE)
			continue;
		for (uint64_t s = 0; s < n / SECTOR; s++) {
			unsigned char *got = buf + s * SECTOR;
			if (j->mode == ZERO)
				memset(want, 0, SECTOR);
			else
				fill_sector(want, j->seed, pos / SECTOR + s);
			if (memcmp(got, want, SECTOR)) {
				if (bad < 5) {
					char what[128];
					describe(got, what, sizeof what);
					fprintf(stderr, "odio: MISMATCH at sector %" PRIu64 " (byte %" PRIu64 "): expected %s, found %s\n",
						pos / SECTOR + s, pos + s * SECTOR,
						j->mode == ZERO ? "zeros" : "this seed", what);
				}
				bad++;
			}
		}
	}
	if (j->mode == WRITE && j->fsync_end) {
		double real0 = now_s(CLOCK_REALTIME), mono0 = now_s(CLOCK_MONOTONIC);
		int r = fdatasync(fd);
		stall(j, real0, now_s(CLOCK_MONOTONIC) - mono0, "fdatasync", 0);
		if (r) {
			fprintf(stderr, "odio: fdatasync %s: %s\n", j->dev, strerror(errno));
			return 1;
		}
	}
	if (close(fd)) {
		fprintf(stderr, "odio: close %s: %s\n", j->dev, strerror(errno));
		return 1;
	}
	if (bad)
		fprintf(stderr, "odio: %d bad sectors in this share\n", bad);
	return bad ? 1 : 0;
}

int main(int argc, char **argv)
{
	if (argc < 5) {
		fprintf(stderr, "usage: odio write|verify|zero DEV OFFSET LENGTH [-s SEED] [-c CHUNK] [-j JOBS] [-b BUFOFF] [-d] [-f] [-l MS]\n");
		return 2;
	}
	struct job j = { .dev = argv[2], .seed = 1, .jobs = 1 };
	if (!strcmp(argv[1], "write")) j.mode = WRITE;
	else if (!strcmp(argv[1], "verify")) j.mode = VERIFY;
	else if (!strcmp(argv[1], "zero")) j.mode = ZERO;
	else { fprintf(stderr, "odio: unknown mode %s\n", argv[1]); return 2; }
	j.off = parse_size(argv[3]);
	j.len = parse_size(argv[4]);
	j.chunk = 1 << 20;
	int opt;
	optind = 5;
	while ((opt = getopt(argc, argv, "s:c:j:b:dfl:")) != -1) {
		switch (opt) {
		case 's': j.seed = (uint32_t)parse_size(optarg); break;
		case 'c': j.chunk = parse_size(optarg); break;
		case 'j': j.jobs = (int)parse_size(optarg); break;
		case 'b': j.bufoff = parse_size(optarg); break;
		case 'd': j.dsync = 1; break;
		case 'f': j.fsync_end = 1; break;
		case 'l': j.stall_ms = (long)parse_size(optarg); break;
		default: return 2;
		}
	}
	if (j.chunk > j.len) j.chunk = j.len;
	if (!j.len || j.off % SECTOR || j.len % SECTOR || j.chunk % SECTOR || j.bufoff % SECTOR ||
	    j.bufoff >= 4096 || j.jobs < 1 || j.jobs > 64) {
		fprintf(stderr, "odio: offset/length/chunk/bufoff must be multiples of %d (bufoff < 4096, 1..64 jobs)\n", SECTOR);
		return 2;
	}
	struct timespec t0, t1;
	clock_gettime(CLOCK_MONOTONIC, &t0);
	int rc = 0;
	if (j.jobs == 1) {
		rc = run_share(&j, 0);
	} else {
		for (int k = 0; k < j.jobs; k++) {
			pid_t p = fork();
			if (p < 0) { perror("odio: fork"); return 1; }
			if (p == 0) _exit(run_share(&j, k));
		}
		for (int k = 0; k < j.jobs; k++) {
			int st;
			if (wait(&st) < 0 || !WIFEXITED(st) || WEXITSTATUS(st)) rc = 1;
		}
	}
	clock_gettime(CLOCK_MONOTONIC, &t1);
	long ms = (t1.tv_sec - t0.tv_sec) * 1000 + (t1.tv_nsec - t0.tv_nsec) / 1000000;
	printf("odio: %s %s off=%" PRIu64 " len=%" PRIu64 " seed=%" PRIu32 " chunk=%" PRIu64 " jobs=%d bufoff=%" PRIu64 "%s%s: %s in %ld ms\n",
	       argv[1], j.dev, j.off, j.len, j.seed, j.chunk, j.jobs, j.bufoff, j.dsync ? " dsync" : "",
	       j.fsync_end ? " fdatasync" : "", rc ? "FAILED" : "ok", ms);
	return rc;
}
