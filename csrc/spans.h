/* Batched byte moves over the thread pool: copies, checksums and positional
 * file I/O, each described by arrays of spans. No Python here: the binding
 * validates every array and calls these with the GIL released.
 */
#ifndef KVTIER_SPANS_H
#define KVTIER_SPANS_H

#include <stddef.h>
#include <stdint.h>

/* Below this many bytes a batch runs on the calling thread. */
#define KV_INLINE_BYTES (256u * 1024u)

/* memcpy(dst[i], src[i], len[i]) for every span; big spans are cut into chunks
 * so that even one span keeps every thread busy. Returns 0, or ENOMEM. */
int kv_copy_spans(const uint64_t *src, const uint64_t *dst, const uint64_t *len, size_t n,
                  int threads);

/* out[i] = CRC32C of span i (fresh, conditioned). */
void kv_crc32c_spans(const uint64_t *addr, const uint64_t *len, uint32_t *out, size_t n,
                     int threads);

/* memcpy(dst[i], src[i], len[i]) and out[i] = CRC32C of the bytes copied, in one
 * pass: each piece is checksummed from the cache right after it is copied, so
 * the bytes cross memory once instead of twice. Spans are cut into pieces
 * that move in parallel; piece checksums are combined. Returns 0, or ENOMEM. */
int kv_copy_crc_spans(const uint64_t *src, const uint64_t *dst, const uint64_t *len,
                      uint32_t *out, size_t n, int threads);

/* One positional I/O request; `result` is bytes moved or -errno. */
struct kv_io {
    int fd;
    int64_t offset;
    uint64_t addr;
    uint64_t len;
    int64_t result;
};

/* pread (write == 0) or pwrite (write == 1) every request, looping on short
 * transfers and retrying EINTR. A read that meets end of file returns the
 * bytes it got. Errors land in result as -errno; nothing is raised. */
void kv_io_spans(int write, struct kv_io *reqs, size_t n, int threads);

/* Checksummed block I/O: block i is block_len bytes at offsets[i] of fds[i] and
 * at addrs[i] in memory; its checksum is the CRC32C of the little-endian
 * CRC32Cs of its chunk_len-byte chunks (the last one may be shorter). Blocks
 * are cut into pieces of piece_len bytes (0 or more than block_len: whole
 * blocks) that move in parallel, each checksummed by the thread that moves it
 * (after a read, before a write). piece_len must divide chunk_len or be a
 * multiple of it, unless it is the whole block. results[i] is the bytes moved
 * or the first -errno of its pieces; crcs[i] is the checksum when results[i]
 * == block_len (of the bytes read, or of the bytes written), else 0.
 * Returns 0, or ENOMEM before any I/O. */
int kv_io_blocks(int write, const int *fds, const int64_t *offsets, const uint64_t *addrs,
                 size_t n, uint64_t block_len, uint64_t chunk_len, uint64_t piece_len,
                 int64_t *results, uint32_t *crcs, int threads);

#endif
