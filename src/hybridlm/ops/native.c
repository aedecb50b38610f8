/* CPU kernels for decoding, where the work is memory-bound: few-row fp32 matrix products
 * (y[r, n] = sum_k x[r, k] * W[n, k] + bias[n]) and the recurrent state updates, in place.
 *
 * Decoding multiplies a handful of token rows (1-16) by weight matrices that do not fit in any
 * cache, so the time is the time to stream W from memory once. BLAS libraries pick a GEMV or a
 * packing GEMM for such shapes and reach a fraction of the memory bandwidth on them (a [2320, 512]
 * GEMV at 10 GB/s where summing the same bytes runs at 25 GB/s per core, 2-8 rows slower still).
 * Here each thread streams its own contiguous block of W rows exactly once, one row at a time
 * (several rows read side by side halved the bandwidth: the prefetcher follows one stream best),
 * and multiplies each row with up to 8 token rows held in L1 before moving on.
 *
 * Threads: a decode step is a few hundred kernels of 5-200 us each, with Python in between. OpenMP's
 * pool under OMP_WAIT_POLICY=PASSIVE (what torch users run on shared machines) puts its threads to
 * sleep after each parallel region, and waking one took ~100 us on a 2-core KVM guest: more than most
 * of these kernels. So the kernels share out their work on a pool of their own (below): its workers
 * spin between tasks for HYBRIDLM_SPIN_US microseconds (default 1000, yielding the core to any other
 * runnable thread as they spin), then sleep; the caller's thread always takes the first share.
 *
 * Each function names its plain twin; tests/ops/test_native.py compares them. Compiled at first
 * use by hybridlm/ops/native.py with -O3 -march=native -fopenmp -pthread; GCC vector extensions map v16
 * onto AVX-512, AVX2 or NEON.
 */
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define TOKENS_PER_PASS 8 /* token rows multiplied per pass over one W row (8 accumulators) */
/* Software prefetch of W in the streaming loop. These defaults were measured on an AMD EPYC VM: with 4+
 * tokens a row takes long enough that the hardware prefetcher falls behind, and a non-temporal prefetch
 * 8 KB ahead gave +20-25% at 8 tokens. On an Intel Xeon VM they halved the 8-token rate; native.py passes
 * -D values per CPU vendor (_tuning_flags) instead. */
#ifndef PREFETCH_AHEAD
#define PREFETCH_AHEAD 2048 /* floats ahead of the row being read */
#endif
#ifndef PREFETCH_LOCALITY
#define PREFETCH_LOCALITY 0 /* __builtin_prefetch's locality: 0 non-temporal .. 3 every cache level */
#endif
#ifndef PREFETCH_MIN_TOKENS
#define PREFETCH_MIN_TOKENS 4 /* token rows from which the loop prefetches */
#endif

typedef float v16 __attribute__((vector_size(64)));
typedef float v8 __attribute__((vector_size(32)));
typedef float v4 __attribute__((vector_size(16)));

static inline v16 load16(const float *p) {
    v16 v;
    memcpy(&v, p, sizeof v);
    return v;
}

typedef int32_t vi16 __attribute__((vector_size(64)));

static inline void store16(float *p, v16 v) { memcpy(p, &v, sizeof v); }

/* exp(x) on 16 lanes: x = n ln2 + r with n = round(x / ln2) (the 1.5 * 2^23 trick rounds to nearest
 * without a rounding instruction), exp(r) by Cephes' expf polynomial on |r| <= ln2 / 2, 2^n through
 * the exponent bits. Inputs are clamped to [-87.3, 88.7], where the result stays a normal float: within
 * 2 ulp of expf there, 1.2e-38 below it (expf: a subnormal or 0, which every caller here adds to 1). */
static inline v16 clamp16(v16 x, float low, float high) {
    const v16 zero = {0}, low_v = zero + low, high_v = zero + high;
    vi16 xi, low_i, high_i;
    memcpy(&xi, &x, sizeof x);
    memcpy(&low_i, &low_v, sizeof x);
    memcpy(&high_i, &high_v, sizeof x);
    const vi16 below = x < low_v, above = x > high_v; /* lanes: -1 where true */
    xi = (xi & ~(below | above)) | (low_i & below) | (high_i & above);
    memcpy(&x, &xi, sizeof x);
    return x;
}

static inline v16 exp16(v16 x) {
    const v16 zero = {0}, magic = zero + 12582912.0f;
    x = clamp16(x, -87.3f, 88.7f);
    const v16 n = (x * 1.44269504088896341f + magic) - magic;
    const v16 r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
    v16 poly = r * 1.9875691500e-4f + 1.3981999507e-3f;
    poly = poly * r + 8.3334519073e-3f;
    poly = poly * r + 4.1665795894e-2f;
    poly = poly * r + 1.6666665459e-1f;
    poly = poly * r + 5.0000001201e-1f;
    const v16 exp_r = poly * r * r + r + 1.0f;
    const vi16 bits = (__builtin_convertvector(n, vi16) + 127) << 23;
    v16 scale;
    memcpy(&scale, &bits, sizeof scale);
    return exp_r * scale;
}

/* y[i] *= sigmoid(z[i]) for i < n (y may be z: silu in place); exp16 on full vectors, expf on the tail. */
static void times_sigmoid(float *y, const float *z, int64_t n) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        const v16 zv = load16(z + i);
        store16(y + i, load16(y + i) / (1.0f + exp16(-zv)));
    }
    for (; i < n; i++) y[i] /= 1.0f + __builtin_expf(-z[i]);
}

/* y[i] *= silu(z[i]) = z[i] / (1 + exp(-z[i])) for i < n; exp16 on full vectors, expf on the tail. */
static void times_silu(float *y, const float *z, int64_t n) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        const v16 zv = load16(z + i);
        store16(y + i, load16(y + i) * zv / (1.0f + exp16(-zv)));
    }
    for (; i < n; i++) y[i] *= z[i] / (1.0f + __builtin_expf(-z[i]));
}

/* A tree of adds (a serial chain of 16 scalar adds would cost more than streaming a short row). */
static inline float sum16(v16 v) {
    const v8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                 __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
    const v4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
    return (b[0] + b[2]) + (b[1] + b[3]);
}

/* dot[t] = w . xr[t] for t < tokens (a constant after inlining, so the accumulators are registers). */
static inline __attribute__((always_inline)) void row_times_tokens(const float *w, const float *const *xr,
                                                                   int64_t K, int64_t tokens, float *dot) {
    const int64_t k_vec = K - K % 16;
    v16 acc[TOKENS_PER_PASS];
    memset(acc, 0, sizeof acc);
    for (int64_t k = 0; k < k_vec; k += 16) {
        if (tokens >= PREFETCH_MIN_TOKENS) __builtin_prefetch(w + k + PREFETCH_AHEAD, 0, PREFETCH_LOCALITY);
        const v16 wv = load16(w + k);
        for (int64_t t = 0; t < tokens; t++) acc[t] += wv * load16(xr[t] + k);
    }
    for (int64_t t = 0; t < tokens; t++) {
        float s = sum16(acc[t]);
        for (int64_t k = k_vec; k < K; k++) s += w[k] * xr[t][k];
        dot[t] = s;
    }
}

/* W rows [n_begin, n_end) times the token rows x + rows[t] * x_stride (K wide), t < num_tokens;
 * results go to y[rows_out[t] * y_stride + n]. */
static void rows_times_tokens(const float *x, int64_t x_stride, const int64_t *rows, const int64_t *rows_out,
                              int64_t num_tokens,
                              const float *W, int64_t n_begin, int64_t n_end, int64_t K, const float *bias,
                              float *y, int64_t y_stride) {
    for (int64_t n = n_begin; n < n_end; n++) {
        const float *w = W + n * K;
        for (int64_t t0 = 0; t0 < num_tokens; t0 += TOKENS_PER_PASS) {
            const int64_t tokens = (num_tokens - t0) < TOKENS_PER_PASS ? (num_tokens - t0) : TOKENS_PER_PASS;
            const float *xr[TOKENS_PER_PASS];
            for (int64_t t = 0; t < tokens; t++) xr[t] = x + rows[t0 + t] * x_stride;
            float dot[TOKENS_PER_PASS];
            switch (tokens) {
                case 1: row_times_tokens(w, xr, K, 1, dot); break;
                case 2: row_times_tokens(w, xr, K, 2, dot); break;
                case 3: row_times_tokens(w, xr, K, 3, dot); break;
                case 4: row_times_tokens(w, xr, K, 4, dot); break;
                case 5: row_times_tokens(w, xr, K, 5, dot); break;
                case 6: row_times_tokens(w, xr, K, 6, dot); break;
                case 7: row_times_tokens(w, xr, K, 7, dot); break;
                default: row_times_tokens(w, xr, K, 8, dot); break;
            }
            const float b = bias ? bias[n] : 0.0f;
            for (int64_t t = 0; t < tokens; t++) y[rows_out[t0 + t] * y_stride + n] = dot[t] + b;
        }
    }
}

