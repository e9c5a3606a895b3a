/*
 * split: run the BatchNorm split across "ranks" (consecutive samples of one
 * batch) through the C ABI and write every result, for tests/test_capi.py to
 * compare bitwise with fastnorm.distributed in Python.
 *
 * Usage: split prefix dtype layout rank d0 .. d(rank-1) eps momentum ranks n0 .. n(ranks-1)
 *   dims are the whole batch's, (N, C, *spatial) or (N, *spatial, C); n_r the
 *   samples of rank r (sum N; 0 allowed).
 * Inputs  prefix.x prefix.dy prefix.w (the data dtype)
 * Outputs prefix.counts (int64 per rank) prefix.mean prefix.var prefix.rstd
 *         prefix.sum_dy prefix.sum_dy_xhat (doubles) prefix.y prefix.dx
 *         prefix.rm prefix.rv (the data dtype; running statistics from 0 and 1)
 */
#include <math.h>

#include "common.h"

#define MAX_RANKS 16

static char path_buf[4096];

static const char *path(const char *prefix, const char *ext)
{
    snprintf(path_buf, sizeof path_buf, "%s.%s", prefix, ext);
    return path_buf;
}

static int ok(fastnorm_status st, const char *what)
{
    CHECK(st == FASTNORM_OK, "%s: %s: %s", what, fastnorm_status_string(st), fastnorm_last_error());
    return st == FASTNORM_OK;
}

