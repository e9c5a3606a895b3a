/*
 * errors: bad input through the C ABI returns the documented status, sets a
 * message, writes nothing to any output (sentinel bytes stay untouched), and
 * valid calls still work afterwards.  Prints one summary line; exit 0 = pass.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "common.h"

#define SENTINEL 0xA5
#define N 2
#define C 4
#define H 3
#define W 3
#define SIZE (N * C * H * W)

static float x[SIZE + 16], dy[SIZE + 16], y[SIZE + 16], dx[SIZE + 16], residual[SIZE + 16], dres[SIZE + 16];
static float weight[C + 16], bias[C + 16], dweight[C + 16], dbias[C + 16];
static double mean[N * C + 16], rstd[N * C + 16];
static int g_checks = 0;

static void reset_outputs(void)
{
    memset(y, SENTINEL, sizeof y);
    memset(dx, SENTINEL, sizeof dx);
    memset(dres, SENTINEL, sizeof dres);
    memset(dweight, SENTINEL, sizeof dweight);
    memset(dbias, SENTINEL, sizeof dbias);
    memset(mean, SENTINEL, sizeof mean);
    memset(rstd, SENTINEL, sizeof rstd);
}

static int untouched(const void *buf, size_t bytes)
{
    const unsigned char *p = buf;
    size_t i;
    for (i = 0; i < bytes; ++i)
        if (p[i] != SENTINEL) return 0;
    return 1;
}

static int outputs_untouched(void)
{
    return untouched(y, sizeof y) && untouched(dx, sizeof dx) && untouched(dres, sizeof dres)
        && untouched(dweight, sizeof dweight) && untouched(dbias, sizeof dbias)
        && untouched(mean, sizeof mean) && untouched(rstd, sizeof rstd);
}

static fastnorm_desc valid_desc(void)
{
    fastnorm_desc d;
    int64_t dims[4] = {N, C, H, W};
    fastnorm_desc_init(&d, sizeof d, FASTNORM_GROUP_NORM, FASTNORM_FLOAT32, 4, dims);
    d.num_groups = 2;
    return d;
}

/* Run all three entry points on d with the given buffers; each must return
   `expected` and leave every output untouched. */
static void expect_all(const char *what, const fastnorm_desc *d, fastnorm_status expected)
{
    fastnorm_status st;
    reset_outputs();
    st = fastnorm_forward_training(d, x, weight, bias, y, mean, rstd);
    CHECK(st == expected, "%s: forward_training returned %s, expected %s", what, fastnorm_status_string(st),
          fastnorm_status_string(expected));
    st = fastnorm_forward_inference(d, x, weight, bias, mean, rstd, y);
    CHECK(st == expected, "%s: forward_inference returned %s, expected %s", what, fastnorm_status_string(st),
          fastnorm_status_string(expected));
    st = fastnorm_backward(d, dy, x, weight, mean, rstd, dx, dweight, dbias);
    CHECK(st == expected, "%s: backward returned %s, expected %s", what, fastnorm_status_string(st),
          fastnorm_status_string(expected));
    CHECK(outputs_untouched(), "%s: an output was written", what);
    CHECK(strlen(fastnorm_last_error()) > 0, "%s: no error message", what);
    g_checks += 5;
}

/* expect_all, plus the descriptor helpers, and the message names `field`. */
static void expect_all_named(const char *what, const fastnorm_desc *d, fastnorm_status expected,
                             const char *field)
{
    int64_t count = -7;
    expect_all(what, d, expected);
    CHECK(strstr(fastnorm_last_error(), field) != NULL, "%s: the message does not name %s: %s", what, field,
          fastnorm_last_error());
    CHECK(fastnorm_num_stats(d, &count) == expected && fastnorm_num_params(d, &count) == expected
              && count == -7,
          "%s: num_stats / num_params disagree", what);
    g_checks += 2;
}

/* fastnorm_desc_init must return `expected`, name `field` in the message and leave *desc untouched. */
static void expect_desc_init(const char *what, size_t struct_size, int kind, int dtype, int32_t rank,
                             fastnorm_status expected, const char *field)
{
    static const int64_t dims[4] = {N, C, H, W};
    fastnorm_desc d, before;
    fastnorm_status st;
    memset(&d, SENTINEL, sizeof d);
    before = d;
    st = fastnorm_desc_init(&d, struct_size, (fastnorm_kind)kind, (fastnorm_dtype)dtype, rank, dims);
    CHECK(st == expected, "desc_init %s: returned %s, expected %s (%s)", what, fastnorm_status_string(st),
          fastnorm_status_string(expected), fastnorm_last_error());
    CHECK(memcmp(&d, &before, sizeof d) == 0, "desc_init %s: *desc was written", what);
    CHECK(strstr(fastnorm_last_error(), field) != NULL, "desc_init %s: the message does not name %s: %s",
          what, field, fastnorm_last_error());
    g_checks += 3;
}

#define EXPECT(call, expected, what)                                                                     \
    do {                                                                                                 \
        fastnorm_status st_;                                                                             \
        reset_outputs();                                                                                 \
        st_ = (call);                                                                                    \
        CHECK(st_ == (expected), "%s: returned %s, expected %s (%s)", what, fastnorm_status_string(st_), \
              fastnorm_status_string(expected), fastnorm_last_error());                                  \
        CHECK(outputs_untouched(), "%s: an output was written", what);                                   \
        g_checks += 2;                                                                                   \
    } while (0)