/* Subnormal floats as zero: x86 MXCSR flush-to-zero (bit 15) + denormals-are-zero (bit 6), Arm FPCR
 * flush-to-zero (bit 24). Decays such as exp(-100) underflow into the subnormal range, and on x86 every
 * operation that reads or produces a subnormal takes a microcode assist (~100x slower); GPU kernels
 * flush them by default. The mode is per thread: hybridlm_flush_subnormals sets it on the calling thread
 * and on every thread of the OpenMP pool (torch's: libgomp is loaded once per process), and returns the
 * calling thread's previous mode (1 = flushing) so that the caller can restore it; the pool below runs
 * each task in its caller's mode. Plain twin: leaving the mode alone. */
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define FLUSH_BITS 0x8040u
static int flushing(void) { return (_mm_getcsr() & FLUSH_BITS) != 0; }
static void set_flushing(int on) { _mm_setcsr((_mm_getcsr() & ~FLUSH_BITS) | (on ? FLUSH_BITS : 0u)); }
static inline void cpu_relax(void) { _mm_pause(); }
#elif defined(__aarch64__)
#define FLUSH_BIT (1ull << 24)
static int flushing(void) { uint64_t r; __asm__ volatile("mrs %0, fpcr" : "=r"(r)); return (r & FLUSH_BIT) != 0; }
static void set_flushing(int on) {
    uint64_t r;
    __asm__ volatile("mrs %0, fpcr" : "=r"(r));
    r = on ? (r | FLUSH_BIT) : (r & ~FLUSH_BIT);
    __asm__ volatile("msr fpcr, %0" : : "r"(r));
}
static inline void cpu_relax(void) { __asm__ volatile("yield"); }
#else
static int flushing(void) { return 0; }
static void set_flushing(int on) { (void)on; }
static inline void cpu_relax(void) {}
#endif

int hybridlm_flush_subnormals(int on) {
    int before = flushing();
    set_flushing(on);
#ifdef _OPENMP
#pragma omp parallel
    set_flushing(on);
#endif
    return before;
}

/* ---- The worker pool ----------------------------------------------------------------------------
 * run(task, ctx, threads) calls task(ctx, t, threads) once for every t < threads, t = 0 on the calling
 * thread and the others on workers, and returns when all are done. A task is published by bumping
 * `generation`; a worker takes part by entering the task's `gate` (one compare-and-swap), runs its share,
 * and counts itself `done`; the caller returns when every worker that entered is done, so the fields of
 * one task are never overwritten while a worker may read them. For run() every worker enters (those
 * beyond `threads` do nothing): tasks whose shares are fixed by thread need all of them. run_dynamic()
 * is for tasks that claim() their work: once the caller has run out of work it closes the gate, and a
 * worker still waking up (~90 us from sleep here) stays out instead of being waited for. A second caller
 * (another Python thread) finding the pool busy runs its task alone, inline. Plain twin: the same task
 * with threads = 1. */
typedef void (*task_fn)(void *ctx, int thread, int threads);

#define MAX_WORKERS 63
#define GATE_SHIFT 16                 /* gate = generation << GATE_SHIFT | GATE_CLOSED? | workers entered */
#define GATE_CLOSED (1u << 15)
#define GATE_ENTERED (GATE_CLOSED - 1)
static struct {
    pthread_mutex_t busy;      /* one caller at a time */
    pthread_mutex_t sleep_lock;
    pthread_cond_t wake;
    atomic_uint_fast64_t generation;
    atomic_uint_fast64_t gate;
    atomic_int done;           /* workers that entered the current task and finished it */
    atomic_int pending;        /* a new worker has yet to read the generation (grow_pool) */
    atomic_int sleepers;
    int workers;
    task_fn task;
    void *ctx;
    int threads;
    int flush;                 /* the caller's subnormal mode, for the workers */
    int64_t spin_ns;
} pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0, 0, 0, 0, 0, 0, NULL,
          NULL, 1, 0, -1};

static int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

/* Wait for a generation after `seen`: spin (yielding every ~64 pauses) for spin_ns, then sleep. */
static uint64_t wait_for_task(uint64_t seen, int64_t spin_ns) {
    const int64_t deadline = now_ns() + spin_ns;
    for (unsigned spins = 1;; spins++) {
        const uint64_t g = atomic_load_explicit(&pool.generation, memory_order_acquire);
        if (g != seen) return g;
        if (spins % 64) {
            cpu_relax();
            continue;
        }
        if (now_ns() < deadline) {
            sched_yield();
            continue;
        }
        pthread_mutex_lock(&pool.sleep_lock);
        atomic_fetch_add(&pool.sleepers, 1);
        while (atomic_load(&pool.generation) == seen) pthread_cond_wait(&pool.wake, &pool.sleep_lock);
        atomic_fetch_sub(&pool.sleepers, 1);
        pthread_mutex_unlock(&pool.sleep_lock);
    }
}

/* A task longer than this is prefill-sized: the next work is most likely torch's own (a large matmul on
 * OpenMP's threads), so the worker sleeps at once instead of spinning beside it. */
#define LONG_TASK_NS 200000

/* Enter task `generation` unless its gate has closed or a newer task has replaced it. */
static int enter(uint64_t generation) {
    uint_fast64_t gate = atomic_load(&pool.gate);
    while ((gate >> GATE_SHIFT) == generation && !(gate & GATE_CLOSED))
        if (atomic_compare_exchange_weak(&pool.gate, &gate, gate + 1)) return 1;
    return 0;
}

static void *worker_main(void *arg) {
    const int id = (int)(intptr_t)arg;
    uint64_t seen = atomic_load(&pool.generation);
    int64_t spin_ns = pool.spin_ns;
    atomic_fetch_sub(&pool.pending, 1); /* started: the creator waits for this */
    for (;;) {
        seen = wait_for_task(seen, spin_ns);
        if (!enter(seen)) continue; /* late for it: wait for the next one */
        const int64_t start = now_ns();
        if (id < pool.threads) {
            if (flushing() != pool.flush) set_flushing(pool.flush);
            pool.task(pool.ctx, id, pool.threads);
        }
        spin_ns = now_ns() - start > LONG_TASK_NS ? 0 : pool.spin_ns;
        atomic_fetch_add_explicit(&pool.done, 1, memory_order_release);
    }
    return NULL;
}

/* In a child after fork() the workers are gone: the pool starts over empty. */
static void pool_after_fork(void) {
    pthread_mutex_init(&pool.busy, NULL);
    pthread_mutex_init(&pool.sleep_lock, NULL);
    pthread_cond_init(&pool.wake, NULL);
    atomic_store(&pool.pending, 0);
    atomic_store(&pool.done, 0);
    atomic_store(&pool.sleepers, 0);
    pool.workers = 0;
}

/* Workers 1..wanted-1 exist (called holding `busy`); fewer when threads cannot be created. */
static void grow_pool(int wanted) {
    if (pool.spin_ns < 0) {
        const char *spin = getenv("HYBRIDLM_SPIN_US");
        pool.spin_ns = (spin && *spin ? atoll(spin) : 1000) * 1000;
        pthread_atfork(NULL, NULL, pool_after_fork);
    }
    while (pool.workers + 1 < wanted && pool.workers < MAX_WORKERS) {
        pthread_t thread;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        atomic_store(&pool.pending, 1);
        const int failed = pthread_create(&thread, &attr, worker_main, (void *)(intptr_t)(pool.workers + 1));
        pthread_attr_destroy(&attr);
        if (failed) break;
        while (atomic_load(&pool.pending)) cpu_relax(); /* it has read the generation */
        pool.workers++;
    }
}

static void run_pool(task_fn task, void *ctx, int threads, int dynamic) {
    if (threads <= 1 || pthread_mutex_trylock(&pool.busy) != 0) {
        task(ctx, 0, 1);
        return;
    }
    grow_pool(threads);
    threads = threads < pool.workers + 1 ? threads : pool.workers + 1;
    pool.task = task;
    pool.ctx = ctx;
    pool.threads = threads;
    pool.flush = flushing();
    atomic_store(&pool.done, 0);
    const uint64_t generation = atomic_load(&pool.generation) + 1;
    atomic_store(&pool.gate, generation << GATE_SHIFT);
    /* Publishes the fields above. Sequentially consistent, not just release: the load of `sleepers` below
     * must not be served before this store is visible, or a worker going to sleep at that moment reads the
     * old generation, sleeps, and is never woken (a release store let x86 reorder the two: a hang). */
    atomic_store(&pool.generation, generation);
    if (atomic_load(&pool.sleepers)) {
        pthread_mutex_lock(&pool.sleep_lock);
        pthread_cond_broadcast(&pool.wake);
        pthread_mutex_unlock(&pool.sleep_lock);
    }
    task(ctx, 0, threads);
    int entered = pool.workers;
    if (dynamic)
        entered = (int)(atomic_fetch_or(&pool.gate, GATE_CLOSED) & GATE_ENTERED);
    else
        while ((int)(atomic_load(&pool.gate) & GATE_ENTERED) < entered) cpu_relax();
    while (atomic_load_explicit(&pool.done, memory_order_acquire) < entered) cpu_relax();
    pthread_mutex_unlock(&pool.busy);
}

