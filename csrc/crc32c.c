/* CRC32C: hardware instruction where the CPU has one, slice-by-8 tables elsewhere.
 *
 * x86-64: SSE4.2 `crc32` is enabled per function (target attribute) and chosen
 * at run time, so the library runs on any x86-64. The instruction has a latency
 * of three cycles and a throughput of one, so long buffers are cut into three
 * streams that are checksummed together and joined with a "shift by N zero
 * bytes" operator (four 256-entry tables per stream length).
 * aarch64: the ARMv8 CRC32C instructions, when the kernel reports them.
 * Anything else: slice-by-8 tables on little-endian, one table otherwise.
 */
#include "crc32c.h"

#include <pthread.h>
#include <string.h>

#if defined(__x86_64__) || defined(__i386__)
#include <nmmintrin.h>
#define KV_CRC_X86 1
#elif defined(__aarch64__) && defined(__linux__)
#include <arm_acle.h>
#include <sys/auxv.h>
#ifndef HWCAP_CRC32
#define HWCAP_CRC32 (1 << 7)
#endif
#define KV_CRC_ARM 1
#endif

#define POLY 0x82F63B78u    /* Castagnoli, bit-reflected */
#define LONG_BLOCK 8192     /* bytes per stream in the 3-way loop */
#define SHORT_BLOCK 256

static uint32_t table[8][256];          /* table[k][b]: byte b then k zero bytes */
static uint32_t shift_long[4][256];     /* register after LONG_BLOCK zero bytes */
static uint32_t shift_short[4][256];    /* register after SHORT_BLOCK zero bytes */
static int use_hardware;
static pthread_once_t init_once = PTHREAD_ONCE_INIT;

static uint32_t zeros_sw(uint32_t reg, size_t n)
{
    while (n--)
        reg = table[0][reg & 0xff] ^ (reg >> 8);
    return reg;
}

/* Tabulate the linear map reg -> reg after n zero bytes, one table per byte
 * of reg: apply it to the 32 basis bits, then combine by XOR. */
static void build_shift(uint32_t out[4][256], size_t n)
{
    uint32_t basis[32];
    for (int bit = 0; bit < 32; bit++)
        basis[bit] = zeros_sw(1u << bit, n);
    for (int k = 0; k < 4; k++) {
        for (int b = 0; b < 256; b++) {
            uint32_t v = 0;
            for (int i = 0; i < 8; i++)
                if (b & (1 << i))
                    v ^= basis[8 * k + i];
            out[k][b] = v;
        }
    }
}

static inline uint32_t apply_shift(const uint32_t t[4][256], uint32_t reg)
{
    return t[0][reg & 0xff] ^ t[1][(reg >> 8) & 0xff] ^ t[2][(reg >> 16) & 0xff] ^
           t[3][reg >> 24];
}

uint32_t kv_crc32c_update_sw(uint32_t reg, const void *buf, size_t n)
{
    const uint8_t *p = buf;
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    while (n && ((uintptr_t)p & 7)) {
        reg = table[0][(reg ^ *p++) & 0xff] ^ (reg >> 8);
        n--;
    }
    while (n >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        w ^= reg;
        reg = table[7][w & 0xff] ^ table[6][(w >> 8) & 0xff] ^ table[5][(w >> 16) & 0xff] ^
              table[4][(w >> 24) & 0xff] ^ table[3][(w >> 32) & 0xff] ^
              table[2][(w >> 40) & 0xff] ^ table[1][(w >> 48) & 0xff] ^ table[0][w >> 56];
        p += 8;
        n -= 8;
    }
#endif
    while (n--)
        reg = table[0][(reg ^ *p++) & 0xff] ^ (reg >> 8);
    return reg;
}

#if defined(KV_CRC_X86)
#define HW_TARGET __attribute__((target("sse4.2")))
#define HW_U8(c, b) _mm_crc32_u8((c), (b))
#if defined(__x86_64__)
#define HW_WORD(c, w) ((uint32_t)_mm_crc32_u64((c), (w)))
#endif
#elif defined(KV_CRC_ARM)
#if defined(__clang__)
#define HW_TARGET __attribute__((target("crc")))
#else
#define HW_TARGET __attribute__((target("+crc")))
#endif
#define HW_U8(c, b) __crc32cb((c), (b))
#define HW_WORD(c, w) __crc32cd((c), (w))
#endif

#if defined(HW_WORD)
static inline uint64_t load64(const uint8_t *p)
{
    uint64_t w;
    memcpy(&w, p, 8);
    return w;
}