static void check_valid_call_works(const char *after)
{
    fastnorm_desc d = valid_desc();
    fastnorm_status st;
    reset_outputs();
    st = fastnorm_forward_training(&d, x, weight, bias, y, mean, rstd);
    CHECK(st == FASTNORM_OK, "valid call after %s: %s (%s)", after, fastnorm_status_string(st),
          fastnorm_last_error());
    CHECK(!untouched(y, SIZE * sizeof(float)) && !untouched(mean, N * 2 * sizeof(double)),
          "valid call after %s wrote nothing", after);
    CHECK(untouched(y + SIZE, 16 * sizeof(float)) && untouched(mean + N * 2, 16 * sizeof(double)),
          "valid call after %s wrote past the end of its outputs", after);
    st = fastnorm_backward(&d, dy, x, weight, mean, rstd, dx, dweight, dbias);
    CHECK(st == FASTNORM_OK && !untouched(dx, SIZE * sizeof(float)), "valid backward after %s", after);
    g_checks += 4;
}

int main(void)
{
    fastnorm_desc d;
    int i, max_threads = 0;
    int64_t count = 0, dims[4] = {N, C, H, W};
    const char *layer = NULL;

    for (i = 0; i < SIZE; ++i) {
        x[i] = (float)((i * 37) % 11) - 4.0f;
        dy[i] = (float)((i * 13) % 7) - 3.0f;
    }
    for (i = 0; i < C; ++i) {
        weight[i] = 1.0f + 0.25f * (float)i;
        bias[i] = 0.5f * (float)i;
    }

    /* pure-C helpers */
    CHECK(fastnorm_version() == FASTNORM_VERSION && FASTNORM_VERSION == 600, "version %d",
          fastnorm_version());
    CHECK(strcmp(fastnorm_version_string(), "0.6.0") == 0
              && strcmp(FASTNORM_VERSION_STRING, fastnorm_version_string()) == 0,
          "version string %s (header %s)", fastnorm_version_string(), FASTNORM_VERSION_STRING);
    CHECK(FASTNORM_OK == 0 && FASTNORM_INVALID_ARGUMENT == 1 && FASTNORM_UNSUPPORTED == 2
              && FASTNORM_NOT_INITIALIZED == 3 && FASTNORM_INTERNAL_ERROR == 4 && FASTNORM_NULL_POINTER == 5
              && FASTNORM_SIZE_OVERFLOW == 6 && FASTNORM_OVERLAP == 7 && FASTNORM_VERSION_MISMATCH == 8,
          "status values are pinned");
    CHECK(strcmp(fastnorm_status_string(FASTNORM_OVERLAP), "FASTNORM_OVERLAP") == 0, "status string");
    CHECK(strcmp(fastnorm_status_string(FASTNORM_VERSION_MISMATCH), "FASTNORM_VERSION_MISMATCH") == 0,
          "status string of the new status");
    CHECK(offsetof(fastnorm_desc, struct_size) == 0, "struct_size is the first field");
    g_checks += 3;
    CHECK(strcmp(fastnorm_status_string((fastnorm_status)99), "FASTNORM_UNKNOWN_STATUS") == 0,
          "unknown status string");
    CHECK(strcmp(fastnorm_last_error(), "") == 0, "no error yet");
    CHECK(fastnorm_desc_init(NULL, sizeof(fastnorm_desc), FASTNORM_LAYER_NORM, FASTNORM_FLOAT32, 4, dims)
              == FASTNORM_NULL_POINTER,
          "desc_init NULL");
    CHECK(fastnorm_desc_init(&d, sizeof d, FASTNORM_LAYER_NORM, FASTNORM_FLOAT32, 4, NULL)
              == FASTNORM_NULL_POINTER,
          "desc_init dims NULL");
    CHECK(fastnorm_desc_init(&d, sizeof d, FASTNORM_LAYER_NORM, FASTNORM_FLOAT32, 9, dims)
              == FASTNORM_INVALID_ARGUMENT,
          "desc_init rank 9");
    g_checks += 8;

    /* desc_init: defaults, struct_size, typed enums validated, exactly struct_size bytes written */
    {
        struct {
            fastnorm_desc d;
            unsigned char tail[64];
        } big;
        int tail_untouched = 1;
        memset(&big, SENTINEL, sizeof big);
        CHECK(fastnorm_desc_init(&big.d, sizeof big.d, FASTNORM_RMS_NORM, FASTNORM_FLOAT64, 3, dims)
                  == FASTNORM_OK,
              "desc_init: %s", fastnorm_last_error());
        CHECK(big.d.struct_size == sizeof(fastnorm_desc) && big.d.kind == FASTNORM_RMS_NORM
                  && big.d.dtype == FASTNORM_FLOAT64 && big.d.param_dtype == FASTNORM_DTYPE_DEFAULT
                  && big.d.layout == FASTNORM_CHANNELS_FIRST && big.d.rank == 3 && big.d.dims[2] == H
                  && big.d.dims[3] == 0 && big.d.normalized_ndim == 1 && big.d.num_groups == 0
                  && big.d.eps == 1e-5 && big.d.flags == 0 && big.d.activation == FASTNORM_ACTIVATION_NONE
                  && big.d.reserved == 0 && big.d.negative_slope == 0.01,
              "desc_init defaults");
        for (i = 0; i < (int)sizeof big.tail; ++i) tail_untouched &= big.tail[i] == SENTINEL;
        CHECK(tail_untouched, "desc_init wrote past struct_size bytes");
        g_checks += 3;
    }
    expect_desc_init("struct_size 0", 0, FASTNORM_GROUP_NORM, FASTNORM_FLOAT32, 4, FASTNORM_INVALID_ARGUMENT,
                     "struct_size");
    expect_desc_init("struct_size 1", 1, FASTNORM_GROUP_NORM, FASTNORM_FLOAT32, 4, FASTNORM_INVALID_ARGUMENT,
                     "struct_size");
    expect_desc_init("struct_size too small", sizeof(fastnorm_desc) - 8, FASTNORM_GROUP_NORM,
                     FASTNORM_FLOAT32, 4, FASTNORM_INVALID_ARGUMENT, "struct_size");
    expect_desc_init("struct_size larger than known", sizeof(fastnorm_desc) + 8, FASTNORM_GROUP_NORM,
                     FASTNORM_FLOAT32, 4, FASTNORM_VERSION_MISMATCH, "struct_size");
    expect_desc_init("struct_size SIZE_MAX", (size_t)-1, FASTNORM_GROUP_NORM, FASTNORM_FLOAT32, 4,
                     FASTNORM_VERSION_MISMATCH, "struct_size");
    expect_desc_init("kind 0", sizeof(fastnorm_desc), 0, FASTNORM_FLOAT32, 4, FASTNORM_INVALID_ARGUMENT,
                     "kind");
    expect_desc_init("kind 6", sizeof(fastnorm_desc), 6, FASTNORM_FLOAT32, 4, FASTNORM_INVALID_ARGUMENT,
                     "kind");
    expect_desc_init("kind -1", sizeof(fastnorm_desc), -1, FASTNORM_FLOAT32, 4, FASTNORM_INVALID_ARGUMENT,
                     "kind");
    expect_desc_init("dtype DEFAULT", sizeof(fastnorm_desc), FASTNORM_BATCH_NORM, FASTNORM_DTYPE_DEFAULT, 4,
                     FASTNORM_INVALID_ARGUMENT, "dtype");
    expect_desc_init("dtype 5", sizeof(fastnorm_desc), FASTNORM_BATCH_NORM, 5, 4, FASTNORM_INVALID_ARGUMENT,
                     "dtype");
    expect_desc_init("dtype -1", sizeof(fastnorm_desc), FASTNORM_BATCH_NORM, -1, 4, FASTNORM_INVALID_ARGUMENT,
                     "dtype");
    {
        static const int64_t dims[4] = {N, C, H, W};
        fastnorm_desc half;
        CHECK(fastnorm_desc_init(&half, sizeof half, FASTNORM_BATCH_NORM, FASTNORM_FLOAT16, 4, dims)
                      == FASTNORM_OK
                  && half.dtype == FASTNORM_FLOAT16,
              "desc_init float16: %s", fastnorm_last_error());
        CHECK(fastnorm_desc_init(&half, sizeof half, FASTNORM_BATCH_NORM, FASTNORM_BFLOAT16, 4, dims)
                      == FASTNORM_OK
                  && half.dtype == FASTNORM_BFLOAT16,
              "desc_init bfloat16: %s", fastnorm_last_error());
    }
    expect_desc_init("rank 0", sizeof(fastnorm_desc), FASTNORM_BATCH_NORM, FASTNORM_FLOAT32, 0,
                     FASTNORM_INVALID_ARGUMENT, "rank");

    /* sizes */
    d = valid_desc();
    CHECK(fastnorm_num_stats(&d, &count) == FASTNORM_OK && count == N * 2, "GN stats %lld", (long long)count);
    CHECK(fastnorm_num_params(&d, &count) == FASTNORM_OK && count == C, "GN params");
    d.kind = FASTNORM_BATCH_NORM;
    d.num_groups = 0;
    CHECK(fastnorm_num_stats(&d, &count) == FASTNORM_OK && count == C, "BN stats");
    d.kind = FASTNORM_INSTANCE_NORM;
    CHECK(fastnorm_num_stats(&d, &count) == FASTNORM_OK && count == N * C, "IN stats");
    d.kind = FASTNORM_LAYER_NORM;
    d.normalized_ndim = 2;
    CHECK(fastnorm_num_stats(&d, &count) == FASTNORM_OK && count == N * C, "LN stats");
    CHECK(fastnorm_num_params(&d, &count) == FASTNORM_OK && count == H * W, "LN params");
    d.normalized_ndim = 4;
    CHECK(fastnorm_num_stats(&d, &count) == FASTNORM_OK && count == 1, "LN over all dims: 1 stat");
    CHECK(fastnorm_num_stats(&d, NULL) == FASTNORM_NULL_POINTER, "num_stats NULL count");
    g_checks += 8;

    /* the runtime starts, valid calls work */
    CHECK(fastnorm_init() == FASTNORM_OK, "init: %s", fastnorm_last_error());
    CHECK(fastnorm_init() == FASTNORM_OK, "second init");
    CHECK(fastnorm_runtime_info(&max_threads, &layer) == FASTNORM_OK && max_threads >= 1 && layer != NULL,
          "runtime_info");
    g_checks += 3;
    check_valid_call_works("init");

    /* NULL pointers */
    d = valid_desc();
    expect_all("desc NULL", NULL, FASTNORM_NULL_POINTER);
    EXPECT(fastnorm_forward_training(&d, NULL, weight, bias, y, mean, rstd), FASTNORM_NULL_POINTER, "x NULL");
    EXPECT(fastnorm_forward_training(&d, x, weight, bias, NULL, mean, rstd), FASTNORM_NULL_POINTER, "y NULL");
    EXPECT(fastnorm_forward_training(&d, x, weight, bias, y, NULL, rstd), FASTNORM_NULL_POINTER, "mean NULL");
    EXPECT(fastnorm_forward_training(&d, x, weight, bias, y, mean, NULL), FASTNORM_NULL_POINTER, "rstd NULL");
    EXPECT(fastnorm_forward_inference(&d, NULL, weight, bias, mean, rstd, y), FASTNORM_NULL_POINTER,
           "inference x NULL");
    EXPECT(fastnorm_forward_inference(&d, x, weight, bias, NULL, rstd, y), FASTNORM_NULL_POINTER,
           "inference mean NULL");
    EXPECT(fastnorm_forward_inference(&d, x, weight, bias, mean, NULL, y), FASTNORM_NULL_POINTER,
           "inference rstd NULL");
    EXPECT(fastnorm_forward_inference(&d, x, weight, bias, mean, rstd, NULL), FASTNORM_NULL_POINTER,
           "inference y NULL");
    EXPECT(fastnorm_backward(&d, NULL, x, weight, mean, rstd, dx, dweight, dbias), FASTNORM_NULL_POINTER,
           "dy NULL");
    EXPECT(fastnorm_backward(&d, dy, NULL, weight, mean, rstd, dx, dweight, dbias), FASTNORM_NULL_POINTER,
           "backward x NULL");
    EXPECT(fastnorm_backward(&d, dy, x, weight, NULL, rstd, dx, dweight, dbias), FASTNORM_NULL_POINTER,
           "backward mean NULL");
    EXPECT(fastnorm_backward(&d, dy, x, weight, mean, NULL, dx, dweight, dbias), FASTNORM_NULL_POINTER,
           "backward rstd NULL");
    EXPECT(fastnorm_backward(&d, dy, x, weight, mean, rstd, NULL, dweight, dbias), FASTNORM_NULL_POINTER,
           "dx NULL");
    EXPECT(fastnorm_get_num_threads(NULL), FASTNORM_NULL_POINTER, "get_num_threads NULL");
    check_valid_call_works("NULL pointers");

    /* struct_size of the descriptor: 0 (a zeroed or hand-filled struct), too small, larger than known */
    d = valid_desc();
    d.struct_size = 0;
    expect_all_named("struct_size 0", &d, FASTNORM_INVALID_ARGUMENT, "struct_size");
    d.struct_size = 1;
    expect_all_named("struct_size 1", &d, FASTNORM_INVALID_ARGUMENT, "struct_size");
    d.struct_size = sizeof(size_t);
    expect_all_named("struct_size of the size field only", &d, FASTNORM_INVALID_ARGUMENT, "struct_size");
    d.struct_size = sizeof d - 8;
    expect_all_named("struct_size too small", &d, FASTNORM_INVALID_ARGUMENT, "struct_size");
    d.struct_size = sizeof d + 1;
    expect_all_named("struct_size one byte too large", &d, FASTNORM_VERSION_MISMATCH, "struct_size");
    d.struct_size = (size_t)-1;
    expect_all_named("struct_size SIZE_MAX", &d, FASTNORM_VERSION_MISMATCH, "struct_size");
    {
        /* a descriptor from a newer header: more (zero) fields appended */
        struct {
            fastnorm_desc d;
            int64_t newer_fields[4];
        } newer;
        memset(&newer, 0, sizeof newer);
        newer.d = valid_desc();
        newer.d.struct_size = sizeof newer;
        expect_all_named("struct_size larger than known", &newer.d, FASTNORM_VERSION_MISMATCH, "struct_size");
    }
    {
        /* the exact size, in a heap block of that size (ASan: nothing read past it) */
        fastnorm_desc *exact = malloc(sizeof *exact);
        if (exact != NULL) *exact = valid_desc();
        CHECK(exact != NULL
                  && fastnorm_forward_training(exact, x, weight, bias, y, mean, rstd) == FASTNORM_OK,
              "heap descriptor of exactly struct_size bytes: %s", fastnorm_last_error());
        free(exact);
        g_checks += 1;
    }
    check_valid_call_works("bad struct_size");

    /* zero, negative, overflowing dims */
    d = valid_desc();
    d.dims[2] = 0;
    expect_all("zero dim", &d, FASTNORM_INVALID_ARGUMENT);
    d = valid_desc();
    d.dims[0] = 0;
    expect_all("zero batch", &d, FASTNORM_INVALID_ARGUMENT);
    d = valid_desc();
    d.dims[3] = -3;
    expect_all("negative dim", &d, FASTNORM_INVALID_ARGUMENT);
    d = valid_desc();
    d.dims[2] = (int64_t)1 << 40;
    d.dims[3] = (int64_t)1 << 40;
    expect_all("dims product overflows int64", &d, FASTNORM_SIZE_OVERFLOW);
    d = valid_desc();
    d.dims[2] = INT64_MAX;
    expect_all("INT64_MAX dim", &d, FASTNORM_SIZE_OVERFLOW);
    d = valid_desc();
    d.dims[2] = ((int64_t)1 << 60) / (N * C);
    d.dims[3] = 1;
    expect_all("byte size overflows int64", &d, FASTNORM_SIZE_OVERFLOW);
    check_valid_call_works("bad dims");

    /* groups */
    d = valid_desc();
    d.num_groups = 3;
    expect_all("G does not divide C", &d, FASTNORM_INVALID_ARGUMENT);
    d = valid_desc();
    d.num_groups = 0;
    expect_all("G = 0", &d, FASTNORM_INVALID_ARGUMENT);
    d = valid_desc();
    d.num_groups = -2;
    expect_all("G < 0", &d, FASTNORM_INVALID_ARGUMENT);
    d = valid_desc();
    d.kind = FASTNORM_BATCH_NORM;
    expect_all("num_groups with BN", &d, FASTNORM_INVALID_ARGUMENT);

    /* enums, flags, dtypes */
    d = valid_desc();
    d.kind = 0;
    expect_all("kind 0", &d, FASTNORM_INVALID_ARGUMENT);
    d = valid_desc();
    d.kind = 6;
    expect_all("kind 6", &d, FASTNORM_INVALID_ARGUMENT);
    d = valid_desc();
    d.kind = -1;
    expect_all("kind -1", &d, FASTNORM_INVALID_ARGUMENT);
    d = valid_desc();
    d.dtype = 0;
    expect_all("dtype 0", &d, FASTNORM_INVALID_ARGUMENT);
    d = valid_desc();
    d.dtype = 42;
    expect_all("dtype 42", &d, FASTNORM_INVALID_ARGUMENT);
    d = valid_desc();
    d.param_dtype = FASTNORM_FLOAT16;
    expect_all_named("float32 data, float16 params", &d, FASTNORM_UNSUPPORTED, "param_dtype");
    d = valid_desc();
    d.dtype = FASTNORM_FLOAT16;
    d.param_dtype = FASTNORM_BFLOAT16;
    expect_all_named("float16 data, bfloat16 params", &d, FASTNORM_UNSUPPORTED, "param_dtype");
    d = valid_desc();
    d.dtype = FASTNORM_BFLOAT16;
    d.param_dtype = FASTNORM_FLOAT64;
    expect_all_named("bfloat16 data, float64 params", &d, FASTNORM_UNSUPPORTED, "param_dtype");
    d = valid_desc();
    d.dtype = FASTNORM_BFLOAT16;
    d.activation = FASTNORM_RELU;
    expect_all_named("bfloat16 data with an activation", &d, FASTNORM_UNSUPPORTED, "activation");
    d = valid_desc();
    d.param_dtype = FASTNORM_FLOAT64;
    expect_all("mismatched param dtype", &d, FASTNORM_UNSUPPORTED);
    d = valid_desc();
    d.param_dtype = 77;
    expect_all("param dtype 77", &d, FASTNORM_INVALID_ARGUMENT);
    d = valid_desc();
    d.param_dtype = FASTNORM_FLOAT32;
    EXPECT(fastnorm_num_stats(&d, &count), FASTNORM_OK, "explicit matching param dtype");
    d = valid_desc();
    d.layout = 2;
    expect_all("layout 2", &d, FASTNORM_INVALID_ARGUMENT);
    d = valid_desc();
    d.flags = 1;
    expect_all("flags", &d, FASTNORM_UNSUPPORTED);
    check_valid_call_works("bad enums");

    /* rank, normalized_ndim, eps */
    d = valid_desc();
    d.rank = 1;
    expect_all("GN rank 1", &d, FASTNORM_INVALID_ARGUMENT);
    d = valid_desc();
    d.rank = 6;
    expect_all("GN rank 6", &d, FASTNORM_INVALID_ARGUMENT);
    d = valid_desc();
    d.normalized_ndim = 1;
    expect_all("GN normalized_ndim", &d, FASTNORM_INVALID_ARGUMENT);
    d = valid_desc();
    d.kind = FASTNORM_LAYER_NORM;
    d.num_groups = 0;
    d.normalized_ndim = 0;
    expect_all("LN normalized_ndim 0", &d, FASTNORM_INVALID_ARGUMENT);
    d.normalized_ndim = 5;
    expect_all("LN normalized_ndim > rank", &d, FASTNORM_INVALID_ARGUMENT);
    d.normalized_ndim = 1;
    d.rank = 9;
    expect_all("LN rank 9", &d, FASTNORM_INVALID_ARGUMENT);
    d.rank = 4;
    d.layout = FASTNORM_CHANNELS_LAST;
    expect_all("LN channels-last", &d, FASTNORM_INVALID_ARGUMENT);
    d = valid_desc();
    d.eps = -1e-5;
    expect_all("negative eps", &d, FASTNORM_INVALID_ARGUMENT);
    d = valid_desc();
    d.eps = NAN;
    expect_all("NaN eps", &d, FASTNORM_INVALID_ARGUMENT);
    d = valid_desc();
    d.eps = INFINITY;
    expect_all("inf eps", &d, FASTNORM_INVALID_ARGUMENT);

    /* one value per channel when training (torch's rule), fine for inference */
    {
        int64_t bn_dims[2] = {1, C};
        fastnorm_desc_init(&d, sizeof d, FASTNORM_BATCH_NORM, FASTNORM_FLOAT32, 2, bn_dims);
        EXPECT(fastnorm_forward_training(&d, x, weight, bias, y, mean, rstd), FASTNORM_INVALID_ARGUMENT,
               "BN training with one value per channel");
        EXPECT(fastnorm_backward(&d, dy, x, weight, mean, rstd, dx, dweight, dbias),
               FASTNORM_INVALID_ARGUMENT, "BN backward with one value per channel");
        for (i = 0; i < C; ++i) {
            mean[i] = 0.5;
            rstd[i] = 2.0;
        }
        CHECK(fastnorm_forward_inference(&d, x, weight, bias, mean, rstd, y) == FASTNORM_OK,
              "BN inference with one value per channel: %s", fastnorm_last_error());
        CHECK(fabs(y[1] - ((x[1] - 0.5) * (2.0 * weight[1]) + bias[1])) < 1e-5, "BN inference value %g",
              y[1]);
        d.kind = FASTNORM_INSTANCE_NORM;
        d.rank = 2;
        d.dims[0] = N;
        EXPECT(fastnorm_forward_training(&d, x, weight, bias, y, mean, rstd), FASTNORM_INVALID_ARGUMENT,
               "IN training with one spatial element");
        g_checks += 2;
    }

    /* alignment and overlaps */
    d = valid_desc();
    EXPECT(fastnorm_forward_training(&d, (const char *)x + 1, weight, bias, y, mean, rstd),
           FASTNORM_INVALID_ARGUMENT, "misaligned x");
    EXPECT(fastnorm_forward_training(&d, x, weight, bias, y, (double *)((char *)mean + 4), rstd),
           FASTNORM_INVALID_ARGUMENT, "misaligned mean");
    EXPECT(fastnorm_forward_training(&d, x, weight, bias, x + 1, mean, rstd), FASTNORM_OVERLAP, "y = x + 1");
    EXPECT(fastnorm_forward_training(&d, x, weight, bias, y, mean, mean), FASTNORM_OVERLAP, "mean == rstd");
    EXPECT(fastnorm_forward_training(&d, x, weight, bias, y, mean, mean + 1), FASTNORM_OVERLAP,
           "rstd overlaps mean");
    EXPECT(fastnorm_forward_training(&d, y, weight, bias, y + SIZE - 2, mean, rstd), FASTNORM_OVERLAP,
           "y overlaps the end of x");
    EXPECT(fastnorm_forward_inference(&d, x, weight, bias, mean, rstd, (void *)mean), FASTNORM_OVERLAP,
           "inference y overlaps mean");
    EXPECT(fastnorm_backward(&d, dy, x, weight, mean, rstd, dx, dweight, dweight), FASTNORM_OVERLAP,
           "dweight == dbias");
    EXPECT(fastnorm_backward(&d, dy, x, weight, mean, rstd, dx, weight, dbias), FASTNORM_OVERLAP,
           "dweight == weight");
    EXPECT(fastnorm_backward(&d, dy, x, weight, mean, rstd, dy + 1, dweight, dbias), FASTNORM_OVERLAP,
           "dx = dy + 1");
    check_valid_call_works("overlaps");

    /* the fused epilogue (0.3) */
    d = valid_desc();
    d.activation = 8;
    expect_all_named("activation 8", &d, FASTNORM_INVALID_ARGUMENT, "activation");
    d.activation = -1;
    expect_all_named("activation -1", &d, FASTNORM_INVALID_ARGUMENT, "activation");
    d = valid_desc();
    d.reserved = 1;
    expect_all_named("reserved 1", &d, FASTNORM_INVALID_ARGUMENT, "reserved");
    d = valid_desc();
    d.activation = FASTNORM_LEAKY_RELU;
    d.negative_slope = NAN;
    expect_all_named("negative_slope NaN", &d, FASTNORM_INVALID_ARGUMENT, "negative_slope");
    d = valid_desc();
    d.activation = FASTNORM_RELU;
    EXPECT(fastnorm_backward(&d, dy, x, weight, mean, rstd, dx, dweight, dbias), FASTNORM_INVALID_ARGUMENT,
           "backward with an activation");
    CHECK(strstr(fastnorm_last_error(), "fastnorm_backward_fused") != NULL,
          "message names the fused call: %s", fastnorm_last_error());
    EXPECT(fastnorm_forward_training_fused(&d, x, residual, weight, bias, residual + 1, mean, rstd),
           FASTNORM_OVERLAP, "y = residual + 1");
    EXPECT(fastnorm_forward_inference_fused(&d, x, residual, weight, bias, mean, rstd, x + 1),
           FASTNORM_OVERLAP, "inference y = x + 1");
    EXPECT(fastnorm_backward_fused(&d, dy, x, residual, weight, bias, mean, rstd, dx, dx, dweight, dbias),
           FASTNORM_OVERLAP, "dresidual == dx");
    EXPECT(fastnorm_backward_fused(&d, dy, x, residual, weight, bias, mean, rstd, dx, x, dweight, dbias),
           FASTNORM_OVERLAP, "dresidual == x");
    EXPECT(fastnorm_backward_fused(&d, dy, x, residual, weight, bias, mean, rstd, dy, dy, dweight, dbias),
           FASTNORM_OVERLAP, "dx == dresidual == dy");
    EXPECT(fastnorm_backward_fused(&d, NULL, x, residual, weight, bias, mean, rstd, dx, dres, dweight, dbias),
           FASTNORM_NULL_POINTER, "fused backward dy NULL");
    EXPECT(fastnorm_forward_training_fused(&d, (const char *)x, (const char *)residual + 2, weight, bias, y,
                                           mean, rstd),
           FASTNORM_INVALID_ARGUMENT, "misaligned residual");
    {
        /* a valid fused call: relu(gn(x) + residual) >= 0, then its backward */
        int nonneg = 1;
        for (i = 0; i < SIZE; ++i) residual[i] = 0.5f - 0.125f * (float)(i % 8);
        reset_outputs();
        CHECK(fastnorm_forward_training_fused(&d, x, residual, weight, bias, y, mean, rstd) == FASTNORM_OK,
              "fused forward: %s", fastnorm_last_error());
        for (i = 0; i < SIZE; ++i) nonneg &= y[i] >= 0.0f;
        CHECK(nonneg, "relu output is >= 0");
        CHECK(fastnorm_backward_fused(&d, dy, x, residual, weight, bias, mean, rstd, dx, dres, dweight, dbias)
                  == FASTNORM_OK,
              "fused backward: %s", fastnorm_last_error());
        for (i = 0; i < SIZE; ++i) nonneg &= (y[i] > 0.0f) ? dres[i] == dy[i] : dres[i] == 0.0f;
        CHECK(nonneg, "dresidual is dy where y > 0, else 0");
        g_checks += 3;
    }
    {
        /* a 0.2 descriptor (no epilogue fields) is accepted; the bytes past it are not read */
        fastnorm_desc old = valid_desc();
        old.struct_size = offsetof(fastnorm_desc, activation);
        old.activation = 99;
        old.reserved = 7;
        reset_outputs();
        CHECK(fastnorm_forward_training(&old, x, weight, bias, y, mean, rstd) == FASTNORM_OK,
              "0.2 descriptor: %s", fastnorm_last_error());
        g_checks += 1;
    }
    check_valid_call_works("epilogue");

    /* the pre-norm skip add (0.4): residual[] is the skip, dres[] the output h */
    {
        fastnorm_desc ln;
        int64_t rows_dims[2] = {N * C, H * W};
        double colsum[H * W];
        int ok = 1, j;
        fastnorm_desc_init(&ln, sizeof ln, FASTNORM_LAYER_NORM, FASTNORM_FLOAT32, 2, rows_dims);
        ln.normalized_ndim = 1;
        d = valid_desc();
        EXPECT(fastnorm_skip_forward_training(&d, x, residual, bias, weight, bias, dres, y, mean, rstd),
               FASTNORM_INVALID_ARGUMENT, "skip forward with a group_norm descriptor");
        CHECK(strstr(fastnorm_last_error(), "layer_norm") != NULL, "message names the kinds: %s",
              fastnorm_last_error());
        EXPECT(fastnorm_skip_backward(&d, dy, x, weight, bias, mean, rstd, dx, dweight, dbias, dres),
               FASTNORM_INVALID_ARGUMENT, "skip backward with a group_norm descriptor");
        EXPECT(fastnorm_skip_forward_training(&ln, x, NULL, bias, weight, bias, dres, y, mean, rstd),
               FASTNORM_NULL_POINTER, "skip NULL");
        EXPECT(fastnorm_skip_forward_training(&ln, x, residual, bias, weight, bias, NULL, y, mean, rstd),
               FASTNORM_NULL_POINTER, "h NULL");
        EXPECT(fastnorm_skip_forward_training(&ln, x, residual, bias, weight, bias, dres, dres, mean, rstd),
               FASTNORM_OVERLAP, "y == h");
        EXPECT(fastnorm_skip_forward_training(&ln, x, residual, bias, weight, bias, x + 1, y, mean, rstd),
               FASTNORM_OVERLAP, "h = x + 1");
        EXPECT(fastnorm_skip_backward(&ln, dy, NULL, weight, bias, mean, rstd, dx, dweight, dbias, NULL),
               FASTNORM_NULL_POINTER, "skip backward h NULL");
        CHECK(strstr(fastnorm_last_error(), "h is NULL") != NULL, "message names h: %s",
              fastnorm_last_error());
        EXPECT(fastnorm_skip_backward(&ln, dy, x, weight, bias, mean, rstd, dx, dweight, dbias, dweight),
               FASTNORM_OVERLAP, "dskip_bias == dweight");
        /* a valid call: h = x + skip + skip_bias, and dskip_bias = the column sums of dx */
        reset_outputs();
        CHECK(fastnorm_skip_forward_training(&ln, x, residual, bias, weight, bias, dres, y, mean, rstd)
                  == FASTNORM_OK,
              "skip forward: %s", fastnorm_last_error());
        for (i = 0; i < SIZE; ++i) ok &= dres[i] == (x[i] + residual[i]) + bias[i % (H * W)];
        CHECK(ok, "h is x + skip + skip_bias");
        CHECK(
            fastnorm_skip_backward(&ln, dy, dres, weight, bias, mean, rstd, dx, dweight, dbias, dweight + 10)
                == FASTNORM_OK,
            "skip backward: %s", fastnorm_last_error());
        for (j = 0; j < H * W; ++j) colsum[j] = 0.0;
        for (i = 0; i < SIZE; ++i) colsum[i % (H * W)] += dx[i];
        for (j = 0; j < H * W; ++j) ok &= fabs(colsum[j] - dweight[10 + j]) <= 1e-5 * (1.0 + fabs(colsum[j]));
        CHECK(ok, "dskip_bias is the column sums of dx");
        g_checks += 5;
    }
    check_valid_call_works("skip add");

    /* the BatchNorm split across processes (0.6): mean/rstd/dx/y serve as its outputs */
    {
        fastnorm_desc bn, half;
        int64_t bn_dims[4] = {N, C, H, W}, count = -7, counts[3] = {3, 0, 5}, bad_counts[2] = {1, -1};
        int64_t zero_counts[2] = {0, 0};
        fastnorm_desc_init(&bn, sizeof bn, FASTNORM_BATCH_NORM, FASTNORM_FLOAT32, 4, bn_dims);
        half = bn;
        half.dtype = FASTNORM_FLOAT16;
        d = valid_desc();
        EXPECT(fastnorm_batch_stats(&d, x, &count, mean, rstd), FASTNORM_INVALID_ARGUMENT,
               "batch_stats with a group_norm descriptor");
        CHECK(strstr(fastnorm_last_error(), "BatchNorm") != NULL, "message names BatchNorm: %s",
              fastnorm_last_error());
        EXPECT(fastnorm_batch_stats(&half, x, &count, mean, rstd), FASTNORM_UNSUPPORTED,
               "batch_stats float16");
        EXPECT(fastnorm_batch_stats(&bn, NULL, &count, mean, rstd), FASTNORM_NULL_POINTER,
               "batch_stats x NULL");
        EXPECT(fastnorm_batch_stats(&bn, x, NULL, mean, rstd), FASTNORM_NULL_POINTER,
               "batch_stats count NULL");
        EXPECT(fastnorm_batch_stats(&bn, x, &count, mean, mean + 1), FASTNORM_OVERLAP,
               "batch_stats m2 = mean + 1");
        EXPECT(fastnorm_batch_stats(&bn, (const char *)x + 2, &count, mean, rstd), FASTNORM_INVALID_ARGUMENT,
               "batch_stats misaligned x");
        bn.activation = FASTNORM_RELU;
        EXPECT(fastnorm_batch_stats(&bn, x, &count, mean, rstd), FASTNORM_INVALID_ARGUMENT,
               "batch_stats with an activation");
        bn.activation = FASTNORM_ACTIVATION_NONE;
        CHECK(count == -7, "count was written by a failed call");
        EXPECT(fastnorm_merge_stats(0, C, counts, (double *)x, (double *)dy, &count, mean, rstd),
               FASTNORM_INVALID_ARGUMENT, "merge_stats with 0 ranks");
        EXPECT(fastnorm_merge_stats(2, C, bad_counts, (double *)x, (double *)dy, &count, mean, rstd),
               FASTNORM_INVALID_ARGUMENT, "merge_stats with a negative count");
        EXPECT(fastnorm_merge_stats(2, C, zero_counts, (double *)x, (double *)dy, &count, mean, rstd),
               FASTNORM_INVALID_ARGUMENT, "merge_stats with every count 0");
        EXPECT(fastnorm_merge_stats(3, C, counts, (double *)x, (double *)dy, &count, mean, (double *)x),
               FASTNORM_OVERLAP, "merge_stats var over the means");
        EXPECT(fastnorm_merge_stats(3, C, counts, NULL, (double *)dy, &count, mean, rstd),
               FASTNORM_NULL_POINTER, "merge_stats means NULL");
        CHECK(count == -7, "count was written by a failed merge");
        EXPECT(fastnorm_backward_reduce(&bn, dy, x, mean + 8, rstd + 8, mean, mean), FASTNORM_OVERLAP,
               "backward_reduce sum_dy == sum_dy_xhat");
        EXPECT(fastnorm_backward_reduce(&bn, dy, x, mean + 8, NULL, mean, rstd), FASTNORM_NULL_POINTER,
               "backward_reduce rstd NULL");
        EXPECT(fastnorm_backward_apply(&bn, dy, x, weight, mean + 8, rstd + 8, mean + 8, rstd + 8,
                                       N * H * W - 1, dx),
               FASTNORM_INVALID_ARGUMENT, "backward_apply with a count below the rank's");
        CHECK(strstr(fastnorm_last_error(), "global count") != NULL, "message asks for the global count: %s",
              fastnorm_last_error());
        EXPECT(fastnorm_backward_apply(&bn, dy, x, weight, mean + 8, rstd + 8, mean + 8, rstd + 8, N * H * W,
                                       dy + 1),
               FASTNORM_OVERLAP, "backward_apply dx = dy + 1");
        EXPECT(fastnorm_update_running_stats(&bn, mean + 8, rstd + 8, 1, 0.1, y, dx),
               FASTNORM_INVALID_ARGUMENT, "update_running_stats with count 1");
        EXPECT(fastnorm_update_running_stats(&bn, mean + 8, rstd + 8, 5, 1.5, y, dx),
               FASTNORM_INVALID_ARGUMENT, "update_running_stats with momentum 1.5");
        EXPECT(fastnorm_update_running_stats(&bn, mean + 8, rstd + 8, 5, NAN, y, dx),
               FASTNORM_INVALID_ARGUMENT, "update_running_stats with momentum NaN");
        EXPECT(fastnorm_update_running_stats(&bn, mean + 8, rstd + 8, 5, 0.1, y, y + 1), FASTNORM_OVERLAP,
               "update_running_stats running_var = running_mean + 1");
        EXPECT(fastnorm_update_running_stats(&d, mean + 8, rstd + 8, 5, 0.1, y, dx),
               FASTNORM_INVALID_ARGUMENT, "update_running_stats with a group_norm descriptor");
        /* valid calls: the local moments of x, then the merge of two copies of them */
        reset_outputs();
        CHECK(fastnorm_batch_stats(&bn, x, &count, mean, rstd) == FASTNORM_OK && count == N * H * W,
              "batch_stats: %s", fastnorm_last_error());
        {
            int64_t two[2] = {count, count}, total = 0;
            double means2[2 * C], m2s2[2 * C], merged_mean[C], merged_var[C];
            int ok = 1;
            for (i = 0; i < C; ++i) {
                means2[i] = means2[C + i] = mean[i];
                m2s2[i] = m2s2[C + i] = rstd[i];
            }
            CHECK(fastnorm_merge_stats(2, C, two, means2, m2s2, &total, merged_mean, merged_var)
                          == FASTNORM_OK
                      && total == 2 * count,
                  "merge_stats: %s", fastnorm_last_error());
            for (i = 0; i < C; ++i)
                ok &= merged_mean[i] == mean[i]
                    && fabs(merged_var[i] - rstd[i] / count) <= 1e-12 * merged_var[i];
            CHECK(ok, "two equal halves merge to their own mean and variance");
        }
        g_checks += 4;
    }

    /* threads */
    EXPECT(fastnorm_set_num_threads(-1), FASTNORM_INVALID_ARGUMENT, "num_threads -1");
    EXPECT(fastnorm_set_num_threads(max_threads + 1), FASTNORM_INVALID_ARGUMENT, "num_threads > max");
    {
        int nt = 0;
        CHECK(fastnorm_set_num_threads(1) == FASTNORM_OK && fastnorm_get_num_threads(&nt) == FASTNORM_OK
                  && nt == 1,
              "set_num_threads(1)");
        check_valid_call_works("set_num_threads(1)");
        CHECK(fastnorm_set_num_threads(0) == FASTNORM_OK && fastnorm_get_num_threads(&nt) == FASTNORM_OK
                  && nt == max_threads,
              "set_num_threads(0) resets to max");
        g_checks += 2;
    }

    printf("errors: %d checks, %d failures\n", g_checks, g_failures);
    return g_failures ? 1 : 0;
}
