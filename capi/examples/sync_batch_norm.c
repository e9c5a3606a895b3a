/*
 * sync_batch_norm.c -- BatchNorm split across two "ranks" in one process:
 * the pipeline a synchronized BatchNorm runs around its communicator
 * (docs/distributed.md), against plain BatchNorm of the whole batch.
 *
 * Rank 0 holds samples 0..2 of an (8, 4, 5, 6) float64 batch, rank 1 samples
 * 3..7.  Where a real program would gather the ranks' numbers over MPI or
 * sockets, this one copies them into rank-major arrays.
 *
 * Build (after `python -m fastnorm.capi build`):
 *   cc -std=c99 sync_batch_norm.c $(python -m fastnorm.capi --cflags --libs) -lm -o sync_batch_norm
 */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "fastnorm.h"

#define N 8
#define C 4
#define S 30 /* H * W = 5 * 6 */
#define RANKS 2

static const int64_t first_sample[RANKS + 1] = {0, 3, N};

static int check(fastnorm_status st, const char *what)
{
    if (st == FASTNORM_OK) return 0;
    fprintf(stderr, "%s: %s: %s\n", what, fastnorm_status_string(st), fastnorm_last_error());
    return 1;
}

/* Largest |a - b| relative to max(1, |b|) over n values. */
static double max_rel_diff(const double *a, const double *b, int64_t n)
{
    double worst = 0.0;
    int64_t i;
    for (i = 0; i < n; ++i) {
        double scale = fabs(b[i]) > 1.0 ? fabs(b[i]) : 1.0, d = fabs(a[i] - b[i]) / scale;
        if (d > worst) worst = d;
    }
    return worst;
}

int main(void)
{
    static double x[N * C * S], dy[N * C * S], y[N * C * S], dx[N * C * S];
    static double y_ref[N * C * S], dx_ref[N * C * S];
    double weight[C], bias[C], mean_ref[C], rstd_ref[C], dweight_ref[C], dbias_ref[C];
    double means[RANKS * C], m2s[RANKS * C], sums[RANKS][2][C];
    double mean[C], var[C], rstd[C], sum_dy[C], sum_dy_xhat[C];
    double running_mean[C] = {0}, running_var[C] = {1, 1, 1, 1};
    int64_t counts[RANKS], count, dims[4] = {N, C, 5, 6}, i, r, c;
    fastnorm_desc whole, part[RANKS];
    double err_y, err_dx, err_dweight, err_dbias;

    for (i = 0; i < N * C * S; ++i) {
        x[i] = 100.0 + 3.0 * sin(0.37 * (double)i);
        dy[i] = cos(0.11 * (double)i);
    }
    for (c = 0; c < C; ++c) {
        weight[c] = 0.5 + 0.25 * (double)c;
        bias[c] = -0.1 * (double)c;
    }
    /* plain BatchNorm of the whole batch */
    if (check(fastnorm_desc_init(&whole, sizeof whole, FASTNORM_BATCH_NORM, FASTNORM_FLOAT64, 4, dims),
              "desc")
        || check(fastnorm_forward_training(&whole, x, weight, bias, y_ref, mean_ref, rstd_ref), "forward")
        || check(fastnorm_backward(&whole, dy, x, weight, mean_ref, rstd_ref, dx_ref, dweight_ref, dbias_ref),
                 "backward"))
        return 1;

    /* forward: local moments of each rank, "gathered" in rank-major arrays, merged in rank order */
    for (r = 0; r < RANKS; ++r) {
        int64_t rank_dims[4] = {first_sample[r + 1] - first_sample[r], C, 5, 6};
        const double *xr = x + first_sample[r] * C * S;
        if (check(fastnorm_desc_init(&part[r], sizeof part[r], FASTNORM_BATCH_NORM, FASTNORM_FLOAT64, 4,
                                     rank_dims),
                  "rank desc")
            || check(fastnorm_batch_stats(&part[r], xr, &counts[r], means + r * C, m2s + r * C),
                     "batch_stats"))
            return 1;
    }
    if (check(fastnorm_merge_stats(RANKS, C, counts, means, m2s, &count, mean, var), "merge_stats")) return 1;
    for (c = 0; c < C; ++c) rstd[c] = 1.0 / sqrt(var[c] + whole.eps);
    for (r = 0; r < RANKS; ++r) {
        int64_t off = first_sample[r] * C * S;
        if (check(fastnorm_forward_inference(&part[r], x + off, weight, bias, mean, rstd, y + off),
                  "inference"))
            return 1;
    }
    if (check(fastnorm_update_running_stats(&whole, mean, var, count, 0.1, running_mean, running_var),
              "update_running_stats"))
        return 1;

    /* backward: local sums, summed in rank order, then dx with the global count */
    for (r = 0; r < RANKS; ++r) {
        int64_t off = first_sample[r] * C * S;
        if (check(fastnorm_backward_reduce(&part[r], dy + off, x + off, mean, rstd, sums[r][0], sums[r][1]),
                  "backward_reduce"))
            return 1;
    }
    for (c = 0; c < C; ++c) {
        sum_dy[c] = sums[0][0][c];
        sum_dy_xhat[c] = sums[0][1][c];
        for (r = 1; r < RANKS; ++r) {
            sum_dy[c] += sums[r][0][c];
            sum_dy_xhat[c] += sums[r][1][c];
        }
    }
    for (r = 0; r < RANKS; ++r) {
        int64_t off = first_sample[r] * C * S;
        if (check(fastnorm_backward_apply(&part[r], dy + off, x + off, weight, mean, rstd, sum_dy,
                                          sum_dy_xhat, count, dx + off),
                  "backward_apply"))
            return 1;
    }

    err_y = max_rel_diff(y, y_ref, N * C * S);
    err_dx = max_rel_diff(dx, dx_ref, N * C * S);
    err_dweight = max_rel_diff(sum_dy_xhat, dweight_ref, C);
    err_dbias = max_rel_diff(sum_dy, dbias_ref, C);
    printf("global count %lld; split vs plain BatchNorm: y %.1e, dx %.1e, dweight %.1e, dbias %.1e\n",
           (long long)count, err_y, err_dx, err_dweight, err_dbias);
    printf("running_mean[0] = %.17g, running_var[0] = %.17g\n", running_mean[0], running_var[0]);
    if (count != N * S || err_y > 1e-12 || err_dx > 1e-12 || err_dweight > 1e-12 || err_dbias > 1e-12) {
        printf("FAILED\n");
        return 1;
    }
    printf("split pipeline OK\n");
    return 0;
}