/* Every share of the task, fixed by thread index: waits for every worker. */
static void run(task_fn task, void *ctx, int threads) { run_pool(task, ctx, threads, 0); }

/* A task whose threads claim() their work: returns without the workers that were late for it. */
static void run_dynamic(task_fn task, void *ctx, int threads) { run_pool(task, ctx, threads, 1); }

/* The rows [begin, end) of [0, N) that thread `thread` of `threads` computes. */
static void share(int64_t N, int thread, int threads, int64_t *begin, int64_t *end) {
    *begin = N * thread / threads;
    *end = N * (thread + 1) / threads;
}

/* Dynamic sharing of [0, N): the next `chunk` items no thread of this run has taken yet (0 when none are
 * left), from the task's own counter (zero at the start of the run). A worker that starts late (a
 * sleeping one wakes in ~90 us here) takes fewer; with static shares the caller would wait for it: a
 * [512, 512] RMSNorm took 140 us after a long task, 49 us with the worker spinning, 94 us on one thread. */
static int claim(atomic_int_fast64_t *next, int64_t N, int64_t chunk, int64_t *begin, int64_t *end) {
    const int64_t first = atomic_fetch_add_explicit(next, chunk, memory_order_relaxed);
    if (first >= N) return 0;
    *begin = first;
    *end = first + chunk < N ? first + chunk : N;
    return 1;
}

/* About eight chunks a thread, at least `least` items each. */
static int64_t chunk_size(int64_t N, int threads, int64_t least) {
    const int64_t chunk = N / (8 * threads);
    return chunk > least ? chunk : least;
}

/* Rows r < R sorted by expert[r] (stable): order[start[e] .. start[e + 1]) are expert e's rows. */
static void group_by_expert(const int64_t *expert, int64_t R, int64_t E, int64_t *start, int64_t *order) {
    int64_t next[1024];
    memset(start, 0, sizeof(int64_t) * (E + 1));
    for (int64_t r = 0; r < R; r++) start[expert[r] + 1]++;
    for (int64_t e = 0; e < E; e++) start[e + 1] += start[e];
    memcpy(next, start, sizeof(int64_t) * E);
    for (int64_t r = 0; r < R; r++) order[next[expert[r]]++] = r;
}

/* A product of W rows with token rows, shared out over threads by W row (see rows_times_tokens). */
typedef struct {
    const float *x, *W, *bias;
    int64_t x_stride, num_tokens, N, K, y_stride;
    const int64_t *rows, *rows_out;
    float *y;
} product;

static void product_task(void *ctx, int thread, int threads) {
    const product *p = ctx;
    int64_t begin, end;
    share(p->N, thread, threads, &begin, &end);
    rows_times_tokens(p->x, p->x_stride, p->rows, p->rows_out, p->num_tokens, p->W, begin, end, p->K, p->bias, p->y,
                      p->y_stride);
}

/* y [M, N] = x [M, K] @ W[N, K]^T + bias (bias may be NULL). All contiguous fp32; M <= 64. */
void hybridlm_linear(const float *x, int64_t M, const float *W, int64_t N, int64_t K, const float *bias, float *y,
                     int threads) {
    int64_t rows[64];
    for (int64_t m = 0; m < M; m++) rows[m] = m;
    product p = {x, W, bias, K, M, N, K, N, rows, rows, y};
    run(product_task, &p, threads);
}

/* Every expert's rows through that expert's [N, K] matrix, each thread on its share of the N rows. */
typedef struct {
    const float *x, *W;
    int64_t x_stride, E, N, K, y_stride;
    const int64_t *start, *inputs, *outputs;
    float *y;
} expert_product;

static void expert_product_task(void *ctx, int thread, int threads) {
    const expert_product *p = ctx;
    int64_t begin, end;
    share(p->N, thread, threads, &begin, &end);
    for (int64_t e = 0; e < p->E; e++)
        if (p->start[e] < p->start[e + 1])
            rows_times_tokens(p->x, p->x_stride, p->inputs + p->start[e], p->outputs + p->start[e],
                              p->start[e + 1] - p->start[e], p->W + e * p->N * p->K, begin, end, p->K, NULL, p->y,
                              p->y_stride);
}

/* y[r] = W[expert[r]] @ x[input_row[r]] for r < R, W [E, N, K]: each expert with rows is streamed
 * once for all of its rows. R <= 256, E <= 1024, expert ids in [0, E) (checked by the caller). */
void hybridlm_expert_linear(const float *x, const int64_t *input_row, const int64_t *expert, int64_t R,
                            const float *W, int64_t E, int64_t N, int64_t K, float *y, int threads) {
    int64_t start[1024 + 1], order[256], inputs[256];
    group_by_expert(expert, R, E, start, order);
    for (int64_t i = 0; i < R; i++) inputs[i] = input_row[order[i]];
    expert_product p = {x, W, K, E, N, K, N, start, inputs, order, y};
    run(expert_product_task, &p, threads);
}

/* One (batch, head) of the Mamba-2 step (twin: hybridlm.ops.ssd.ssd_step), state [P, N] in place:
 *   state[p, :] = exp(dt * A) * state[p, :] + dt * x[p] * B[:];  y[p] = state[p, :] . C[:] + D * x[p] */
static inline void ssd_head_step(const float *xv, float step, float A, const float *Bv, const float *Cv, float skip,
                                 float *state, float *y, int64_t P, int64_t N) {
    const float decay = __builtin_expf(step * A);
    for (int64_t p = 0; p < P; p++) {
        float *s = state + p * N;
        const float dtx = step * xv[p];
        float out = 0.0f;
#pragma omp simd reduction(+ : out)
        for (int64_t n = 0; n < N; n++) {
            const float value = decay * s[n] + dtx * Bv[n];
            s[n] = value;
            out += value * Cv[n];
        }
        y[p] = out + skip * xv[p];
    }
}

typedef struct {
    const float *xBC, *dt_raw, *dt_bias, *A_log, *D;
    int64_t xBC_stride, dt_stride, batch, T, H, P, G, N;
    float dt_min, dt_max;
    float *state, *y;
    atomic_int_fast64_t next; /* claim()'s counter: left zero by the initialisers */
} mamba2_scan;

/* Each (batch, head) of the thread's share runs through its T tokens in order, its state in L1/L2. */
/* Up to SCAN_TOKENS consecutive tokens of one head in one pass over its state [P, N], N a multiple of 16
 * (twin: ssd_head_step once per token): each state row is loaded and stored once for all of them, where
 * one token per pass spent most of its time moving the 32 KB state through L1 (3.6 -> 2.1 ms for 512 tokens
 * x 16 heads of 64 x 128; 8 tokens a pass measured the same as 4). */
#define SCAN_TOKENS 4
static inline __attribute__((always_inline)) void ssd_head_steps(int64_t count, const float *const *xv,
                                                                 const float *step, float A, const float *const *Bv,
                                                                 const float *const *Cv, float skip, float *state,
                                                                 float *const *y, int64_t P, int64_t N) {
    float decay[SCAN_TOKENS];
    for (int64_t t = 0; t < count; t++) decay[t] = __builtin_expf(step[t] * A);
    for (int64_t p = 0; p < P; p++) {
        float *s = state + p * N;
        float dtx[SCAN_TOKENS];
        for (int64_t t = 0; t < count; t++) dtx[t] = step[t] * xv[t][p];
        v16 acc[SCAN_TOKENS];
        memset(acc, 0, sizeof acc);
        for (int64_t n = 0; n < N; n += 16) {
            v16 value = load16(s + n);
            for (int64_t t = 0; t < count; t++) {
                value = decay[t] * value + dtx[t] * load16(Bv[t] + n);
                acc[t] += value * load16(Cv[t] + n);
            }
            store16(s + n, value);
        }
        for (int64_t t = 0; t < count; t++) y[t][p] = sum16(acc[t]) + skip * xv[t][p];
    }
}

