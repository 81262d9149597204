/* A persistent pool of worker threads for kvtier's batched native ops.
 *
 * Workers are created on first use (growing up to the largest request, capped
 * at KV_POOL_MAX_THREADS) and live until the process exits. A job is a count of
 * independent tasks; the calling thread works on its own job too, so a job makes
 * progress even when every worker is busy with someone else's. Several threads
 * may run jobs at once. After fork() the child starts with an empty pool.
 */
#ifndef KVTIER_POOL_H
#define KVTIER_POOL_H

#include <stddef.h>

#define KV_POOL_MAX_THREADS 64

typedef void (*kv_task_fn)(void *ctx, size_t task);

/* Run fn(ctx, i) for every i in [0, num_tasks) on up to `threads` threads
 * (the caller included) and return when all have finished. Never fails: if
 * workers cannot be created, the caller runs the tasks itself. */
void kv_pool_run(kv_task_fn fn, void *ctx, size_t num_tasks, int threads);

/* Number of worker threads started so far (the caller not included). */
int kv_pool_num_workers(void);

/* Number of online CPUs this process may run on (at least 1). */
int kv_num_cpus(void);

#endif
