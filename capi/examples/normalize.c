/*
 * normalize.c -- normalize a small NCHW tensor with each of the five kinds
 * through the fastnorm C ABI, check the result against a direct computation,
 * and run one backward pass.
 *
 * Build (after `python -m fastnorm.capi build`):
 *   cc -std=c99 normalize.c $(pkg-config --cflags --libs capi/build/fastnorm.pc) -lm -o normalize
 * or
 *   cc -std=c99 normalize.c $(python -m fastnorm.capi --cflags --libs) -lm -o normalize
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include "fastnorm.h"

#define N 2
#define C 6
#define H 4
#define W 5
#define SIZE (N * C * H * W)

/* Direct computation of y[i]: two sums over the members of i's group (weight 1, bias 0). */
static double reference(const float *x, int kind, int groups, int i)
{
    int n = i / (C * H * W), c = (i / (H * W)) % C, j;
    double sum = 0.0, sq = 0.0, mean, var, cnt = 0.0;
    for (j = 0; j < SIZE; ++j) {
        int nj = j / (C * H * W), cj = (j / (H * W)) % C, same;
        switch (kind) {
        case FASTNORM_BATCH_NORM: same = cj == c; break;
        case FASTNORM_INSTANCE_NORM: same = nj == n && cj == c; break;
        case FASTNORM_GROUP_NORM: same = nj == n && cj / (C / groups) == c / (C / groups); break;
        default: same = nj == n && (j / (H * W)) == (i / (H * W)); break; /* LN/RMS over (H, W) */
        }
        if (same) {
            sum += x[j];
            sq += (double)x[j] * x[j];
            cnt += 1.0;
        }
    }
    mean = sum / cnt;
    if (kind == FASTNORM_RMS_NORM) return x[i] / sqrt(sq / cnt + 1e-5);
    var = sq / cnt - mean * mean;
    return (x[i] - mean) / sqrt(var + 1e-5);
}

int main(void)
{
    static const char *names[] = {"", "batch_norm", "instance_norm", "group_norm", "layer_norm", "rms_norm"};
    static float x[SIZE], y[SIZE], dy[SIZE], dx[SIZE];
    double *mean, *rstd;
    int64_t dims[4] = {N, C, H, W}, nstats = 0;
    int kind, i, failures = 0;
    fastnorm_status st = fastnorm_init();

    if (st != FASTNORM_OK) {
        fprintf(stderr, "fastnorm_init: %s: %s\n", fastnorm_status_string(st), fastnorm_last_error());
        return 1;
    }
    for (i = 0; i < SIZE; ++i) {
        x[i] = (float)sin(0.37 * i) * 3.0f + (float)(i % 7);
        dy[i] = (float)cos(0.11 * i);
    }
    for (kind = FASTNORM_BATCH_NORM; kind <= FASTNORM_RMS_NORM; ++kind) {
        fastnorm_desc desc;
        double max_err = 0.0;
        fastnorm_desc_init(&desc, sizeof desc, (fastnorm_kind)kind, FASTNORM_FLOAT32, 4, dims);
        if (kind == FASTNORM_GROUP_NORM) desc.num_groups = 3;
        if (kind == FASTNORM_LAYER_NORM || kind == FASTNORM_RMS_NORM) desc.normalized_ndim = 2;
        if (fastnorm_num_stats(&desc, &nstats) != FASTNORM_OK) {
            fprintf(stderr, "%s: %s\n", names[kind], fastnorm_last_error());
            return 1;
        }
        mean = malloc((size_t)nstats * sizeof *mean);
        rstd = malloc((size_t)nstats * sizeof *rstd);
        st = fastnorm_forward_training(&desc, x, NULL, NULL, y, mean, rstd);
        if (st == FASTNORM_OK) st = fastnorm_backward(&desc, dy, x, NULL, mean, rstd, dx, NULL, NULL);
        if (st != FASTNORM_OK) {
            fprintf(stderr, "%s: %s: %s\n", names[kind], fastnorm_status_string(st), fastnorm_last_error());
            return 1;
        }
        for (i = 0; i < SIZE; ++i) {
            double err = fabs(y[i] - reference(x, kind, 3, i));
            if (err > max_err) max_err = err;
        }
        printf("%-14s %3lld statistics, max |y - reference| = %.2e, dx[0] = %+.6f\n", names[kind],
               (long long)nstats, max_err, dx[0]);
        if (!(max_err < 1e-4)) ++failures;
        free(mean);
        free(rstd);
    }
    printf(failures ? "FAILED\n" : "all kinds OK\n");
    return failures ? 1 : 0;
}