static void mamba2_scan_task(void *ctx, int thread, int threads) {
    (void)thread, (void)threads;
    mamba2_scan *m = ctx;
    const int64_t H = m->H, P = m->P, N = m->N, G = m->G, heads_per_group = H / G, inner = H * P;
    for (int64_t bh, end; claim(&m->next, m->batch * H, 1, &bh, &end);) { /* a head at a time */
        const int64_t b = bh / H, h = bh % H, g = h / heads_per_group;
        const float A = -__builtin_expf(m->A_log[h]), skip = m->D ? m->D[h] : 0.0f;
        float *state = m->state + bh * P * N;
        for (int64_t t0 = 0; t0 < m->T; t0 += SCAN_TOKENS) {
            const int64_t count = m->T - t0 < SCAN_TOKENS ? m->T - t0 : SCAN_TOKENS;
            const float *xv[SCAN_TOKENS], *Bv[SCAN_TOKENS], *Cv[SCAN_TOKENS];
            float step[SCAN_TOKENS], *y[SCAN_TOKENS];
            for (int64_t t = 0; t < count; t++) {
                const int64_t token = b * m->T + t0 + t;
                const float raw = m->dt_raw[token * m->dt_stride + h] + m->dt_bias[h];
                float dt = raw > 20.0f ? raw : __builtin_log1pf(__builtin_expf(raw)); /* softplus, as torch's */
                step[t] = dt < m->dt_min ? m->dt_min : (dt > m->dt_max ? m->dt_max : dt);
                const float *row = m->xBC + token * m->xBC_stride;
                xv[t] = row + h * P;
                Bv[t] = row + inner + g * N;
                Cv[t] = row + inner + G * N + g * N;
                y[t] = m->y + token * inner + h * P;
            }
            if (N % 16) {
                for (int64_t t = 0; t < count; t++) ssd_head_step(xv[t], step[t], A, Bv[t], Cv[t], skip, state, y[t], P, N);
                continue;
            }
            switch (count) { /* a constant count per call: the token loop unrolls, the sums stay in registers */
                case 1: ssd_head_steps(1, xv, step, A, Bv, Cv, skip, state, y, P, N); break;
                case 2: ssd_head_steps(2, xv, step, A, Bv, Cv, skip, state, y, P, N); break;
                case 3: ssd_head_steps(3, xv, step, A, Bv, Cv, skip, state, y, P, N); break;
                default: ssd_head_steps(4, xv, step, A, Bv, Cv, skip, state, y, P, N); break;
            }
        }
    }
}

/* The Mamba-2 mixer's recurrence over T tokens from its projections, token by token (twin: ssd_reference,
 * or for T = 1 ssd_step and the mixer's torch step): xBC [batch * T, H*P + 2*G*N] after the conv (rows
 * xBC_stride apart: x, then B, then C), dt_raw [batch * T, H] (rows dt_stride apart) before
 * dt = clamp(softplus(dt_raw + dt_bias), dt_min, dt_max), A = -exp(A_log); state [batch, H, P, N] in place;
 * y [batch * T, H*P]. Work H*P*N per token and head, against the chunked form's extra chunk-square terms. */
void hybridlm_mamba2_scan(const float *xBC, int64_t xBC_stride, const float *dt_raw, int64_t dt_stride,
                          const float *dt_bias, const float *A_log, const float *D, float dt_min, float dt_max,
                          float *state, float *y, int64_t batch, int64_t T, int64_t H, int64_t P, int64_t G, int64_t N,
                          int threads) {
    mamba2_scan m = {xBC, dt_raw, dt_bias, A_log, D, xBC_stride, dt_stride, batch, T, H, P, G, N, dt_min, dt_max,
                     state, y};
    run_dynamic(mamba2_scan_task, &m, threads);
}

/* One token of the gated delta rule for one head, S = state [K, V] in place:
 *   S = exp(g) * S;  delta = beta * (v - k^T S);  S += k delta^T;  o = scale * q^T S
 * Two passes over S, which stays in cache between them. V <= 1024. */
static inline void delta_head_step(const float *qv, const float *kv, const float *vv, float decay, float strength,
                                   float scale, float *S, float *o, int64_t K, int64_t V) {
    float predicted[1024], delta[1024], out[1024];
    for (int64_t j = 0; j < V; j++) predicted[j] = 0.0f;
    for (int64_t i = 0; i < K; i++) {
        float *row = S + i * V;
        const float ki = kv[i];
        for (int64_t j = 0; j < V; j++) {
            row[j] *= decay;
            predicted[j] += ki * row[j];
        }
    }
    for (int64_t j = 0; j < V; j++) {
        delta[j] = strength * (vv[j] - predicted[j]);
        out[j] = 0.0f;
    }
    for (int64_t i = 0; i < K; i++) {
        float *row = S + i * V;
        const float ki = kv[i], qi = qv[i];
        for (int64_t j = 0; j < V; j++) {
            row[j] += ki * delta[j];
            out[j] += qi * row[j];
        }
    }
    for (int64_t j = 0; j < V; j++) o[j] = scale * out[j];
}

typedef struct {
    const float *qkv, *b, *a, *A_log, *dt_bias;
    int64_t qkv_stride, b_stride, a_stride, batch, T, H, Hk, K, V;
    float eps, scale;
    float *state, *o;
    atomic_int_fast64_t next; /* claim()'s counter: left zero by the initialisers */
} delta_scan;

/* x / sqrt(sum(x^2) + eps) into out, K values. */
static inline void l2_normalized(const float *x, int64_t K, float eps, float *out) {
    float squares = 0.0f;
#pragma omp simd reduction(+ : squares)
    for (int64_t i = 0; i < K; i++) squares += x[i] * x[i];
    const float inverse = 1.0f / __builtin_sqrtf(squares + eps);
    for (int64_t i = 0; i < K; i++) out[i] = x[i] * inverse;
}

/* Token t's inputs for value head h: L2-normalised q and k, its values, the decay exp(g) and beta. */
static inline const float *delta_token(const delta_scan *d, int64_t token, int64_t h, int64_t key_head, float A,
                                       float *q, float *k, float *decay, float *strength) {
    const float *row = d->qkv + token * d->qkv_stride;
    l2_normalized(row + key_head * d->K, d->K, d->eps, q);
    l2_normalized(row + d->Hk * d->K + key_head * d->K, d->K, d->eps, k);
    *strength = 1.0f / (1.0f + __builtin_expf(-d->b[token * d->b_stride + h]));
    const float raw = d->a[token * d->a_stride + h] + d->dt_bias[h];
    const float softplus = raw > 20.0f ? raw : __builtin_log1pf(__builtin_expf(raw));
    *decay = __builtin_expf(A * softplus);
    return row + 2 * d->Hk * d->K + h * d->V;
}

/* One head through all T tokens with V = 16 * VB (VB <= 8): one pass over the state per token. The pass
 * of token t adds k_t delta_t^T, reads out o_t = S^T q_t, then already applies token t + 1's decay and
 * sums S^T k_{t+1} (its prediction), so S is loaded and stored once a token instead of twice; the delta,
 * prediction and output rows stay in registers. Same operations per element as delta_head_step. */
static inline __attribute__((always_inline)) void delta_scan_head_blocks(const delta_scan *d, int64_t b, int64_t h,
                                                                        int64_t key_head, float A, float *S,
                                                                        const int VB) {
    const int64_t K = d->K;
    if (d->T == 0) return;
    float q[2][1024], k[2][1024], decay[2], strength[2];
    v16 predicted[8], delta[8], out[8];
    const float *v = delta_token(d, b * d->T, h, key_head, A, q[0], k[0], &decay[0], &strength[0]);
    for (int j = 0; j < VB; j++) predicted[j] = (v16){0};
    for (int64_t i = 0; i < K; i++) { /* token 0's decay and prediction */
        float *row = S + i * 16 * VB;
        for (int j = 0; j < VB; j++) {
            const v16 r = load16(row + 16 * j) * decay[0];
            store16(row + 16 * j, r);
            predicted[j] += k[0][i] * r;
        }
    }
    for (int64_t t = 0; t < d->T; t++) {
        const int now = t & 1, next = now ^ 1;
        const int64_t token = b * d->T + t;
        for (int j = 0; j < VB; j++) {
            delta[j] = strength[now] * (load16(v + 16 * j) - predicted[j]);
            out[j] = (v16){0};
            predicted[j] = (v16){0};
        }
        const float *next_v = v;
        if (t + 1 < d->T) {
            next_v = delta_token(d, token + 1, h, key_head, A, q[next], k[next], &decay[next], &strength[next]);
            for (int64_t i = 0; i < K; i++) {
                float *row = S + i * 16 * VB;
                const float ki = k[now][i], qi = q[now][i], next_ki = k[next][i];
                for (int j = 0; j < VB; j++) {
                    v16 r = load16(row + 16 * j) + ki * delta[j];
                    out[j] += qi * r;
                    r *= decay[next];
                    predicted[j] += next_ki * r;
                    store16(row + 16 * j, r);
                }
            }
        } else {
            for (int64_t i = 0; i < K; i++) {
                float *row = S + i * 16 * VB;
                const float ki = k[now][i], qi = q[now][i];
                for (int j = 0; j < VB; j++) {
                    const v16 r = load16(row + 16 * j) + ki * delta[j];
                    out[j] += qi * r;
                    store16(row + 16 * j, r);
                }
            }
        }
        float *o = d->o + token * d->H * d->V + h * d->V;
        for (int j = 0; j < VB; j++) store16(o + 16 * j, d->scale * out[j]);
        v = next_v;
    }
}

