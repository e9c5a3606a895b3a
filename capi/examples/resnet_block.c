/*
 * resnet_block.c -- the tail of a ResNet basic block, y = relu(bn(conv_out) + identity),
 * as one fused call of the fastnorm C ABI (0.3), and its backward; checked against
 * a direct computation in double precision.
 *
 * Build (after `python -m fastnorm.capi build`):
 *   cc -std=c99 resnet_block.c $(pkg-config --cflags --libs capi/build/fastnorm.pc) -lm -o resnet_block
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include "fastnorm.h"

#define N 4
#define C 8
#define H 6
#define W 6
#define S (H * W)
#define SIZE (N * C * S)

/* Direct computation of the block tail for one channel (training statistics, biased variance). */
static void reference(const float *conv, const float *identity, const float *weight, const float *bias,
                      const float *dy, int c, double *y, double *dconv, double *dres, double *dweight,
                      double *dbias)
{
    double sum = 0.0, var = 0.0, mean, rstd, sum_dz = 0.0, sum_dz_xhat = 0.0, m = (double)N * S;
    int n, s;
    for (n = 0; n < N; ++n)
        for (s = 0; s < S; ++s) sum += conv[(n * C + c) * S + s];
    mean = sum / m;
    for (n = 0; n < N; ++n)
        for (s = 0; s < S; ++s) var += pow(conv[(n * C + c) * S + s] - mean, 2);
    rstd = 1.0 / sqrt(var / m + 1e-5);
    for (n = 0; n < N; ++n)
        for (s = 0; s < S; ++s) {
            int i = (n * C + c) * S + s;
            double xhat = (conv[i] - mean) * rstd, z = xhat * weight[c] + bias[c] + identity[i];
            y[i] = z > 0.0 ? z : 0.0;
            dres[i] = z > 0.0 ? dy[i] : 0.0; /* dz: the gradient at the ReLU's input */
            sum_dz += dres[i];
            sum_dz_xhat += dres[i] * xhat;
        }
    *dweight = sum_dz_xhat;
    *dbias = sum_dz;
    for (n = 0; n < N; ++n)
        for (s = 0; s < S; ++s) {
            int i = (n * C + c) * S + s;
            double xhat = (conv[i] - mean) * rstd;
            dconv[i] = weight[c] * rstd * (dres[i] - sum_dz / m - xhat * sum_dz_xhat / m);
        }
}

int main(void)
{
    static float conv[SIZE], identity[SIZE], y[SIZE], dy[SIZE], dconv[SIZE], dres[SIZE];
    static double ry[SIZE], rdconv[SIZE], rdres[SIZE];
    float weight[C], bias[C], dweight[C], dbias[C];
    double mean[C], rstd[C], err = 0.0;
    int64_t dims[4] = {N, C, H, W};
    fastnorm_desc desc;
    fastnorm_status st;
    int i, c;

    for (i = 0; i < SIZE; ++i) {
        conv[i] = (float)sin(0.37 * i) * 2.0f + 0.1f * (float)(i % 5);
        identity[i] = (float)cos(0.23 * i);
        dy[i] = (float)sin(0.05 * i + 1.0);
    }
    for (c = 0; c < C; ++c) {
        weight[c] = 1.0f + 0.1f * (float)c;
        bias[c] = 0.05f * (float)c - 0.2f;
    }
    fastnorm_desc_init(&desc, sizeof desc, FASTNORM_BATCH_NORM, FASTNORM_FLOAT32, 4, dims);
    desc.activation = FASTNORM_RELU;

    /* forward: y = relu(bn(conv) * weight + bias + identity); y may also be written over identity */
    st = fastnorm_forward_training_fused(&desc, conv, identity, weight, bias, y, mean, rstd);
    /* backward: the ReLU mask is recomputed from conv, mean, rstd, weight, bias and identity */
    if (st == FASTNORM_OK)
        st = fastnorm_backward_fused(&desc, dy, conv, identity, weight, bias, mean, rstd, dconv, dres,
                                     dweight, dbias);
    if (st != FASTNORM_OK) {
        fprintf(stderr, "%s: %s\n", fastnorm_status_string(st), fastnorm_last_error());
        return 1;
    }
    for (c = 0; c < C; ++c) {
        double rdw, rdb;
        reference(conv, identity, weight, bias, dy, c, ry, rdconv, rdres, &rdw, &rdb);
        err = fmax(err, fabs(rdw - dweight[c]) / (1.0 + fabs(rdw)));
        err = fmax(err, fabs(rdb - dbias[c]) / (1.0 + fabs(rdb)));
    }
    for (i = 0; i < SIZE; ++i) {
        err = fmax(err, fabs(ry[i] - y[i]));
        err = fmax(err, fabs(rdconv[i] - dconv[i]));
        err = fmax(err, fabs(rdres[i] - dres[i]));
    }
    printf("resnet block tail, relu(bn(x) + identity) forward and backward: max error %.2e\n", err);
    return err < 1e-4 ? 0 : 1;
}
