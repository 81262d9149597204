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

#endif