static void delta_scan_task(void *ctx, int thread, int threads) {
    (void)thread, (void)threads;
    delta_scan *d = ctx;
    const int64_t H = d->H, Hk = d->Hk, K = d->K, V = d->V, repeats = H / Hk;
    for (int64_t bh, end; claim(&d->next, d->batch * H, 1, &bh, &end);) { /* a head at a time */
        const int64_t b = bh / H, h = bh % H, key_head = h / repeats; /* value head h reads key head h / repeats */
        const float A = -__builtin_expf(d->A_log[h]);
        float *S = d->state + bh * K * V;
        switch (V) { /* the common value head sizes: the state rows in registers */
        case 64: delta_scan_head_blocks(d, b, h, key_head, A, S, 4); continue;
        case 128: delta_scan_head_blocks(d, b, h, key_head, A, S, 8); continue;
        default: break;
        }
        float q[1024], k[1024], decay, strength;
        for (int64_t t = 0; t < d->T; t++) {
            const int64_t token = b * d->T + t;
            const float *v = delta_token(d, token, h, key_head, A, q, k, &decay, &strength);
            delta_head_step(q, k, v, decay, strength, d->scale, S, d->o + token * H * V + h * V, K, V);
        }
    }
}

/* The Gated DeltaNet mixer's recurrence over T tokens from its projections, token by token, in place
 * (twin: the mixer's torch lines, then gated_deltanet_reference; for T = 1 gated_deltanet_step). Per token
 * (row b * T + t of sequence b) and value head h, reading key head h / (H / Hk):
 *   q, k = L2-normalised (eps) query and key;  beta = sigmoid(b);  g = -exp(A_log) * softplus(a + dt_bias)
 * then the gated delta rule (delta_head_step). qkv [batch * T, 2*Hk*K + H*V] after the conv (rows
 * qkv_stride apart: queries, keys, values), b / a [batch * T, H] (rows b_stride / a_stride apart), state
 * [batch, H, K, V], o [batch * T, H * V]. K, V <= 1024. */
void hybridlm_gated_delta_scan(const float *qkv, int64_t qkv_stride, const float *b, int64_t b_stride,
                               const float *a, int64_t a_stride, const float *A_log, const float *dt_bias,
                               float *state, float *o, int64_t batch, int64_t T, int64_t H, int64_t Hk, int64_t K,
                               int64_t V, float eps, float scale, int threads) {
    delta_scan d = {qkv, b, a, A_log, dt_bias, qkv_stride, b_stride, a_stride, batch, T, H, Hk, K, V, eps, scale,
                    state, o};
    run_dynamic(delta_scan_task, &d, threads);
}

typedef struct {
    const float *x;
    const float *const *Ws;
    const float *const *biases;
    const int64_t *rows, *offset;
    int64_t M, count, K, total;
    float *y;
} stacked_product;

static void stacked_product_task(void *ctx, int thread, int threads) {
    const stacked_product *p = ctx;
    int64_t begin, end;
    share(p->total, thread, threads, &begin, &end);
    for (int64_t i = 0; i < p->count; i++) {
        const int64_t lo = begin > p->offset[i] ? begin : p->offset[i];
        const int64_t hi = end < p->offset[i + 1] ? end : p->offset[i + 1];
        if (lo >= hi) continue;
        /* rows lo..hi of the stacked weight are rows lo - offset[i].. of W_i, written at column lo.. of y */
        const float *bias = p->biases && p->biases[i] ? p->biases[i] - p->offset[i] : NULL;
        rows_times_tokens(p->x, p->K, p->rows, p->rows, p->M, p->Ws[i] - p->offset[i] * p->K, lo, hi, p->K, bias, p->y,
                          p->total);
    }
}

/* Several weights sharing one input as one product (q/k/v, router + shared expert): y [M, sum N_i]
 * = x @ [W_0; W_1; ...]^T + [b_0; b_1; ...], the weights left where they are. Bias pointers may be
 * NULL, and so may `biases` (no bias at all). count <= 8. */
void hybridlm_linear_many(const float *x, int64_t M, const float *const *Ws, const int64_t *Ns,
                          const float *const *biases, int64_t count, int64_t K, float *y, int threads) {
    int64_t rows[64], total = 0, offset[9];
    for (int64_t m = 0; m < M; m++) rows[m] = m;
    for (int64_t i = 0; i < count; i++) {
        offset[i] = total;
        total += Ns[i];
    }
    offset[count] = total;
    stacked_product p = {x, Ws, biases, rows, offset, M, count, K, total, y};
    run(stacked_product_task, &p, threads);
}

typedef struct {
    const float *x, *weight_t, *bias; /* weight_t [W, C]: tap j of every channel side by side */
    float *state, *y;
    int64_t x_stride, batch, T, C, W;
    int apply_silu;
    const float *weight; /* [C, W], for the one-token step */
    atomic_int_fast64_t next; /* claim()'s counter: left zero by the initialisers */
} causal_conv;

/* One token (T = 1), shared out by (batch, channel): window = [state, x], state rolled by one. */
static void causal_conv_step_task(void *ctx, int thread, int threads) {
    const causal_conv *p = ctx;
    const int64_t C = p->C, W = p->W;
    int64_t begin, end;
    share(p->batch * C, thread, threads, &begin, &end);
    for (int64_t bc = begin; bc < end; bc++) {
        const int64_t b = bc / C, c = bc % C;
        float *s = p->state + bc * (W - 1);
        const float *w = p->weight + c * W;
        const float input = p->x[b * p->x_stride + c];
        float acc = p->bias ? p->bias[c] : 0.0f;
        for (int64_t j = 0; j < W - 1; j++) acc += w[j] * s[j];
        acc += w[W - 1] * input;
        for (int64_t j = 0; j + 1 < W - 1; j++) s[j] = s[j + 1];
        if (W > 1) s[W - 2] = input;
        p->y[bc] = p->apply_silu ? acc / (1.0f + __builtin_expf(-acc)) : acc;
    }
}

/* A thread takes a range of channels through every token (so the state of its channels is its own). */
static void causal_conv_task(void *ctx, int thread, int threads) {
    (void)thread;
    causal_conv *p = ctx;
    const int64_t C = p->C, W = p->W, S = W - 1, T = p->T;
    for (int64_t c0, c1; claim(&p->next, C, (chunk_size(C, threads, 16) + 15) / 16 * 16, &c0, &c1);)
    for (int64_t b = 0; b < p->batch; b++) {
        const float *xb = p->x + b * T * p->x_stride;
        float *yb = p->y + b * T * C, *sb = p->state + b * C * S;
        for (int64_t t = 0; t < T; t++) {
            float *yr = yb + t * C;
            int64_t c = c0;
            if (t >= S) /* every tap reads x: 16 channels at a time, the taps summed in a register */
                for (; c + 16 <= c1; c += 16) {
                    v16 acc = p->bias ? load16(p->bias + c) : (v16){0};
                    for (int64_t j = 0; j < W; j++)
                        acc += load16(p->weight_t + j * C + c) * load16(xb + (t - S + j) * p->x_stride + c);
                    store16(yr + c, acc);
                }
            for (; c < c1; c++) { /* the first S tokens (some taps read the state) and the last channels */
                float acc = p->bias ? p->bias[c] : 0.0f;
                for (int64_t j = 0; j < W; j++) {
                    const int64_t at = t - S + j; /* the input position tap j reads: before 0, the state */
                    acc += p->weight_t[j * C + c] * (at >= 0 ? xb[at * p->x_stride + c] : sb[c * S + S + at]);
                }
                yr[c] = acc;
            }
            if (p->apply_silu) times_sigmoid(yr + c0, yr + c0, c1 - c0);
        }
        for (int64_t c = c0; c < c1; c++) { /* the state becomes the last S inputs */
            float window[64];
            for (int64_t j = 0; j < S; j++) {
                const int64_t at = T - S + j;
                window[j] = at >= 0 ? xb[at * p->x_stride + c] : sb[c * S + S + at];
            }
            memcpy(sb + c * S, window, sizeof(float) * S);
        }
    }
}

/* Short causal depthwise convolution over T tokens per sequence, the state rolled in place (twins:
 * hybridlm.ops.conv.causal_conv1d, and causal_conv1d_step for T = 1):
 *   y[t, c] = act(bias[c] + sum_j weight[c, j] * input[t - (W-1) + j, c]),
 * inputs before t = 0 coming from state[c, :] (the previous W-1 inputs, oldest first), which then
 * becomes the last W-1 inputs. x [batch * T, C] (rows x_stride apart), state [batch, C, W-1],
 * weight [C, W], bias [C] or NULL, y [batch * T, C]; silu when apply_silu. W <= 65. Returns 0, or 1 when
 * the transposed weight could not be allocated (then nothing is written). */
