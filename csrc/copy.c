#include "copy.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__)
#include <immintrin.h>
#define KV_COPY_X86 1
#endif

#define MIN_STREAM_PIECE 4096 /* shorter pieces are not worth the fence */

#if defined(KV_COPY_X86)
static int have_avx2;
#endif
static atomic_int streaming_on;
static pthread_once_t init_once = PTHREAD_ONCE_INIT;

#if defined(KV_COPY_X86)
/* Aligns the destination to 32 bytes with an ordinary copy, streams 128-byte
 * strides, then copies the tail. The fence orders the streamed stores before
 * anything the caller does next (they are weakly ordered). */
__attribute__((target("avx2"))) static void stream_avx2(char *d, const char *s, size_t n)
{
    size_t head = (32 - ((uintptr_t)d & 31)) & 31;
    memcpy(d, s, head);
    d += head, s += head, n -= head;
    for (; n >= 128; d += 128, s += 128, n -= 128) {
        __m256i a = _mm256_loadu_si256((const __m256i *)s);
        __m256i b = _mm256_loadu_si256((const __m256i *)(s + 32));
        __m256i c = _mm256_loadu_si256((const __m256i *)(s + 64));
        __m256i e = _mm256_loadu_si256((const __m256i *)(s + 96));
        _mm256_stream_si256((__m256i *)d, a);
        _mm256_stream_si256((__m256i *)(d + 32), b);
        _mm256_stream_si256((__m256i *)(d + 64), c);
        _mm256_stream_si256((__m256i *)(d + 96), e);
    }
    _mm_sfence();
    memcpy(d, s, n);
}

/* The same with SSE2, which every x86-64 CPU has. */
static void stream_sse2(char *d, const char *s, size_t n)
{
    size_t head = (16 - ((uintptr_t)d & 15)) & 15;
    memcpy(d, s, head);
    d += head, s += head, n -= head;
    for (; n >= 64; d += 64, s += 64, n -= 64) {
        __m128i a = _mm_loadu_si128((const __m128i *)s);
        __m128i b = _mm_loadu_si128((const __m128i *)(s + 16));
        __m128i c = _mm_loadu_si128((const __m128i *)(s + 32));
        __m128i e = _mm_loadu_si128((const __m128i *)(s + 48));
        _mm_stream_si128((__m128i *)d, a);
        _mm_stream_si128((__m128i *)(d + 16), b);
        _mm_stream_si128((__m128i *)(d + 32), c);
        _mm_stream_si128((__m128i *)(d + 48), e);
    }
    _mm_sfence();
    memcpy(d, s, n);
}
#endif

static void detect(void)
{
#if defined(KV_COPY_X86)
    __builtin_cpu_init();
    have_avx2 = __builtin_cpu_supports("avx2") ? 1 : 0;
    atomic_store(&streaming_on, 1);
#else
    atomic_store(&streaming_on, 0);
#endif
}

void kv_copy_init(void) { pthread_once(&init_once, detect); }

int kv_copy_streaming(void)
{
    kv_copy_init();
    return atomic_load(&streaming_on);
}

void kv_copy_set_streaming(int enabled)
{
    kv_copy_init();
#if defined(KV_COPY_X86)
    atomic_store(&streaming_on, enabled ? 1 : 0);
#else
    (void)enabled;
#endif
}

void kv_copy(void *dst, const void *src, size_t n, int streaming)
{
#if defined(KV_COPY_X86)
    if (streaming && n >= MIN_STREAM_PIECE) {
        if (have_avx2)
            stream_avx2(dst, src, n);
        else
            stream_sse2(dst, src, n);
        return;
    }
#else
    (void)streaming;
#endif
    memcpy(dst, src, n);
}
