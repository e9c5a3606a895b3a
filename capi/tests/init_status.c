/*
 * init_status: print what fastnorm_init() and a first call return, and how
 * the runtime was set up, as "key=value" lines for tests/test_capi.py
 * (used to check FASTNORM_PYTHONHOME, clean environments, cold-start time).
 */
#define _POSIX_C_SOURCE 200809L
#include <time.h>

#include "common.h"

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

int main(void)
{
    float x[2 * 8 * 3], y[2 * 8 * 3];
    double mean[8], rstd[8], t0, t1, t2;
    int64_t dims[3] = {2, 8, 3};
    int i, max_threads = 0;
    const char *layer = "";
    fastnorm_desc d;
    fastnorm_status st;

    for (i = 0; i < 2 * 8 * 3; ++i) x[i] = (float)(i % 5);
    fastnorm_desc_init(&d, sizeof d, FASTNORM_BATCH_NORM, FASTNORM_FLOAT32, 3, dims);
    t0 = now();
    st = fastnorm_forward_training(&d, x, NULL, NULL, y, mean, rstd);
    t1 = now();
    printf("first_call=%s\n", fastnorm_status_string(st));
    printf("first_call_seconds=%.6f\n", t1 - t0);
    if (st != FASTNORM_OK) printf("message=%s\n", fastnorm_last_error());
    st = fastnorm_init();
    printf("init=%s\n", fastnorm_status_string(st));
    t1 = now();
    st = fastnorm_forward_training(&d, x, NULL, NULL, y, mean, rstd);
    t2 = now();
    printf("second_call=%s\n", fastnorm_status_string(st));
    printf("second_call_seconds=%.6f\n", t2 - t1);
    if (fastnorm_runtime_info(&max_threads, &layer) == FASTNORM_OK)
        printf("max_threads=%d\nlayer=%s\n", max_threads, layer);
    if (st == FASTNORM_OK) printf("mean0=%.17g\nrstd0=%.17g\n", mean[0], rstd[0]);
    return 0;
}
