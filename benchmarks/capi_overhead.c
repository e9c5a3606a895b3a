/*
 * capi_overhead.c -- time fastnorm calls from C (driven by capi_overhead.py).
 *
 * usage: capi_overhead KIND DTYPE ITERS REPEATS d0 d1 ...
 *   KIND 1..5 (fastnorm_kind), DTYPE 1 (f32) / 2 (f64); GroupNorm uses 8 groups,
 *   LN/RMS normalize the last dim.  Prints the best-of-REPEATS mean time per
 *   call, in microseconds, of forward_training, forward_inference, backward,
 *   and of a rejected call (x == NULL: descriptor validation only, no kernel).
 *   The environment variable BENCH_THREADS=n calls fastnorm_set_num_threads(n).
 */
#define _POSIX_C_SOURCE 200809L
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "fastnorm.h"

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

int main(int argc, char **argv)
{
    fastnorm_desc d;
    int64_t dims[FASTNORM_MAX_RANK], n = 1, ns = 0, np_ = 0, i;
    int rank = argc - 5, iters, repeats, r, op, k;
    size_t es;
    void *x, *y, *dy, *dx, *w, *b, *dw, *db;
    double *mean, *rstd, best[4] = {1e30, 1e30, 1e30, 1e30};
    const char *threads = getenv("BENCH_THREADS");
    if (argc < 7 || rank > FASTNORM_MAX_RANK) {
        fprintf(stderr, "usage: %s KIND DTYPE ITERS REPEATS d0 d1 ...\n", argv[0]);
        return 2;
    }
    iters = atoi(argv[3]);
    repeats = atoi(argv[4]);
    for (k = 0; k < rank; ++k) n *= (dims[k] = atoll(argv[5 + k]));
    fastnorm_desc_init(&d, sizeof d, (fastnorm_kind)atoi(argv[1]), (fastnorm_dtype)atoi(argv[2]), rank, dims);
    if (d.kind == FASTNORM_GROUP_NORM) d.num_groups = 8;
    if (fastnorm_num_stats(&d, &ns) != FASTNORM_OK || fastnorm_num_params(&d, &np_) != FASTNORM_OK) {
        fprintf(stderr, "%s\n", fastnorm_last_error());
        return 2;
    }
    es = d.dtype == FASTNORM_FLOAT64 ? 8 : 4;
    x = malloc((size_t)n * es);
    y = malloc((size_t)n * es);
    dy = malloc((size_t)n * es);
    dx = malloc((size_t)n * es);
    w = malloc((size_t)np_ * es);
    b = malloc((size_t)np_ * es);
    dw = malloc((size_t)np_ * es);
    db = malloc((size_t)np_ * es);
    mean = malloc((size_t)ns * 8);
    rstd = malloc((size_t)ns * 8);
    for (i = 0; i < n; ++i) {
        double v = (double)((i * 7919) % 1000) / 250.0 - 2.0;
        if (es == 8) {
            ((double *)x)[i] = v;
            ((double *)dy)[i] = -v;
        } else {
            ((float *)x)[i] = (float)v;
            ((float *)dy)[i] = (float)-v;
        }
    }
    for (i = 0; i < np_; ++i) {
        if (es == 8) {
            ((double *)w)[i] = 1.0;
            ((double *)b)[i] = 0.0;
        } else {
            ((float *)w)[i] = 1.0f;
            ((float *)b)[i] = 0.0f;
        }
    }
    /* init, and warm up: each operation's first call loads its kernel */
    if (fastnorm_forward_training(&d, x, w, b, y, mean, rstd) != FASTNORM_OK
        || fastnorm_forward_inference(&d, x, w, b, mean, rstd, y) != FASTNORM_OK
        || fastnorm_backward(&d, dy, x, w, mean, rstd, dx, dw, db) != FASTNORM_OK) {
        fprintf(stderr, "%s\n", fastnorm_last_error());
        return 1;
    }
    if (threads != NULL && fastnorm_set_num_threads(atoi(threads)) != FASTNORM_OK) {
        fprintf(stderr, "%s\n", fastnorm_last_error());
        return 1;
    }
    for (r = 0; r < repeats; ++r) {
        for (op = 0; op < 4; ++op) {
            double t0 = now(), t;
            for (k = 0; k < iters; ++k) {
                fastnorm_status st;
                if (op == 0) st = fastnorm_forward_training(&d, x, w, b, y, mean, rstd);
                else if (op == 1) st = fastnorm_forward_inference(&d, x, w, b, mean, rstd, y);
                else if (op == 2) st = fastnorm_backward(&d, dy, x, w, mean, rstd, dx, dw, db);
                else
                    st = fastnorm_forward_training(&d, NULL, w, b, y, mean, rstd) == FASTNORM_NULL_POINTER
                        ? FASTNORM_OK
                        : FASTNORM_INTERNAL_ERROR;
                if (st != FASTNORM_OK) return 1;
            }
            t = (now() - t0) / iters;
            if (t < best[op]) best[op] = t;
        }
    }
    printf("forward_training %.3f\nforward_inference %.3f\nbackward %.3f\nrejected_call %.3f\n",
           best[0] * 1e6, best[1] * 1e6, best[2] * 1e6, best[3] * 1e6);
    return 0;
}
