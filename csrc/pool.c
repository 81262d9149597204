#define _GNU_SOURCE
#include "pool.h"

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <unistd.h>

struct job {
    kv_task_fn fn;
    void *ctx;
    size_t num_tasks;
    atomic_size_t next_task;
    int max_helpers;  /* workers allowed on this job besides the caller */
    int num_helpers;  /* workers on it now; guarded by pool.lock */
    struct job *prev, *next;
};

static struct {
    pthread_mutex_t lock;
    pthread_cond_t work;  /* a job with tasks left was queued */
    pthread_cond_t idle;  /* some job's last helper left it */
    struct job *head;     /* jobs that may still have unclaimed tasks */
    int num_workers;
} pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, PTHREAD_COND_INITIALIZER,
          NULL, 0};

static pthread_once_t atfork_once = PTHREAD_ONCE_INIT;

static void run_tasks(struct job *job)
{
    for (;;) {
        size_t i = atomic_fetch_add_explicit(&job->next_task, 1, memory_order_relaxed);
        if (i >= job->num_tasks)
            return;
        job->fn(job->ctx, i);
    }
}

static struct job *claimable_job(void)
{
    for (struct job *j = pool.head; j; j = j->next)
        if (j->num_helpers < j->max_helpers &&
            atomic_load_explicit(&j->next_task, memory_order_relaxed) < j->num_tasks)
            return j;
    return NULL;
}

static void *worker_main(void *arg)
{
    (void)arg;
    pthread_setname_np(pthread_self(), "kvtier-pool"); /* so profilers can tell kvtier's time */
    pthread_mutex_lock(&pool.lock);
    for (;;) {
        struct job *job = claimable_job();
        if (!job) {
            pthread_cond_wait(&pool.work, &pool.lock);
            continue;
        }
        job->num_helpers++;
        pthread_mutex_unlock(&pool.lock);
        run_tasks(job);
        pthread_mutex_lock(&pool.lock);
        /* The caller frees `job` (it lives on its stack) once this reaches 0. */
        if (--job->num_helpers == 0)
            pthread_cond_broadcast(&pool.idle);
    }
    return NULL;
}

static void unlink_job(struct job *job)
{
    if (job->prev)
        job->prev->next = job->next;
    else if (pool.head == job)
        pool.head = job->next;
    if (job->next)
        job->next->prev = job->prev;
    job->prev = job->next = NULL;
}

static void before_fork(void) { pthread_mutex_lock(&pool.lock); }
static void after_fork_parent(void) { pthread_mutex_unlock(&pool.lock); }

static void after_fork_child(void)
{
    /* Only the forking thread exists in the child: forget the workers and the
     * jobs of other threads, and start over with fresh synchronisation. */
    pthread_mutex_init(&pool.lock, NULL);
    pthread_cond_init(&pool.work, NULL);
    pthread_cond_init(&pool.idle, NULL);
    pool.head = NULL;
    pool.num_workers = 0;
}

static void register_atfork(void)
{
    pthread_atfork(before_fork, after_fork_parent, after_fork_child);
}

/* Called with pool.lock held. */
static void grow_workers(int wanted)
{
    if (wanted > KV_POOL_MAX_THREADS - 1)
        wanted = KV_POOL_MAX_THREADS - 1;
    while (pool.num_workers < wanted) {
        pthread_t tid;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        pthread_attr_setstacksize(&attr, 256 * 1024);
        int rc = pthread_create(&tid, &attr, worker_main, NULL);
        pthread_attr_destroy(&attr);
        if (rc != 0)
            break; /* run with the workers we have */
        pool.num_workers++;
    }
}

void kv_pool_run(kv_task_fn fn, void *ctx, size_t num_tasks, int threads)
{
    struct job job = {.fn = fn, .ctx = ctx, .num_tasks = num_tasks};
    atomic_init(&job.next_task, 0);
    if (threads <= 1 || num_tasks <= 1) {
        run_tasks(&job);
        return;
    }
    pthread_once(&atfork_once, register_atfork);
    int helpers = threads - 1;
    if ((size_t)helpers > num_tasks - 1)
        helpers = (int)(num_tasks - 1);
    job.max_helpers = helpers;

    pthread_mutex_lock(&pool.lock);
    grow_workers(threads - 1);
    job.next = pool.head;
    if (pool.head)
        pool.head->prev = &job;
    pool.head = &job;
    for (int i = 0; i < helpers; i++)
        pthread_cond_signal(&pool.work);
    pthread_mutex_unlock(&pool.lock);

    run_tasks(&job);

    pthread_mutex_lock(&pool.lock);
    unlink_job(&job); /* no worker can claim it from here on */
    while (job.num_helpers > 0)
        pthread_cond_wait(&pool.idle, &pool.lock);
    pthread_mutex_unlock(&pool.lock);
}

int kv_pool_num_workers(void)
{
    pthread_mutex_lock(&pool.lock);
    int n = pool.num_workers;
    pthread_mutex_unlock(&pool.lock);
    return n;
}

int kv_num_cpus(void)
{
#ifdef CPU_COUNT
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof(set), &set) == 0 && CPU_COUNT(&set) > 0)
        return CPU_COUNT(&set);
#endif
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? (int)n : 1;
}
