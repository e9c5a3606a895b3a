/*
 * threads: 8 POSIX threads call the C ABI concurrently (every kind, both
 * dtypes and layouts, forward / inference / backward, repeated) and must get
 * bitwise the results of the same calls made serially beforehand.
 *
 * With --lazy-init the threads run first, in a process where nothing has
 * initialized the library yet (concurrent lazy initialization), and their
 * results are compared with serial calls made afterwards.
 */
#define _POSIX_C_SOURCE 200809L
#include <pthread.h>

#include "common.h"

#define NTHREADS 8
#define REPEATS 3
#define NCASES 12

typedef struct result {
    void *y, *yinf, *dx, *dw, *db;
    double *mean, *rstd;
} result;

static fastnorm_desc cases[NCASES];
static void *inputs_x[NCASES], *inputs_dy[NCASES], *inputs_w[NCASES], *inputs_b[NCASES];
static result serial[NCASES];

static void make_cases(void)
{
    static const int64_t shapes[][4] = {{4, 16, 24, 24}, {3, 32, 40, 40}};
    int i = 0, kind, dtype, k;
    for (kind = FASTNORM_BATCH_NORM; kind <= FASTNORM_RMS_NORM; ++kind) {
        for (dtype = FASTNORM_FLOAT32; dtype <= FASTNORM_FLOAT64; ++dtype) {
            if (i >= NCASES) return;
            fastnorm_desc_init(&cases[i], sizeof(fastnorm_desc), (fastnorm_kind)kind, (fastnorm_dtype)dtype,
                               4, shapes[i % 2]);
            if (kind == FASTNORM_GROUP_NORM) cases[i].num_groups = 4;
            if (kind == FASTNORM_LAYER_NORM || kind == FASTNORM_RMS_NORM) cases[i].normalized_ndim = 2;
            else cases[i].layout = (i / 2) % 2 ? FASTNORM_CHANNELS_LAST : FASTNORM_CHANNELS_FIRST;
            ++i;
        }
    }
    /* two more: BN channels-last f32 and GN channels-last f64 */
    fastnorm_desc_init(&cases[10], sizeof(fastnorm_desc), FASTNORM_BATCH_NORM, FASTNORM_FLOAT32, 4,
                       shapes[1]);
    cases[10].layout = FASTNORM_CHANNELS_LAST;
    fastnorm_desc_init(&cases[11], sizeof(fastnorm_desc), FASTNORM_GROUP_NORM, FASTNORM_FLOAT64, 4,
                       shapes[0]);
    cases[11].layout = FASTNORM_CHANNELS_LAST;
    cases[11].num_groups = 8;
    (void)k;
}

static int run(int c, result *r)
{
    const fastnorm_desc *d = &cases[c];
    fastnorm_status s1, s2, s3;
    s1 = fastnorm_forward_training(d, inputs_x[c], inputs_w[c], inputs_b[c], r->y, r->mean, r->rstd);
    s2 = fastnorm_forward_inference(d, inputs_x[c], inputs_w[c], inputs_b[c], r->mean, r->rstd, r->yinf);
    s3 = fastnorm_backward(d, inputs_dy[c], inputs_x[c], inputs_w[c], r->mean, r->rstd, r->dx, r->dw, r->db);
    return s1 == FASTNORM_OK && s2 == FASTNORM_OK && s3 == FASTNORM_OK;
}

static void alloc_result(int c, result *r)
{
    int64_t n = desc_elements(&cases[c]), np_ = 0, ns = 0;
    size_t es = dtype_size(&cases[c]);
    fastnorm_num_params(&cases[c], &np_);
    fastnorm_num_stats(&cases[c], &ns);
    r->y = xmalloc((size_t)n * es);
    r->yinf = xmalloc((size_t)n * es);
    r->dx = xmalloc((size_t)n * es);
    r->dw = xmalloc((size_t)np_ * es);
    r->db = xmalloc((size_t)np_ * es);
    r->mean = xmalloc((size_t)ns * 8);
    r->rstd = xmalloc((size_t)ns * 8);
}

static void free_result(result *r)
{
    free(r->y);
    free(r->yinf);
    free(r->dx);
    free(r->dw);
    free(r->db);
    free(r->mean);
    free(r->rstd);
}

