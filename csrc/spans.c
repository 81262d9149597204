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

/* The last i < n with start[i] <= pos (start ascending, start[0] <= pos): the
 * span that holds pos, zero-length spans before it skipped. */
static size_t span_at(const uint64_t *start, size_t n, uint64_t pos)
{
    size_t lo = 0, hi = n - 1;
    while (lo < hi) {
        size_t mid = lo + (hi - lo + 1) / 2;
        if (start[mid] <= pos)
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
    for (size_t i = span_at(c->start, c->n, pos); pos < end && i < c->n; i++) {
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

/* ---- copies with checksums ----------------------------------------------- */

#define FUSE_PIECE (1u << 20)    /* bytes per task */
#define FUSE_STEP (48u * 1024u)  /* copied, then checksummed while still in L2 */

/* Task k is piece k - first[i] of span i (first[n] = number of tasks). */
struct copy_crc_job {
    const uint64_t *src, *dst, *len;
    const uint64_t *first;
    uint32_t *piece_crc;
    size_t n;
    uint64_t piece;
    int streaming;
};

static void copy_crc_task(void *ctx, size_t task)
{
    const struct copy_crc_job *c = ctx;
    size_t lo = span_at(c->first, c->n, task);
    uint64_t off = (uint64_t)(task - c->first[lo]) * c->piece;
    uint64_t end = off + c->piece < c->len[lo] ? off + c->piece : c->len[lo];
    const char *s = (const char *)(uintptr_t)c->src[lo];
    char *d = (char *)(uintptr_t)c->dst[lo];
    uint32_t reg = ~0u;
    for (uint64_t pos = off; pos < end;) {
        size_t take = end - pos < FUSE_STEP ? (size_t)(end - pos) : FUSE_STEP;
        kv_copy(d + pos, s + pos, take, c->streaming);
        reg = kv_crc32c_update(reg, s + pos, take);
        pos += take;
    }
    c->piece_crc[task] = ~reg;
}

int kv_copy_crc_spans(const uint64_t *src, const uint64_t *dst, const uint64_t *len,
                      uint32_t *out, size_t n, int threads)
{
    if (!n)
        return 0;
    uint64_t total = 0;
    for (size_t i = 0; i < n; i++)
        total += len[i];
    uint64_t piece = threads <= 1 || total < KV_INLINE_BYTES ? UINT64_MAX : FUSE_PIECE;
    uint64_t *first = malloc((n + 1) * sizeof(uint64_t));
    if (!first)
        return ENOMEM;
    first[0] = 0;
    for (size_t i = 0; i < n; i++)
        first[i + 1] = first[i] + (len[i] ? (len[i] - 1) / piece + 1 : 1);
    uint32_t *piece_crc = malloc(first[n] * sizeof(uint32_t));
    if (!piece_crc) {
        free(first);
        return ENOMEM;
    }
    struct copy_crc_job job = {src, dst, len, first, piece_crc, n, piece,
                               total >= KV_STREAM_BYTES && kv_copy_streaming()};
    kv_pool_run(copy_crc_task, &job, (size_t)first[n], piece == UINT64_MAX ? 1 : threads);
    for (size_t i = 0; i < n; i++) {
        uint32_t crc = piece_crc[first[i]];
        for (uint64_t k = first[i] + 1; k < first[i + 1]; k++) {
            uint64_t at = (uint64_t)(k - first[i]) * piece;
            uint64_t rest = len[i] - at;
            crc = kv_crc32c_combine(crc, piece_crc[k], rest < piece ? rest : piece);
        }
        out[i] = crc;
    }
    free(piece_crc);
    free(first);
    return 0;
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

/* ---- checksummed block I/O ----------------------------------------------
 * Task t moves piece t % pieces of block t / pieces and checksums its bytes
 * in segments (segment = min(piece, chunk) bytes, so no segment straddles a
 * chunk boundary): after a read, before a write, on the same thread, so one
 * piece is checksummed while the others' I/O is in flight. The caller then
 * joins segment CRCs into chunk CRCs and those into the block's checksum. */

struct block_job {
    int write;
    const int *fds;
    const int64_t *offsets;
    const uint64_t *addrs;
    uint64_t block_len, piece_len, seg_len;
    size_t pieces, segs;
    int64_t *piece_result;
    uint32_t *seg_crc;
};

static void checksum_piece(const struct block_job *j, size_t b, uint64_t start, uint64_t len)
{
    const char *base = (const char *)(uintptr_t)j->addrs[b];
    for (uint64_t pos = start; pos < start + len; pos += j->seg_len) {
        uint64_t take = start + len - pos < j->seg_len ? start + len - pos : j->seg_len;
        j->seg_crc[b * j->segs + pos / j->seg_len] = kv_crc32c(0, base + pos, (size_t)take);
    }
}

static void block_task(void *ctx, size_t task)
{
    const struct block_job *j = ctx;
    size_t b = task / j->pieces;
    uint64_t start = (uint64_t)(task % j->pieces) * j->piece_len;
    uint64_t len = j->block_len - start < j->piece_len ? j->block_len - start : j->piece_len;
    int64_t off = j->offsets[b];
    if (off < 0 || (uint64_t)off > (uint64_t)INT64_MAX - j->block_len) {
        j->piece_result[task] = -EINVAL;
        return;
    }
    char *p = (char *)(uintptr_t)(j->addrs[b] + start);
    if (j->write)
        checksum_piece(j, b, start, len);
    int64_t r = io_one(j->write, j->fds[b], off + (int64_t)start, p, len);
    if (!j->write && r == (int64_t)len)
        checksum_piece(j, b, start, len);
    j->piece_result[task] = r;
}

/* Bytes moved by block b's pieces, or the first -errno among them. */
static int64_t block_result(const struct block_job *j, size_t b)
{
    int64_t moved = 0;
    for (size_t p = 0; p < j->pieces; p++) {
        int64_t r = j->piece_result[b * j->pieces + p];
        if (r < 0)
            return r;
        moved += r;
    }
    return moved;
}

/* Block b's checksum from its segment CRCs: segments joined into chunk CRCs,
 * the chunk CRCs (little-endian, whatever the CPU) checksummed in `table`. */
static uint32_t block_checksum(const struct block_job *j, size_t b, uint64_t chunk_len,
                               unsigned char *table)
{
    const uint32_t *seg = j->seg_crc + b * j->segs;
    size_t per_chunk = (size_t)(chunk_len / j->seg_len), chunks = 0;
    for (size_t k = 0; k < j->segs; chunks++) {
        size_t end = k + per_chunk < j->segs ? k + per_chunk : j->segs;
        uint32_t crc = seg[k];
        for (k++; k < end; k++) {
            uint64_t rest = j->block_len - (uint64_t)k * j->seg_len;
            crc = kv_crc32c_combine(crc, seg[k], rest < j->seg_len ? rest : j->seg_len);
        }
        for (int i = 0; i < 4; i++)
            table[4 * chunks + i] = (unsigned char)(crc >> (8 * i));
    }
    return kv_crc32c(0, table, chunks * 4);
}

int kv_io_blocks(int write, const int *fds, const int64_t *offsets, const uint64_t *addrs,
                 size_t n, uint64_t block_len, uint64_t chunk_len, uint64_t piece_len,
                 int64_t *results, uint32_t *crcs, int threads)
{
    if (n == 0)
        return 0;
    if (piece_len == 0 || piece_len > block_len)
        piece_len = block_len;
    struct block_job job = {write, fds, offsets, addrs, block_len, piece_len, 0, 0, 0, NULL, NULL};
    job.seg_len = piece_len < chunk_len ? piece_len : chunk_len;
    job.pieces = (size_t)((block_len + piece_len - 1) / piece_len);
    job.segs = (size_t)((block_len + job.seg_len - 1) / job.seg_len);
    size_t chunks = (size_t)((block_len + chunk_len - 1) / chunk_len);
    job.piece_result = malloc(n * job.pieces * sizeof(int64_t));
    job.seg_crc = malloc(n * job.segs * sizeof(uint32_t));
    unsigned char *table = malloc(chunks * 4);
    if (!job.piece_result || !job.seg_crc || !table) {
        free(job.piece_result);
        free(job.seg_crc);
        free(table);
        return ENOMEM;
    }
    kv_pool_run(block_task, &job, n * job.pieces, threads);
    for (size_t b = 0; b < n; b++) {
        results[b] = block_result(&job, b);
        crcs[b] = results[b] == (int64_t)block_len ? block_checksum(&job, b, chunk_len, table) : 0;
    }
    free(job.piece_result);
    free(job.seg_crc);
    free(table);
    return 0;
}
