/* SOAA's two elementwise passes on CPU, one sweep each, over many blocks per call
 * (see lightning_soaa/kernels/soaa_native.py, which builds this file at run time and calls it
 * through ctypes on raw pointers of contiguous tensors). Nothing here keeps state.
 *
 * sums (reads only; a skipped step must leave m and v untouched), per block, by its mode:
 *   mode 0: [sum m^2, sum v] of the stored moments: reads m, v (only where the caller does not know them
 *           from the previous step; the same accumulation as the step's, so the same bits);
 *   mode 1: [sum m g, sum g^2]: reads g, m (8 B/param in fp32). With sum m^2 and sum v of the stored
 *           moments, the caller has sum m_t^2 = b1^2 sum m^2 + 2 b1 (1-b1) sum m g + (1-b1)^2 sum g^2
 *           and sum v_t = b2 sum v + (1 - b2) sum g^2 of the would-be moments m_t = m + (g - m)(1 - b1),
 *           v_t = b2 v + (1 - b2) g^2 without reading v. Always this formula (never a direct sum of
 *           m_t^2), so a run resumed from a checkpoint takes the same bits as the uninterrupted one.
 * step: reads p, g, m, v and writes p, m, v in place (28 B/param in fp32); from the same sweep, per
 *   block, [sum m q, sum (s q)^2, #(s < knee), sum m_t^2, sum v_t] with s = sqrt(v_t),
 *   q = m_t / (eps + k1 s max(s, knee)) and p <- p decay + alr q.
 *
 * Why hand-written: torch.compile's CPU code for the step, once the kernel also reduces, stores m_t and
 * v_t into temporaries and copies them back in two more loops, so its update sums cost another read.
 * Here a whole step is 8 + 28 = 36 B/param against fused AdamW's 28 B, in two calls for all blocks.
 *
 * Work is cut into CHUNKs (a block smaller than a chunk is one chunk); chunks of all blocks are shared
 * among the threads; each chunk's sums are accumulated in fixed lanes over INNER-long runs in the
 * compute type (which the compiler vectorises; see LANE_RUN) and added in double, and one thread adds the
 * chunks of a block in order: the results do not depend on the number of threads.
 *
 * Threads. Built with -fopenmp (soaa_native.py does so only when it can link the OpenMP runtime torch
 * itself runs on, already loaded in the process), a call runs on torch's own pool: after torch's ops
 * that pool's workers spin-wait on the other cores for a while (GNU libgomp's default), and threads of
 * our own would share those cores with them (measured: SOAA's step 2.2-2.7x fused AdamW's when the two
 * alternate, 1.5x on the pool). Without OpenMP, or in a forked child, they are plain pthreads started
 * and joined inside the call: a child cannot use the parent's pool (its workers are not in the child,
 * and a parallel region waits for them forever; torch's own parallel ops hang there too), and a call
 * costs a few tens of microseconds per extra thread. Either way only calls with at least
 * MIN_PER_THREAD elements per thread take a second thread. Which process is a fork is decided in
 * lightning_soaa/kernels/forks.py (the loader calls soaa_cpu_forked() there).
 */
#include <math.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define CHUNK 16384
#define INNER 512
#define SUMS_OUT 2
#define STEP_IN 8
#define STEP_OUT 5

