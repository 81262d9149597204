/* CRC32C (Castagnoli), reflected, as used for kvtier block checksums.
 *
 * The functions work on the raw shift register: callers apply the standard
 * conditioning themselves (crc = ~kv_crc32c_update(~value, buf, n)), which is
 * what makes chaining across buffers work like zlib.crc32.
 */
#ifndef KVTIER_CRC32C_H
#define KVTIER_CRC32C_H

#include <stddef.h>
#include <stdint.h>

/* Build the tables and pick the implementation. Idempotent and thread-safe. */
void kv_crc32c_init(void);

/* 1 when kv_crc32c_update uses a CPU instruction, 0 for the table fallback. */
int kv_crc32c_hardware(void);

/* Update the raw register with n bytes, fastest implementation available. */
uint32_t kv_crc32c_update(uint32_t reg, const void *buf, size_t n);

/* Same result through the portable slice-by-8 tables, whatever the CPU. */
uint32_t kv_crc32c_update_sw(uint32_t reg, const void *buf, size_t n);

/* Conditioned CRC32C of buf, continuing from a previous result `value`. */
static inline uint32_t kv_crc32c(uint32_t value, const void *buf, size_t n)
{
    return ~kv_crc32c_update(~value, buf, n);
}

/* CRC32C of A followed by B, from crc1 = CRC32C(A), crc2 = CRC32C(B) and
 * len2 = len(B): what lets separate threads checksum parts of one buffer. */
uint32_t kv_crc32c_combine(uint32_t crc1, uint32_t crc2, uint64_t len2);

#endif