/* Three streams of `block` bytes each, joined with the shift tables. */
#define THREE_WAY(block, shift)                                                 \
    while (n >= 3 * (block)) {                                                  \
        uint32_t c0 = reg, c1 = 0, c2 = 0;                                      \
        const uint8_t *end = p + (block);                                       \
        do {                                                                    \
            c0 = HW_WORD(c0, load64(p));                                        \
            c1 = HW_WORD(c1, load64(p + (block)));                              \
            c2 = HW_WORD(c2, load64(p + 2 * (block)));                          \
            p += 8;                                                             \
        } while (p < end);                                                      \
        reg = apply_shift(shift, apply_shift(shift, c0) ^ c1) ^ c2;             \
        p += 2 * (block);                                                       \
        n -= 3 * (block);                                                       \
    }

HW_TARGET static uint32_t update_hw(uint32_t reg, const void *buf, size_t n)
{
    const uint8_t *p = buf;
    while (n && ((uintptr_t)p & 7)) {
        reg = HW_U8(reg, *p++);
        n--;
    }
    THREE_WAY(LONG_BLOCK, shift_long)
    THREE_WAY(SHORT_BLOCK, shift_short)
    while (n >= 8) {
        reg = HW_WORD(reg, load64(p));
        p += 8;
        n -= 8;
    }
    while (n--)
        reg = HW_U8(reg, *p++);
    return reg;
}
#endif

static int detect_hardware(void)
{
#if defined(KV_CRC_X86) && defined(HW_WORD)
    __builtin_cpu_init();
    return __builtin_cpu_supports("sse4.2") ? 1 : 0;
#elif defined(KV_CRC_ARM)
    return (getauxval(AT_HWCAP) & HWCAP_CRC32) ? 1 : 0;
#else
    return 0;
#endif
}

static void init_tables(void)
{
    for (uint32_t b = 0; b < 256; b++) {
        uint32_t c = b;
        for (int i = 0; i < 8; i++)
            c = (c & 1) ? (c >> 1) ^ POLY : c >> 1;
        table[0][b] = c;
    }
    for (int k = 1; k < 8; k++)
        for (int b = 0; b < 256; b++)
            table[k][b] = (table[k - 1][b] >> 8) ^ table[0][table[k - 1][b] & 0xff];
    build_shift(shift_long, LONG_BLOCK);
    build_shift(shift_short, SHORT_BLOCK);
    use_hardware = detect_hardware();
}

void kv_crc32c_init(void)
{
    pthread_once(&init_once, init_tables);
}

int kv_crc32c_hardware(void)
{
    kv_crc32c_init();
    return use_hardware;
}

uint32_t kv_crc32c_update(uint32_t reg, const void *buf, size_t n)
{
#if defined(HW_WORD)
    if (use_hardware)
        return update_hw(reg, buf, n);
#endif
    return kv_crc32c_update_sw(reg, buf, n);
}

/* ---- combining ------------------------------------------------------------
 * Polynomials over GF(2) mod the Castagnoli polynomial, bit-reflected (bit 31
 * is x^0). Appending n bytes multiplies the register by x^(8n); x^(2^k) for
 * k < 64 is tabulated once, so shifting by any length takes at most 64
 * multiplications. */

static uint32_t gf2_mul(uint32_t a, uint32_t b)
{
    uint32_t product = 0;
    for (uint32_t bit = 1u << 31; bit; bit >>= 1) {
        if (a & bit)
            product ^= b;
        b = (b & 1) ? (b >> 1) ^ POLY : b >> 1; /* b *= x */
    }
    return product;
}

static uint32_t x_pow2[64];                /* x_pow2[k] = x^(2^k) */
static pthread_once_t pow_once = PTHREAD_ONCE_INIT;

static void init_pow2(void)
{
    x_pow2[0] = 1u << 30;                  /* x^1 */
    for (int k = 1; k < 64; k++)
        x_pow2[k] = gf2_mul(x_pow2[k - 1], x_pow2[k - 1]);
}

uint32_t kv_crc32c_combine(uint32_t crc1, uint32_t crc2, uint64_t len2)
{
    pthread_once(&pow_once, init_pow2);
    uint32_t shift = 1u << 31;             /* x^0 */
    for (int k = 3; len2; len2 >>= 1, k++) /* x^(8 * len2) = product of x^(2^k), k = 3.. */
        if (len2 & 1)
            shift = gf2_mul(x_pow2[k & 63], shift);
    return gf2_mul(shift, crc1) ^ crc2;
}