static inline float bf16_load(uint16_t x) {
    uint32_t u = (uint32_t)x << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* f rounded to bf16, as a float (the low 16 bits zero): to nearest even, as torch does; a NaN stays a
 * (quiet) NaN. The step sums the stored moments in this form, so they are narrowed only once, to store. */
static inline float bf16_round(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    uint32_t nan = (u & 0x7fffffffu) > 0x7f800000u;
    uint32_t bits = nan ? (u | 0x400000u) & 0xffff0000u : (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* the upper half of an already rounded float: its bf16 bits */
static inline uint16_t bf16_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return (uint16_t)(u >> 16);
}

static inline uint16_t bf16_store(float f) { return bf16_bits(bf16_round(f)); }

#define ID(x) (x)
#define MAX_THREADS 256
#define MIN_PER_THREAD (1 << 18)

/* set in a forked child: here for forks after this library was loaded; the loader calls
 * soaa_cpu_forked() when it loads the library into a fork (see kernels/forks.py) */
static volatile int forked;
void soaa_cpu_forked(void) { forked = 1; }
__attribute__((constructor)) static void watch_fork(void) { pthread_atfork(NULL, NULL, soaa_cpu_forked); }

/* 1 when calls run on the process's OpenMP pool (until a fork), 0 on threads of their own */
int soaa_cpu_pool(void) {
#ifdef _OPENMP
    return !forked;
#else
    return 0;
#endif
}

typedef void (*chunk_fn)(const void *job, int64_t c);

typedef struct {
    chunk_fn fn;
    const void *job;
    int64_t c0, c1;
} span;

static void *run_span(void *arg) {
    const span *s = (const span *)arg;
    for (int64_t c = s->c0; c < s->c1; c++) s->fn(s->job, c);
    return NULL;
}

/* chunks [0, total) of job on up to `threads` threads (fewer for little work); a thread that cannot be
 * started runs its span on the calling thread */
static void run_chunks(chunk_fn fn, const void *job, int64_t total, int64_t elements, int threads) {
    int64_t cap = elements / MIN_PER_THREAD;
    int nt = threads < 1 ? 1 : threads;
    if (nt > MAX_THREADS) nt = MAX_THREADS;
    if (nt > cap) nt = cap < 1 ? 1 : (int)cap;
    if (nt > total) nt = total < 1 ? 1 : (int)total;
#ifdef _OPENMP
    if (nt > 1 && !forked) {
        /* The team torch's own regions use: a smaller one would make libgomp let workers go, and torch's
         * next region start them again. Its first nt members (fewer if the team is smaller than asked
         * for) take the spans; the others only meet the closing barrier. */
        const int team = threads > nt ? threads : nt;
#pragma omp parallel num_threads(team)
        {
            const int t = omp_get_thread_num(), got = omp_get_num_threads(), n = got < nt ? got : nt;
            if (t < n) {
                const span s = {fn, job, total * t / n, total * (t + 1) / n};
                run_span((void *)&s);
            }
        }
        return;
    }
#endif
    span spans[MAX_THREADS];
    pthread_t tid[MAX_THREADS];
    int started[MAX_THREADS];
    for (int t = 0; t < nt; t++) {
        spans[t].fn = fn;
        spans[t].job = job;
        spans[t].c0 = total * t / nt;
        spans[t].c1 = total * (t + 1) / nt;
    }
    for (int t = 1; t < nt; t++) started[t] = pthread_create(&tid[t], NULL, run_span, &spans[t]) == 0;
    run_span(&spans[0]);
    for (int t = 1; t < nt; t++) {
        if (started[t]) pthread_join(tid[t], NULL);
        else run_span(&spans[t]);
    }
}

typedef struct {
    int nb;
    const void *const *p, *const *g, *const *m, *const *v;
    const int64_t *n, *first;
    const int *mode;
    const double *sc;
    double *part;
} job_t;

static int64_t total_elements(int nb, const int64_t *n) {
    int64_t e = 0;
    for (int b = 0; b < nb; b++) e += n[b];
    return e;
}

/* The chunk table of nb blocks: first[b] is block b's first chunk, first[nb] the total. */
static int64_t *chunk_table(int nb, const int64_t *n) {
    int64_t *first = (int64_t *)malloc(sizeof(int64_t) * (size_t)(nb + 1));
    if (!first) return NULL;
    first[0] = 0;
    for (int b = 0; b < nb; b++) first[b + 1] = first[b] + (n[b] + CHUNK - 1) / CHUNK + (n[b] == 0);
    return first;
}

/* block of chunk c (first is sorted): binary search */
static int block_of(const int64_t *first, int nb, int64_t c) {
    int lo = 0, hi = nb - 1;
    while (lo < hi) {
        int mid = (lo + hi + 1) / 2;
        if (first[mid] <= c) lo = mid; else hi = mid - 1;
    }
    return lo;
}

/* chunk results of every block, added in order into out[b * k + j] */
static void add_chunks(int nb, const int64_t *first, const double *part, int k, double *out) {
    for (int b = 0; b < nb; b++) {
        for (int j = 0; j < k; j++) out[b * k + j] = 0.0;
        for (int64_t c = first[b]; c < first[b + 1]; c++)
            for (int j = 0; j < k; j++) out[b * k + j] += part[c * k + j];
    }
}

/* Lanes: every sum is kept in LN (per type, below; SUMS_GM_LANES for mode 1) independent partial sums,
 * element i of a run going to lane (i - run start) % LN, the last partial group of a run to lanes 0, 1, ...; each run
 * (INNER elements) adds its lanes into double lanes, and the chunk's result is the double lanes added in
 * lane order. The order of every addition is thus written here, not chosen by the vectoriser (with
 * -ffp-contract=off, no multiply-add is fused in one loop and not in another): the step's sum m^2,
 * sum v and the sums pass's mode 0 are the same arithmetic on the same values, so the same bits. */
#define SUMS_GM_LANES 16

/* BODY for elements [j, e) with `i` the element and `l` its lane (a statement list, may use commas) */
#define LANE_RUN(NL, j, e, ...)                                                                            \
    {                                                                                                      \
        int64_t i0 = (j);                                                                                  \
        for (; i0 + (NL) <= (e); i0 += (NL)) {                                                             \
            _Pragma("omp simd")                                                                           \
            for (int l = 0; l < (NL); l++) {                                                               \
                const int64_t i = i0 + l;                                                                  \
                __VA_ARGS__                                                                                \
            }                                                                                              \
        }                                                                                                  \
        for (int l = 0; i0 + l < (e); l++) {                                                               \
            const int64_t i = i0 + l;                                                                      \
            __VA_ARGS__                                                                                    \
        }                                                                                                  \
    }

/* run lanes f[K][NL] (compute type) into double lanes d[K][NL], then zero them */
#define LANES_TO_DOUBLE(K, NL, f, d)                                                                       \
    for (int k = 0; k < (K); k++) {                                                                        \
        _Pragma("omp simd")                                                                               \
        for (int l = 0; l < (NL); l++) {                                                                   \
            d[k][l] += (double)f[k][l];                                                                    \
            f[k][l] = 0;                                                                                   \
        }                                                                                                  \
    }

#define LANES_OUT(K, NL, d, res)                                                                           \
    for (int k = 0; k < (K); k++) {                                                                        \
        double t = 0;                                                                                      \
        for (int l = 0; l < (NL); l++) t += d[k][l];                                                       \
        res[k] = t;                                                                                        \
    }

#define SOAA_SUMS(NAME, S, C, LOAD, LN)                                                                    \
    static void sums_chunk_##NAME(const S *restrict g, const S *restrict m, const S *restrict v,            \
                                  int64_t lo, int64_t hi, int mode, double *res) {                          \
        if (mode == 0) { /* the same lanes and order as the step's sum m^2, sum v: bit-identical */      \
            C f[2][LN] = {{0}};                                                                         \
            double d[2][LN] = {{0}};                                                                    \
            for (int64_t j = lo; j < hi; j += INNER) {                                                     \
                const int64_t e = j + INNER < hi ? j + INNER : hi;                                         \
                LANE_RUN(LN, j, e, const C mi = LOAD(m[i]); f[0][l] += mi * mi; f[1][l] += LOAD(v[i]);) \
                LANES_TO_DOUBLE(2, LN, f, d)                                                            \
            }                                                                                              \
            LANES_OUT(2, LN, d, res)                                                                    \
        } else {                                                                                           \
            C f[2][SUMS_GM_LANES] = {{0}};                                                                 \
            double d[2][SUMS_GM_LANES] = {{0}};                                                            \
            for (int64_t j = lo; j < hi; j += INNER) {                                                     \
                const int64_t e = j + INNER < hi ? j + INNER : hi;                                         \
                LANE_RUN(SUMS_GM_LANES, j, e, const C gi = LOAD(g[i]); f[0][l] += LOAD(m[i]) * gi;         \
                         f[1][l] += gi * gi;)                                                              \
                LANES_TO_DOUBLE(2, SUMS_GM_LANES, f, d)                                                    \
            }                                                                                              \
            LANES_OUT(2, SUMS_GM_LANES, d, res)                                                            \
        }                                                                                                  \
    }                                                                                                      \
                                                                                                           \
    static void sums_job_##NAME(const void *job, int64_t c) {                                              \
        const job_t *j = (const job_t *)job;                                                               \
        const int b = block_of(j->first, j->nb, c);                                                        \
        const int64_t lo = (c - j->first[b]) * CHUNK, hi = lo + CHUNK < j->n[b] ? lo + CHUNK : j->n[b];    \
        sums_chunk_##NAME((const S *)j->g[b], (const S *)j->m[b], (const S *)j->v[b], lo, hi, j->mode[b],  \
                          j->part + SUMS_OUT * c);                                                         \
    }                                                                                                      \
                                                                                                           \
    int soaa_sums_##NAME(int nb, const void *const *g, const void *const *m, const void *const *v,         \
                         const int64_t *n, const int *mode, double *out, int threads) {                    \
        int64_t *first = chunk_table(nb, n);                                                               \
        double *part = first ? (double *)malloc(sizeof(double) * SUMS_OUT * (size_t)(first[nb] + 1)) : 0;  \
        if (!part) { free(first); return 1; }                                                              \
        job_t job = {nb, 0, g, m, v, n, first, mode, 0, part}; /* no scalars: the sums only add */         \
        run_chunks(sums_job_##NAME, &job, first[nb], total_elements(nb, n), threads);                      \
        add_chunks(nb, first, part, SUMS_OUT, out);                                                        \
        free(part);                                                                                        \
        free(first);                                                                                       \
        return 0;                                                                                          \
    }

#define SOAA_STEP(NAME, S, C, LOAD, STORE, ROUND, BITS, SQRT, LN)                                     \
    static void step_chunk_##NAME(S *restrict p, const S *restrict g, S *restrict m, S *restrict v,          \
                                  int64_t lo, int64_t hi, const double *sc, double *res) {                  \
        const C a = (C)sc[0], b2 = (C)sc[1], b2c = (C)sc[2], decay = (C)sc[3], alr = (C)sc[4];             \
        const C k1 = (C)sc[5], knee = (C)sc[6], eps = (C)sc[7];                                            \
        C f[STEP_OUT][LN] = {{0}};                                                                      \
        double d[STEP_OUT][LN] = {{0}};                                                                 \
        for (int64_t j = lo; j < hi; j += INNER) {                                                         \
            const int64_t e = j + INNER < hi ? j + INNER : hi;                                             \
            LANE_RUN(LN, j, e,                                                                          \
                const C gi = LOAD(g[i]), mi = LOAD(m[i]);                                                  \
                const C mt = mi + (gi - mi) * a;                                                           \
                const C vt = LOAD(v[i]) * b2 + gi * gi * b2c;                                              \
                const C r = SQRT(vt);                                                                      \
                const C q = mt / (eps + k1 * (r > knee ? r : knee) * r);                                   \
                const C mr = ROUND(mt), vr = ROUND(vt); /* the stored (rounded) moments are summed */   \
                m[i] = BITS(mr);                                                                           \
                v[i] = BITS(vr);                                                                           \
                p[i] = STORE(LOAD(p[i]) * decay + alr * q);                                                \
                const C rq = r * q;                                                                        \
                f[0][l] += mt * q;                                                                         \
                f[1][l] += rq * rq;                                                                        \
                f[2][l] += r < knee ? (C)1 : (C)0;                                                         \
                f[3][l] += mr * mr;                                                                        \
                f[4][l] += vr;)                                                                            \
            LANES_TO_DOUBLE(STEP_OUT, LN, f, d)                                                         \
        }                                                                                                  \
        LANES_OUT(STEP_OUT, LN, d, res)                                                                 \
    }                                                                                                      \
                                                                                                           \
    static void step_job_##NAME(const void *job, int64_t c) {                                              \
        const job_t *j = (const job_t *)job;                                                               \
        const int b = block_of(j->first, j->nb, c);                                                        \
        const int64_t lo = (c - j->first[b]) * CHUNK, hi = lo + CHUNK < j->n[b] ? lo + CHUNK : j->n[b];    \
        step_chunk_##NAME((S *)j->p[b], (const S *)j->g[b], (S *)j->m[b], (S *)j->v[b], lo, hi,             \
                          j->sc + STEP_IN * b, j->part + STEP_OUT * c);                                    \
    }                                                                                                      \
                                                                                                           \
    int soaa_step_##NAME(int nb, void *const *p, const void *const *g, void *const *m, void *const *v,     \
                         const int64_t *n, const double *sc, double *out, int threads) {                   \
        int64_t *first = chunk_table(nb, n);                                                               \
        double *part = first ? (double *)malloc(sizeof(double) * STEP_OUT * (size_t)(first[nb] + 1)) : 0;  \
        if (!part) { free(first); return 1; }                                                              \
        job_t job = {nb, (const void *const *)p, g, (const void *const *)m, (const void *const *)v, n,     \
                     first, 0, sc, part};                                                                  \
        run_chunks(step_job_##NAME, &job, first[nb], total_elements(nb, n), threads);                      \
        add_chunks(nb, first, part, STEP_OUT, out);                                                        \
        free(part);                                                                                        \
        free(first);                                                                                       \
        return 0;                                                                                          \
    }

/* lanes: one 256-bit register of the compute type for f32/f64; bf16 takes 16 (its 16-bit loads and
 * stores vectorise at full width only then; 8 halved the speed of its compute-bound step) */
SOAA_SUMS(f32, float, float, ID, 8)
SOAA_SUMS(f64, double, double, ID, 8)
SOAA_SUMS(bf16, uint16_t, float, bf16_load, 16)
SOAA_STEP(f32, float, float, ID, ID, ID, ID, sqrtf, 8)
SOAA_STEP(f64, double, double, ID, ID, ID, ID, sqrt, 8)
SOAA_STEP(bf16, uint16_t, float, bf16_load, bf16_store, bf16_round, bf16_bits, sqrtf, 16)

/* the ABI version the loader checks, so a stale cached build is never used */
int soaa_cpu_abi(void) { return 7; }