static int same(int c, const result *a, const result *b)
{
    int64_t n = desc_elements(&cases[c]), np_ = 0, ns = 0;
    size_t es = dtype_size(&cases[c]);
    fastnorm_num_params(&cases[c], &np_);
    fastnorm_num_stats(&cases[c], &ns);
    return memcmp(a->y, b->y, (size_t)n * es) == 0 && memcmp(a->yinf, b->yinf, (size_t)n * es) == 0
        && memcmp(a->dx, b->dx, (size_t)n * es) == 0 && memcmp(a->dw, b->dw, (size_t)np_ * es) == 0
        && memcmp(a->db, b->db, (size_t)np_ * es) == 0 && memcmp(a->mean, b->mean, (size_t)ns * 8) == 0
        && memcmp(a->rstd, b->rstd, (size_t)ns * 8) == 0;
}

static result lazy_results[NTHREADS][NCASES];

static void *lazy_worker(void *arg)
{
    long id = (long)arg, failed = 0;
    int j;
    for (j = 0; j < NCASES; ++j) {
        int c = (int)((j + id) % NCASES);
        alloc_result(c, &lazy_results[id][c]);
        if (!run(c, &lazy_results[id][c])) ++failed;
    }
    return (void *)failed;
}

static void *worker(void *arg)
{
    long id = (long)arg;
    long mismatches = 0;
    int rep, j;
    for (rep = 0; rep < REPEATS; ++rep) {
        for (j = 0; j < NCASES; ++j) {
            int c = (int)((j + id + rep) % NCASES); /* threads hit different cases at once */
            result r;
            alloc_result(c, &r);
            if (!run(c, &r) || !same(c, &r, &serial[c])) ++mismatches;
            free_result(&r);
        }
    }
    return (void *)mismatches;
}

int main(int argc, char **argv)
{
    pthread_t threads[NTHREADS];
    long t, total = 0;
    int c, lazy = argc > 1 && strcmp(argv[1], "--lazy-init") == 0;
    make_cases();
    for (c = 0; c < NCASES; ++c) {
        int64_t n = desc_elements(&cases[c]), np_ = 0;
        size_t es = dtype_size(&cases[c]);
        fastnorm_num_params(&cases[c], &np_);
        inputs_x[c] = xmalloc((size_t)n * es);
        inputs_dy[c] = xmalloc((size_t)n * es);
        inputs_w[c] = xmalloc((size_t)np_ * es);
        inputs_b[c] = xmalloc((size_t)np_ * es);
        fill(inputs_x[c], n, cases[c].dtype, 3u * (unsigned)c + 1u);
        fill(inputs_dy[c], n, cases[c].dtype, 3u * (unsigned)c + 2u);
        fill(inputs_w[c], np_, cases[c].dtype, 3u * (unsigned)c + 3u);
        fill(inputs_b[c], np_, cases[c].dtype, 3u * (unsigned)c + 4u);
    }
    if (lazy) {
        for (t = 0; t < NTHREADS; ++t)
            CHECK(pthread_create(&threads[t], NULL, lazy_worker, (void *)t) == 0, "pthread_create");
        for (t = 0; t < NTHREADS; ++t) {
            void *ret = NULL;
            pthread_join(threads[t], &ret);
            CHECK(ret == NULL, "thread %ld: %ld failed calls during lazy initialization", t, (long)ret);
        }
    }
    for (c = 0; c < NCASES; ++c) {
        alloc_result(c, &serial[c]);
        CHECK(run(c, &serial[c]), "serial case %d: %s", c, fastnorm_last_error());
    }
    if (lazy) {
        for (t = 0; t < NTHREADS; ++t)
            for (c = 0; c < NCASES; ++c) {
                if (!same(c, &lazy_results[t][c], &serial[c])) ++total;
                free_result(&lazy_results[t][c]);
            }
    }
    for (t = 0; t < NTHREADS; ++t)
        CHECK(pthread_create(&threads[t], NULL, worker, (void *)t) == 0, "pthread_create");
    for (t = 0; t < NTHREADS; ++t) {
        void *ret = NULL;
        pthread_join(threads[t], &ret);
        total += (long)ret;
    }
    CHECK(total == 0, "%ld concurrent results differ from the serial ones", total);
    printf("threads%s: %d threads x %d repeats x %d cases, %ld mismatches, %d failures\n",
           lazy ? " (lazy init)" : "", NTHREADS, REPEATS, NCASES, total, g_failures);
    return g_failures ? 1 : 0;
}
