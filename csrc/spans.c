#define _GNU_SOURCE
#include "spans.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "copy.h"
#include "crc32c.h"
#include "pool.h"

#define MIN_CHUNK (64u * 1024u)
#define CHUNKS_PER_THREAD 4
#define MAX_IO_CALL ((size_t)1 << 30) /* Linux moves at most ~2 GiB per call */

/* ---- copies ------------------------------------------------------------ */

/* The spans are laid end to end into one virtual range of `total` bytes;
 * task k copies bytes [k * chunk, (k + 1) * chunk) of it. */
struct copy_job {
    const uint64_t *src, *dst, *len;
    const uint64_t *start; /* start[i]: virtual offset of span i; start[n] = total */
    size_t n;
    uint64_t chunk, total;
    int streaming;
};

static size_t span_at(const struct copy_job *c, uint64_t pos)
{
    /* last span i with start[i] <= pos (zero-length spans before it skipped) */
    size_t lo = 0, hi = c->n - 1;
    while (lo < hi) {
        size_t mid = lo + (hi - lo + 1) / 2;
        if (c->start[mid] <= pos)
            lo = mid;
        else
            hi = mid - 1;
    }
    return lo;
}

static void copy_task(void *ctx, size_t task)
{
    const struct copy_job *c = ctx;
    uint64_t pos = (uint64_t)task * c->chunk;
    uint64_t end = pos + c->chunk < c->total ? pos + c->chunk : c->total;
    for (size_t i = span_at(c, pos); pos < end && i < c->n; i++) {
        uint64_t off = pos - c->start[i];
        uint64_t take = c->len[i] - off;
        if (take > end - pos)
            take = end - pos;
        if (take)
            kv_copy((char *)(uintptr_t)(c->dst[i] + off),
                    (const char *)(uintptr_t)(c->src[i] + off), (size_t)take, c->streaming);
        pos += take;
    }
}

int kv_copy_spans(const uint64_t *src, const uint64_t *dst, const uint64_t *len, size_t n,
                  int threads)
{
    uint64_t total = 0;
    for (size_t i = 0; i < n; i++)
        total += len[i];
    int streaming = total >= KV_STREAM_BYTES && kv_copy_streaming();
    if (threads <= 1 || total < KV_INLINE_BYTES) {
        for (size_t i = 0; i < n; i++)
            if (len[i])
                kv_copy((void *)(uintptr_t)dst[i], (const void *)(uintptr_t)src[i],
                        (size_t)len[i], streaming);
        return 0;
    }
    uint64_t *start = malloc((n + 1) * sizeof(uint64_t));
    if (!start)
        return ENOMEM;
    start[0] = 0;
    for (size_t i = 0; i < n; i++)
        start[i + 1] = start[i] + len[i];
    uint64_t chunk = (total + (uint64_t)threads * CHUNKS_PER_THREAD - 1) /
                     ((uint64_t)threads * CHUNKS_PER_THREAD);
    chunk = (chunk + 4095) & ~(uint64_t)4095;
    if (chunk < MIN_CHUNK)
        chunk = MIN_CHUNK;
    struct copy_job job = {src, dst, len, start, n, chunk, total, streaming};
    kv_pool_run(copy_task, &job, (size_t)((total + chunk - 1) / chunk), threads);
    free(start);
    return 0;
}

/* ---- checksums --------------------------------------------------------- */

struct crc_job {
    const uint64_t *addr, *len;
    uint32_t *out;
};

static void crc_task(void *ctx, size_t i)
{
    const struct crc_job *c = ctx;
    c->out[i] = kv_crc32c(0, (const void *)(uintptr_t)c->addr[i], (size_t)c->len[i]);
}

void kv_crc32c_spans(const uint64_t *addr, const uint64_t *len, uint32_t *out, size_t n,
                     int threads)
{
    uint64_t total = 0;
    for (size_t i = 0; i < n; i++)
        total += len[i];
    struct crc_job job = {addr, len, out};
    if (total < KV_INLINE_BYTES)
        threads = 1;
    kv_pool_run(crc_task, &job, n, threads);
}

/* ---- positional I/O ---------------------------------------------------- */

static int64_t io_one(int write, int fd, int64_t offset, char *p, uint64_t len)
{
    if (offset < 0 || (uint64_t)offset > (uint64_t)INT64_MAX - len)
        return -EINVAL;
    uint64_t done = 0;
    int short_read = 0;
    while (done < len) {
        size_t want = len - done < MAX_IO_CALL ? (size_t)(len - done) : MAX_IO_CALL;
        ssize_t r = write ? pwrite(fd, p + done, want, offset + (int64_t)done)
                          : pread(fd, p + done, want, offset + (int64_t)done);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            /* After a short O_DIRECT read that stopped at an unaligned end of
             * file, asking again at that unaligned offset fails with EINVAL:
             * that is end of file, not an error. */
            if (!write && short_read && errno == EINVAL)
                break;
            return -errno;
        }
        if (r == 0)
            break; /* end of file (read) or no progress (write): a short count */
        short_read = (size_t)r < want;
        done += (uint64_t)r;
    }
    return (int64_t)done;
}

struct io_job {
    int write;
    struct kv_io *reqs;
};

static void io_task(void *ctx, size_t i)
{
    const struct io_job *j = ctx;
    struct kv_io *r = &j->reqs[i];
    r->result = r->len ? io_one(j->write, r->fd, r->offset, (char *)(uintptr_t)r->addr, r->len)
                       : 0;
}

void kv_io_spans(int write, struct kv_io *reqs, size_t n, int threads)
{
    struct io_job job = {write, reqs};
    kv_pool_run(io_task, &job, n, threads);
}