int hybridlm_causal_conv(const float *x, int64_t x_stride, float *state, const float *weight, const float *bias,
                         float *y, int64_t batch, int64_t T, int64_t C, int64_t W, int apply_silu, int threads) {
    if (T == 1) { /* a decode step: the weight as it is (one read per channel), no transposed copy to make */
        causal_conv p = {x, NULL, bias, state, y, x_stride, batch, T, C, W, apply_silu};
        p.weight = weight;
        run(causal_conv_step_task, &p, threads);
        return 0;
    }
    float *weight_t = malloc(sizeof(float) * C * W);
    if (!weight_t) return 1;
    for (int64_t c = 0; c < C; c++)
        for (int64_t j = 0; j < W; j++) weight_t[j * C + c] = weight[c * W + j];
    causal_conv p = {x, weight_t, bias, state, y, x_stride, batch, T, C, W, apply_silu};
    run_dynamic(causal_conv_task, &p, threads);
    free(weight_t);
    return 0;
}

typedef struct {
    const float *x, *z, *weight;
    int64_t rows, dim, group;
    float eps;
    int add_one, gate_first, use_sum;
    float *y;
    atomic_int_fast64_t next; /* claim()'s counter: left zero by the initialisers */
} rms_norm;

static void rms_norm_task(void *ctx, int thread, int threads) {
    (void)thread;
    rms_norm *p = ctx;
    const int64_t dim = p->dim, group = p->group;
    for (int64_t begin, end; claim(&p->next, p->rows, chunk_size(p->rows, threads, 1), &begin, &end);)
    for (int64_t r = begin; r < end; r++) {
        const float *xr = p->x + r * dim, *zr = p->z ? p->z + r * dim : NULL;
        float *yr = p->y + r * dim;
        memcpy(yr, xr, sizeof(float) * dim);
        if (zr && p->gate_first) times_silu(yr, zr, dim);
        for (int64_t g0 = 0; g0 < dim; g0 += group) {
            float squares = 0.0f;
#pragma omp simd reduction(+ : squares)
            for (int64_t c = g0; c < g0 + group; c++) squares += yr[c] * yr[c];
            const float inverse = 1.0f / __builtin_sqrtf((p->use_sum ? squares : squares / (float)group) + p->eps);
            for (int64_t c = g0; c < g0 + group; c++) {
                const float scale = p->weight ? (p->add_one ? 1.0f + p->weight[c] : p->weight[c]) : 1.0f;
                yr[c] = yr[c] * inverse * scale;
            }
        }
        if (zr && !p->gate_first) times_silu(yr, zr, dim);
    }
}

/* RMSNorm over groups of `group` channels, optionally gated (twins: hybridlm.layers.norm.RMSNorm and
 * GatedRMSNorm): per row and group, y = x / sqrt(mean(x^2) + eps) * scale, scale = weight (or
 * 1 + weight when add_one; 1 when weight is NULL). With z: gate = silu(z); gate_first multiplies x
 * by the gate before the norm (Mamba-2), else the output after it (Gated DeltaNet). With use_sum the
 * sum of squares replaces their mean: the L2 normalisation of Gated DeltaNet's q and k.
 * x, z, y [rows, dim] contiguous. */
void hybridlm_rms_norm(const float *x, const float *z, int64_t rows, int64_t dim, int64_t group,
                       const float *weight, float eps, int add_one, int gate_first, int use_sum, float *y,
                       int threads) {
    rms_norm p = {x, z, weight, rows, dim, group, eps, add_one, gate_first, use_sum, y};
    run_dynamic(rms_norm_task, &p, threads);
}

/* The activation of the MoE block's (token, expert) rows, in place into the first I columns of h [R, F]. */
typedef struct {
    float *h;
    int64_t R, F, I;
    int swiglu;
} expert_activation;

static void expert_activation_task(void *ctx, int thread, int threads) {
    const expert_activation *a = ctx;
    int64_t begin, end;
    share(a->R, thread, threads, &begin, &end);
    for (int64_t r = begin; r < end; r++) {
        float *row = a->h + r * a->F;
        for (int64_t i = 0; i < a->I; i++) {
            const float v = row[i];
            row[i] = a->swiglu ? v / (1.0f + __builtin_expf(-v)) * row[a->I + i] : (v > 0.0f ? v * v : 0.0f);
        }
    }
}

/* ---- Elementwise passes of prefill, on the pool: under a passive OpenMP wait policy torch's own take as
 * long on two threads as on one (a [1024, 640] silu: 224 us either way; 114 us with active waiting). */

typedef struct {
    const float *gate, *up;
    int64_t gate_stride, up_stride, rows, I;
    float *out;
    atomic_int_fast64_t next; /* claim()'s counter: left zero by the initialisers */
} swiglu;

static void swiglu_task(void *ctx, int thread, int threads) {
    (void)thread;
    swiglu *s = ctx;
    for (int64_t begin, end; claim(&s->next, s->rows, chunk_size(s->rows, threads, 1), &begin, &end);)
    for (int64_t r = begin; r < end; r++) {
        const float *g = s->gate + r * s->gate_stride, *u = s->up + r * s->up_stride;
        float *o = s->out + r * s->I;
        memcpy(o, u, sizeof(float) * s->I);
        times_silu(o, g, s->I);
    }
}

/* out [rows, I] = silu(gate) * up, gate and up [rows, I] with rows gate_stride / up_stride apart (twin:
 * F.silu(gate) * up). */
void hybridlm_swiglu(const float *gate, int64_t gate_stride, const float *up, int64_t up_stride, int64_t rows,
                     int64_t I, float *out, int threads) {
    swiglu s = {gate, up, gate_stride, up_stride, rows, I, out};
    run_dynamic(swiglu_task, &s, threads);
}

typedef struct {
    const float *y, *weights;
    const int64_t *row_of;
    float *out;
    int64_t N, D, top_k;
    const float *shared, *shared_gate; /* optional: added after the experts' sum, times sigmoid(gate) */
    int64_t shared_gate_stride;
    atomic_int_fast64_t next; /* claim()'s counter: left zero by the initialisers */
} combine;

static void combine_task(void *ctx, int thread, int threads) {
    (void)thread;
    combine *c = ctx;
    for (int64_t begin, end; claim(&c->next, c->N, chunk_size(c->N, threads, 1), &begin, &end);)
    for (int64_t n = begin; n < end; n++) {
        float *o = c->out + n * c->D;
        for (int64_t d = 0; d < c->D; d++) o[d] = 0.0f;
        for (int64_t k = 0; k < c->top_k; k++) {
            const float w = c->weights[n * c->top_k + k], *yr = c->y + c->row_of[n * c->top_k + k] * c->D;
            for (int64_t d = 0; d < c->D; d++) o[d] += w * yr[d];
        }
        if (c->shared) {
            const float *sr = c->shared + n * c->D;
            if (c->shared_gate) {
                const float g = 1.0f / (1.0f + __builtin_expf(-c->shared_gate[n * c->shared_gate_stride]));
                for (int64_t d = 0; d < c->D; d++) o[d] += g * sr[d];
            } else {
                for (int64_t d = 0; d < c->D; d++) o[d] += sr[d];
            }
        }
    }
}

/* out[n] = sum_k weights[n, k] * y[row_of[n, k]] for n < N (rows D wide, k in slot order): the MoE block's
 * weighted sum of each token's expert outputs (twin: index_add_ of the weighted rows). */
/* The MoE block's output: the experts' weighted sum, then (shared not NULL) + sigmoid(shared_gate[n]) *
 * shared[n], or + shared[n] without a gate (twin: route's weights, moe_experts_reference, then the shared
 * expert's output added as hybridlm.layers.moe does). */
static void combine_with_shared(const float *y, const int64_t *row_of, const float *weights, int64_t N,
                                int64_t top_k, int64_t D, const float *shared, const float *shared_gate,
                                int64_t shared_gate_stride, float *out, int threads) {
    combine c = {y, weights, row_of, out, N, D, top_k, shared, shared_gate, shared_gate_stride};
    run_dynamic(combine_task, &c, threads);
}

void hybridlm_combine(const float *y, const int64_t *row_of, const float *weights, int64_t N, int64_t top_k,
                      int64_t D, float *out, int threads) {
    combine_with_shared(y, row_of, weights, N, top_k, D, NULL, NULL, 0, out, threads);
}

/* Token routing (twin: hybridlm.ops.moe.route, ungrouped): scores = softmax(logits) or sigmoid(logits);
 * the top_k experts by scores + expert_bias (bias may be NULL), ties to the lower id, NaN above every number
 * as torch.topk ranks it (a NaN logit makes the token's output NaN, never an expert id out of range);
 * weights = their unbiased scores, divided by their sum when norm_topk, times scaling. E <= 1024. */