int main(int argc, char **argv)
{
    const char *prefix;
    fastnorm_desc whole, part;
    int64_t dims[8], counts[MAX_RANKS], samples[MAX_RANKS], count = 0, total, channels, per_sample;
    int32_t dtype, layout, rank, ranks, i, r, a = 1;
    double eps, momentum, *means, *m2s, *mean, *var, *rstd, *sums, *sum_dy, *sum_dy_xhat;
    size_t item;
    char *x, *dy, *w, *y, *dx, *rm, *rv;

    if (argc < 6) {
        fprintf(stderr, "usage: split prefix dtype layout rank dims.. eps momentum ranks n..\n");
        return 2;
    }
    prefix = argv[a++];
    dtype = atoi(argv[a++]);
    layout = atoi(argv[a++]);
    rank = atoi(argv[a++]);
    for (i = 0; i < rank; ++i) dims[i] = atoll(argv[a++]);
    eps = atof(argv[a++]);
    momentum = atof(argv[a++]);
    ranks = atoi(argv[a++]);
    if (ranks < 1 || ranks > MAX_RANKS || argc != a + ranks) {
        fprintf(stderr, "bad rank list\n");
        return 2;
    }
    for (r = 0; r < ranks; ++r) samples[r] = atoll(argv[a + r]);
    if (!ok(fastnorm_desc_init(&whole, sizeof whole, FASTNORM_BATCH_NORM, (fastnorm_dtype)dtype, rank, dims),
            "desc"))
        return 1;
    whole.layout = layout;
    whole.eps = eps;
    item = dtype_size(&whole);
    total = desc_elements(&whole);
    channels = layout == FASTNORM_CHANNELS_LAST ? dims[rank - 1] : dims[1];
    per_sample = total / dims[0];
    x = read_file(path(prefix, "x"), (size_t)total * item);
    dy = read_file(path(prefix, "dy"), (size_t)total * item);
    w = read_file(path(prefix, "w"), (size_t)channels * item);
    y = xmalloc((size_t)total * item);
    dx = xmalloc((size_t)total * item);
    rm = xmalloc((size_t)channels * item);
    rv = xmalloc((size_t)channels * item);
    means = xmalloc((size_t)(ranks * channels) * 8);
    m2s = xmalloc((size_t)(ranks * channels) * 8);
    sums = xmalloc((size_t)(ranks * 2 * channels) * 8);
    mean = xmalloc((size_t)channels * 8);
    var = xmalloc((size_t)channels * 8);
    rstd = xmalloc((size_t)channels * 8);
    sum_dy = xmalloc((size_t)channels * 8);
    sum_dy_xhat = xmalloc((size_t)channels * 8);
    memset(means, 0, (size_t)(ranks * channels) * 8);
    memset(m2s, 0, (size_t)(ranks * channels) * 8);
    memset(sums, 0, (size_t)(ranks * 2 * channels) * 8);
    for (i = 0; i < channels; ++i) {
        if (dtype == FASTNORM_FLOAT64) {
            ((double *)rm)[i] = 0.0;
            ((double *)rv)[i] = 1.0;
        } else {
            ((float *)rm)[i] = 0.0f;
            ((float *)rv)[i] = 1.0f;
        }
    }

    /* forward: each rank's moments (a rank without samples contributes count 0) */
    for (r = 0, a = 0; r < ranks; a += (int32_t)samples[r], ++r) {
        counts[r] = 0;
        if (samples[r] == 0) continue;
        part = whole;
        part.dims[0] = samples[r];
        if (!ok(fastnorm_batch_stats(&part, x + (size_t)a * per_sample * item, &counts[r],
                                     means + r * channels, m2s + r * channels),
                "batch_stats"))
            return 1;
    }
    if (!ok(fastnorm_merge_stats(ranks, channels, counts, means, m2s, &count, mean, var), "merge_stats"))
        return 1;
    for (i = 0; i < channels; ++i) rstd[i] = 1.0 / sqrt(var[i] + eps);
    for (r = 0, a = 0; r < ranks; a += (int32_t)samples[r], ++r) {
        size_t off = (size_t)a * per_sample * item;
        if (samples[r] == 0) continue;
        part = whole;
        part.dims[0] = samples[r];
        if (!ok(fastnorm_forward_inference(&part, x + off, w, NULL, mean, rstd, y + off), "inference"))
            return 1;
    }
    if (!ok(fastnorm_update_running_stats(&whole, mean, var, count, momentum, rm, rv),
            "update_running_stats"))
        return 1;

    /* backward: each rank's sums, summed in rank order, then dx */
    for (r = 0, a = 0; r < ranks; a += (int32_t)samples[r], ++r) {
        size_t off = (size_t)a * per_sample * item;
        if (samples[r] == 0) continue;
        part = whole;
        part.dims[0] = samples[r];
        if (!ok(fastnorm_backward_reduce(&part, dy + off, x + off, mean, rstd, sums + 2 * r * channels,
                                         sums + (2 * r + 1) * channels),
                "backward_reduce"))
            return 1;
    }
    for (i = 0; i < channels; ++i) {
        sum_dy[i] = sums[i];
        sum_dy_xhat[i] = sums[channels + i];
        for (r = 1; r < ranks; ++r) {
            sum_dy[i] += sums[2 * r * channels + i];
            sum_dy_xhat[i] += sums[(2 * r + 1) * channels + i];
        }
    }
    for (r = 0, a = 0; r < ranks; a += (int32_t)samples[r], ++r) {
        size_t off = (size_t)a * per_sample * item;
        if (samples[r] == 0) continue;
        part = whole;
        part.dims[0] = samples[r];
        if (!ok(fastnorm_backward_apply(&part, dy + off, x + off, w, mean, rstd, sum_dy, sum_dy_xhat, count,
                                        dx + off),
                "backward_apply"))
            return 1;
    }

    write_file(path(prefix, "counts"), counts, (size_t)ranks * 8);
    write_file(path(prefix, "mean"), mean, (size_t)channels * 8);
    write_file(path(prefix, "var"), var, (size_t)channels * 8);
    write_file(path(prefix, "rstd"), rstd, (size_t)channels * 8);
    write_file(path(prefix, "sum_dy"), sum_dy, (size_t)channels * 8);
    write_file(path(prefix, "sum_dy_xhat"), sum_dy_xhat, (size_t)channels * 8);
    write_file(path(prefix, "y"), y, (size_t)total * item);
    write_file(path(prefix, "dx"), dx, (size_t)total * item);
    write_file(path(prefix, "rm"), rm, (size_t)channels * item);
    write_file(path(prefix, "rv"), rv, (size_t)channels * item);
    printf("split: %d ranks, global count %lld, %d failures\n", (int)ranks, (long long)count, g_failures);
    return g_failures ? 1 : 0;
}
