/* Host memory copies: the C library's memcpy, or streaming (non-temporal)
 * stores for batches too big to stay in cache, where skipping the cache makes
 * copies up to twice as fast (no read-for-ownership of the destination).
 */
#ifndef KVTIER_COPY_H
#define KVTIER_COPY_H

#include <stddef.h>

/* Batches of at least this many bytes are copied with streaming stores. */
#define KV_STREAM_BYTES (1u << 20)

/* Detect the CPU's vector stores once. Idempotent and thread-safe. */
void kv_copy_init(void);

/* 1 when streaming stores are available and enabled. */
int kv_copy_streaming(void);

/* Turn streaming stores off (0) or back on (1, where the CPU has them);
 * for benchmarks that compare against the plain memcpy path. */
void kv_copy_set_streaming(int enabled);

/* memcpy(dst, src, n), through the cache or around it. */
void kv_copy(void *dst, const void *src, size_t n, int streaming);

#endif