static void route_token(const float *l, int64_t E, int64_t top_k, int sigmoid_scores, const float *expert_bias,
                        int norm_topk, float scaling, int64_t *ids, float *weights) {
    float scores[1024], choice[1024];
    if (sigmoid_scores) {
        for (int64_t e = 0; e < E; e++) scores[e] = 1.0f / (1.0f + __builtin_expf(-l[e]));
    } else {
        float top = l[0], total = 0.0f;
        for (int64_t e = 1; e < E; e++) top = l[e] > top ? l[e] : top;
        for (int64_t e = 0; e < E; e++) total += (scores[e] = __builtin_expf(l[e] - top));
        for (int64_t e = 0; e < E; e++) scores[e] /= total;
    }
    unsigned char taken[1024];
    for (int64_t e = 0; e < E; e++) choice[e] = scores[e] + (expert_bias ? expert_bias[e] : 0.0f), taken[e] = 0;
    float sum = 0.0f;
    for (int64_t k = 0; k < top_k; k++) { /* the best remaining */
        int64_t best = -1;
        for (int64_t e = 0; e < E; e++) {
            if (taken[e]) continue;
            const int nan = choice[e] != choice[e];
            if (best < 0 || (nan && choice[best] == choice[best]) || choice[e] > choice[best]) best = e;
        }
        taken[best] = 1;
        ids[k] = best;
        weights[k] = scores[best];
        sum += scores[best];
    }
    for (int64_t k = 0; k < top_k; k++) weights[k] = (norm_topk ? weights[k] / (sum + 1e-20f) : weights[k]) * scaling;
}

/* A whole MoE block's routed experts for a few tokens, routing included (twin: hybridlm.ops.moe.route
 * then moe_experts_reference). Per token, route_token's choice; then out[n] = sum_k weights[n, k] *
 * down_e(act(up_e(x[n]))) with act = silu(gate) * up (swiglu: up_e yields 2I rows, gate first) or
 * relu(h)^2, plus the shared expert's output (see combine_with_shared; shared may be NULL). Every chosen
 * expert is read once for all its tokens. counts [E] gets the tokens per expert, ids/weights [N, K]
 * the choices. scratch: N*K*(2I + D) floats. N*K <= 256, E <= 1024. */
void hybridlm_moe_decode(const float *x, int64_t N, int64_t D, const float *logits, int64_t logits_stride,
                         int64_t E, int64_t top_k, int sigmoid_scores, const float *expert_bias, int norm_topk,
                         float scaling, const float *up, const float *down, int64_t I, int swiglu,
                         const float *shared, const float *shared_gate, int64_t shared_gate_stride, float *out,
                         int64_t *counts, int64_t *ids, float *weights, float *scratch, int threads) {
    const int64_t F = swiglu ? 2 * I : I, R = N * top_k;
    float *h = scratch, *y = scratch + R * F;
    for (int64_t n = 0; n < N; n++)
        route_token(logits + n * logits_stride, E, top_k, sigmoid_scores, expert_bias, norm_topk, scaling,
                    ids + n * top_k, weights + n * top_k);
    int64_t start[1024 + 1], order[256], tokens[256];
    group_by_expert(ids, R, E, start, order); /* (token, slot) rows */
    for (int64_t e = 0; e < E; e++) counts[e] = start[e + 1] - start[e];
    for (int64_t i = 0; i < R; i++) tokens[i] = order[i] / top_k;
    expert_product up_pass = {x, up, D, E, F, D, F, start, tokens, order, h};
    run(expert_product_task, &up_pass, threads);
    expert_activation activation = {h, R, F, I, swiglu};
    run(expert_activation_task, &activation, threads);
    /* the activations are rows of h with stride F, read I wide */
    expert_product down_pass = {h, down, F, E, D, I, D, start, order, order, y};
    run(expert_product_task, &down_pass, threads);
    for (int64_t i = 0; i < R; i++) order[i] = i; /* y's rows are in (token, slot) order */
    combine_with_shared(y, order, weights, N, top_k, D, shared, shared_gate, shared_gate_stride, out, threads);
}

/* ---- Prefill's matmuls on the pool, tile by tile -----------------------------------------------------
 * torch runs each matmul on both threads in turn, and under a passive wait policy each one wakes OpenMP's
 * sleeping thread (~100 us here); the routed experts' [~128, D] x [D, F] products get 1.6x from 2 threads.
 * Here a call's products (the experts of a MoE projection, or the weights reading one input) are cut into
 * tiles of at most 256 rows x 256 output columns, handed out in order to whichever thread is free (a thread
 * that wakes late takes fewer), each a single-threaded sgemm of torch's own MKL (handed over by native.py),
 * the bias or activation applied while the tile is in cache. Plain twin: F.linear per weight or expert,
 * then the activation (moe_experts_reference; torch.cat of F.linear). */
typedef void (*sgemm_fn)(const char *, const char *, const int *, const int *, const int *, const float *,
                         const float *, const int *, const float *, const int *, const float *, float *, const int *);
static sgemm_fn blas_sgemm;

typedef int (*set_local_threads_fn)(int);
static set_local_threads_fn blas_set_local_threads;

/* Hand over torch's MKL: Fortran sgemm_ and MKL_Set_Num_Threads_Local (the C one, taking an int). MKL's
 * own thread count (torch.set_num_threads sets it) overrides the caller's OpenMP count, so each task sets
 * its thread's MKL count to 1 for its calls: two threads each running a 2-thread sgemm took prefill from
 * 159 to 189-198 ms. */
void hybridlm_use_blas(void *sgemm, void *set_local_threads) {
    blas_sgemm = (sgemm_fn)sgemm;
    blas_set_local_threads = (set_local_threads_fn)set_local_threads;
}

enum { TILE_LINEAR = 0, TILE_RELU2 = 1, TILE_SWIGLU = 2 };
#define TILE_ROWS 256
#define TILE_COLUMNS 256

/* y [rows, columns] (row stride ldy) = act(x [rows, K] @ W [columns, K]^T + bias); under swiglu W holds the
 * gate rows and `up` the up rows: y = silu(x W^T) * (x up^T). */
typedef struct {
    const float *x, *W, *up, *bias;
    float *y;
    int64_t rows, K, columns, ldy;
} tile_product;

typedef struct {
    const tile_product *products;
    const int64_t *first_tile; /* product i's tiles: first_tile[i] .. first_tile[i + 1] */
    int64_t count;
    int activation;
    atomic_int_fast64_t next; /* the next tile to hand out */
} tiled_products;

/* y [m, n] (row stride ldy) = x [m, K] @ W [n, K]^T: column-major y^T = W^T' x^T', i.e. sgemm("T", "N"). */
static void sgemm_rows(const float *x, const float *W, int64_t m, int64_t n, int64_t K, float *y, int64_t ldy) {
    const int M = (int)m, N = (int)n, k = (int)K, ld = (int)ldy;
    const float one = 1.0f, zero = 0.0f;
    blas_sgemm("T", "N", &N, &M, &k, &one, W, &k, x, &k, &zero, y, &ld);
}

static int64_t blocks_of(int64_t n, int64_t block) { return (n + block - 1) / block; }

static void run_tile(const tile_product *p, int64_t tile, int activation, float *gate) {
    const int64_t row_blocks = blocks_of(p->rows, TILE_ROWS);
    const int64_t r0 = tile % row_blocks * TILE_ROWS, c0 = tile / row_blocks * TILE_COLUMNS;
    const int64_t rows = p->rows - r0 < TILE_ROWS ? p->rows - r0 : TILE_ROWS;
    const int64_t width = p->columns - c0 < TILE_COLUMNS ? p->columns - c0 : TILE_COLUMNS;
    const float *x = p->x + r0 * p->K;
    float *y = p->y + r0 * p->ldy + c0;
    if (activation == TILE_SWIGLU) {
        sgemm_rows(x, p->up + c0 * p->K, rows, width, p->K, y, p->ldy);
        sgemm_rows(x, p->W + c0 * p->K, rows, width, p->K, gate, width);
        for (int64_t r = 0; r < rows; r++) times_silu(y + r * p->ldy, gate + r * width, width);
        return;
    }
    sgemm_rows(x, p->W + c0 * p->K, rows, width, p->K, y, p->ldy);
    for (int64_t r = 0; r < rows; r++) {
        float *yr = y + r * p->ldy;
        if (p->bias)
            for (int64_t c = 0; c < width; c++) yr[c] += p->bias[c0 + c];
        if (activation == TILE_RELU2)
            for (int64_t c = 0; c < width; c++) yr[c] = yr[c] < 0.0f ? 0.0f : yr[c] * yr[c]; /* NaN stays NaN */
    }
}

static void tiled_products_task(void *ctx, int thread, int threads) {
    (void)thread, (void)threads;
    tiled_products *p = ctx;
    float *gate = NULL; /* swiglu: a tile's gate half (its up half goes into y) */
    if (p->activation == TILE_SWIGLU && !(gate = malloc(sizeof(float) * TILE_ROWS * TILE_COLUMNS)))
        return; /* the other threads take every tile */
    const int before = blas_set_local_threads(1); /* this thread's own setting, restored below */
    int64_t i = 0;
    for (int64_t t; (t = atomic_fetch_add(&p->next, 1)) < p->first_tile[p->count];) {
        while (p->first_tile[i + 1] <= t) i++; /* tiles are handed out in increasing order */
        run_tile(p->products + i, t - p->first_tile[i], p->activation, gate);
    }
    blas_set_local_threads(before);
    free(gate);
}

/* Every tile of products[0 .. count), in that order. Returns 1 (nothing done) when no BLAS was handed over
 * or there was no memory for the bookkeeping or the scratch tiles. */
static int run_products(const tile_product *products, int64_t count, int activation, int threads) {
    if (!blas_sgemm || !blas_set_local_threads) return 1;
    int64_t *first_tile = malloc(sizeof(int64_t) * (count + 1));
    if (!first_tile) return 1;
    first_tile[0] = 0;
    for (int64_t i = 0; i < count; i++) {
        const tile_product *p = products + i;
        first_tile[i + 1] = first_tile[i] + blocks_of(p->rows, TILE_ROWS) * blocks_of(p->columns, TILE_COLUMNS);
    }
    tiled_products work = {products, first_tile, count, activation, 0};
    run_dynamic(tiled_products_task, &work, threads);
    const int failed = atomic_load(&work.next) < first_tile[count]; /* no thread had scratch: no tile taken */
    free(first_tile);
    return failed;
}

/* y: rows start[e] .. start[e + 1] of x [M, K] times W[e] [N, K]^T for every expert e < E, then the
 * activation: none or relu2 (y [M, N]), or swiglu (W[e]'s first N / 2 rows the gate, then the up rows;
 * y [M, N / 2] = silu(gate) * up). by_rows lists the experts, most rows first (the order tiles go out). */
/* products[i] for the i-th expert of by_rows (see hybridlm_expert_matmuls). */
static void expert_products(tile_product *products, const float *x, const int64_t *start, const int64_t *by_rows,
                            int64_t E, const float *W, int64_t N, int64_t K, int activation, float *y) {
    const int64_t columns = activation == TILE_SWIGLU ? N / 2 : N;
    for (int64_t i = 0; i < E; i++) {
        const int64_t e = by_rows[i];
        const float *We = W + e * N * K;
        products[i] = (tile_product){x + start[e] * K, We, We + columns * K, NULL, y + start[e] * columns,
                                start[e + 1] - start[e], K, columns, columns};
    }
}

int hybridlm_expert_matmuls(const float *x, const int64_t *start, const int64_t *by_rows, int64_t E, const float *W,
                            int64_t N, int64_t K, int activation, float *y, int threads) {
    tile_product *products = malloc(sizeof(tile_product) * (E ? E : 1));
    if (!products) return 1;
    expert_products(products, x, start, by_rows, E, W, N, K, activation, y);
    const int failed = run_products(products, E, activation, threads);
    free(products);
    return failed;
}

/* y [M, sum Ns] = [x W_0^T + b_0, x W_1^T + b_1, ...] side by side, x [M, K], W_i [Ns[i], K], biases[i] NULL
 * or [Ns[i]] (twin: torch.cat of F.linear). */
int hybridlm_linear_tiles(const float *x, int64_t M, int64_t K, const float *const *Ws, const float *const *biases,
                          const int64_t *Ns, int64_t count, float *y, int threads) {
    tile_product *products = malloc(sizeof(tile_product) * (count ? count : 1));
    if (!products) return 1;
    int64_t total = 0;
    for (int64_t i = 0; i < count; i++) total += Ns[i];
    for (int64_t i = 0, offset = 0; i < count; offset += Ns[i], i++)
        products[i] = (tile_product){x, Ws[i], NULL, biases ? biases[i] : NULL, y + offset, M, K, Ns[i], total};
    const int failed = run_products(products, count, TILE_LINEAR, threads);
    free(products);
    return failed;
}

/* Prefill's routing, a chunk of tokens per claim. */
typedef struct {
    const float *logits, *expert_bias;
    int64_t N, logits_stride, E, top_k;
    int sigmoid_scores, norm_topk;
    float scaling;
    int64_t *ids;
    float *weights;
    atomic_int_fast64_t next;
} routing;

static void routing_task(void *ctx, int thread, int threads) {
    (void)thread;
    routing *r = ctx;
    for (int64_t begin, end; claim(&r->next, r->N, chunk_size(r->N, threads, 16), &begin, &end);)
        for (int64_t n = begin; n < end; n++)
            route_token(r->logits + n * r->logits_stride, r->E, r->top_k, r->sigmoid_scores, r->expert_bias,
                        r->norm_topk, r->scaling, r->ids + n * r->top_k, r->weights + n * r->top_k);
}

/* rows[i] = x[order[i] / top_k]: each (token, slot) pair's token, in expert order. */
typedef struct {
    const float *x;
    const int64_t *order;
    int64_t R, D, top_k;
    float *rows;
    atomic_int_fast64_t next;
} gather;

static void gather_task(void *ctx, int thread, int threads) {
    (void)thread;
    gather *g = ctx;
    for (int64_t begin, end; claim(&g->next, g->R, chunk_size(g->R, threads, 16), &begin, &end);)
        for (int64_t i = begin; i < end; i++)
            memcpy(g->rows + i * g->D, g->x + g->order[i] / g->top_k * g->D, sizeof(float) * g->D);
}

/* hybridlm_moe_decode's result for a prompt's tokens: routing (route_token) on the pool, the (token, slot)
 * pairs grouped by expert and their tokens gathered, both projections as tiles (activation fused), then
 * combine_with_shared. With shared_down (not NULL) the shared expert runs in the same two passes, its tiles
 * first: act(x shared_in^T, x shared_up^T) [N, S] (swiglu: shared_in the gate's [S, D], shared_up the up's;
 * relu2: shared_in the up's), then times shared_down [D, S]^T; `shared` is then ignored. order: 2 N*K int64s;
 * scratch: N*K*(D + I) + N*(S + D) floats. E <= 1024. Returns 1 (out not written) when the tiles could not
 * run (no BLAS handed over, no memory). */
int hybridlm_moe_prefill(const float *x, int64_t N, int64_t D, const float *logits, int64_t logits_stride,
                         int64_t E, int64_t top_k, int sigmoid_scores, const float *expert_bias, int norm_topk,
                         float scaling, const float *up, const float *down, int64_t I, int swiglu,
                         const float *shared, const float *shared_gate, int64_t shared_gate_stride,
                         const float *shared_in, const float *shared_up, const float *shared_down, int64_t S,
                         float *out, int64_t *counts, int64_t *ids, float *weights, int64_t *order, float *scratch,
                         int threads) {
    const int64_t R = N * top_k;
    const int activation = swiglu ? TILE_SWIGLU : TILE_RELU2;
    routing route = {logits, expert_bias, N, logits_stride, E, top_k, sigmoid_scores, norm_topk, scaling, ids,
                     weights};
    run_dynamic(routing_task, &route, threads);
    int64_t start[1024 + 1], by_rows[1024];
    group_by_expert(ids, R, E, start, order);
    for (int64_t e = 0; e < E; e++) counts[e] = start[e + 1] - start[e];
    for (int64_t e = 0; e < E; e++) { /* experts by rows, most first (stable): the order tiles go out */
        int64_t i = e;
        for (; i > 0 && counts[by_rows[i - 1]] < counts[e]; i--) by_rows[i] = by_rows[i - 1];
        by_rows[i] = e;
    }
    float *rows = scratch, *h = scratch + R * D, *shared_h = h + R * I, *shared_y = shared_h + N * S;
    gather pick = {x, order, R, D, top_k, rows};
    run_dynamic(gather_task, &pick, threads);
    const int has_shared = shared_down != NULL;
    tile_product *products = malloc(sizeof(tile_product) * (E + 1));
    if (!products) return 1;
    if (has_shared) products[0] = (tile_product){x, shared_in, shared_up, NULL, shared_h, N, D, S, S};
    expert_products(products + has_shared, rows, start, by_rows, E, up, swiglu ? 2 * I : I, D, activation, h);
    int failed = run_products(products, E + has_shared, activation, threads);
    if (!failed) {
        if (has_shared) products[0] = (tile_product){shared_h, shared_down, NULL, NULL, shared_y, N, S, D, D};
        expert_products(products + has_shared, h, start, by_rows, E, down, D, I, TILE_LINEAR, rows);
        failed = run_products(products, E + has_shared, TILE_LINEAR, threads);
    }
    free(products);
    if (failed) return 1;
    int64_t *row_of = order + R; /* where each (token, slot) pair's output row went */
    for (int64_t i = 0; i < R; i++) row_of[order[i]] = i;
    combine_with_shared(rows, row_of, weights, N, top_k, D, has_shared ? shared_y : shared, shared_gate,
                        shared_gate_stride, out, threads);
    return 0;
}
