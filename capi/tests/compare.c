/*
 * compare: run every case of a manifest through the C ABI and write the
 * outputs next to the inputs, for tests/test_capi.py to compare with the
 * Python API.  Also checks in C that the in-place variants (y == x,
 * dx == dy, dx == x) give bitwise the same results as separate buffers.
 *
 * Manifest lines:
 *   prefix kind dtype layout rank d0 .. d(rank-1) num_groups normalized_ndim eps has_weight has_bias
 *          activation negative_slope has_residual skip param_dtype
 * Inputs  prefix.x prefix.dy [prefix.r] [prefix.w] [prefix.b] prefix.imean prefix.irstd
 * Outputs prefix.y prefix.mean prefix.rstd prefix.yinf prefix.dx [prefix.dres] [prefix.dw] [prefix.db]
 * A case with an activation or a residual runs the _fused entry points, and
 * also checks y == residual and dresidual == dy.
 *
 * skip: 0, or the pre-norm skip add (1; 2 with a skip bias), which runs
 * fastnorm_skip_forward_training and fastnorm_skip_backward instead:
 * Inputs  prefix.x prefix.s [prefix.sb] prefix.dy [prefix.w] [prefix.b]
 * Outputs prefix.y prefix.h prefix.mean prefix.rstd prefix.dx [prefix.dw] [prefix.db] [prefix.dsb]
 * and checks h == x with y == skip, h == skip with y == x, and dx == dy.
 */
#include "common.h"

static char path_buf[4096];

static const char *path(const char *prefix, const char *ext)
{
    snprintf(path_buf, sizeof path_buf, "%s.%s", prefix, ext);
    return path_buf;
}

/* The three passes, through the fused entry points when the case has an epilogue. */
static fastnorm_status train(const fastnorm_desc *d, int fused, const void *x, const void *r, const void *w,
                             const void *b, void *y, double *mean, double *rstd)
{
    return fused ? fastnorm_forward_training_fused(d, x, r, w, b, y, mean, rstd)
                 : fastnorm_forward_training(d, x, w, b, y, mean, rstd);
}

static fastnorm_status infer(const fastnorm_desc *d, int fused, const void *x, const void *r, const void *w,
                             const void *b, const double *mean, const double *rstd, void *y)
{
    return fused ? fastnorm_forward_inference_fused(d, x, r, w, b, mean, rstd, y)
                 : fastnorm_forward_inference(d, x, w, b, mean, rstd, y);
}

static fastnorm_status back(const fastnorm_desc *d, int fused, const void *dy, const void *x, const void *r,
                            const void *w, const void *b, const double *mean, const double *rstd, void *dx,
                            void *dres, void *dw, void *db)
{
    return fused ? fastnorm_backward_fused(d, dy, x, r, w, b, mean, rstd, dx, dres, dw, db)
                 : fastnorm_backward(d, dy, x, w, mean, rstd, dx, dw, db);
}

static int run_case(const char *prefix, const fastnorm_desc *d, int has_w, int has_b, int has_r)
{
    int64_t n = desc_elements(d), np_, ns;
    size_t es = dtype_size(d), ps = param_size(d), bytes;
    int fused = has_r || d->activation != FASTNORM_ACTIVATION_NONE;
    void *x, *dy, *r = NULL, *w = NULL, *b = NULL, *y, *yinf, *dx, *dres = NULL, *dw = NULL, *db = NULL, *tmp,
                  *tmp2;
    double *mean, *rstd, *imean, *irstd, *m2, *r2;
    fastnorm_status st;

    if ((st = fastnorm_num_params(d, &np_)) != FASTNORM_OK
        || (st = fastnorm_num_stats(d, &ns)) != FASTNORM_OK) {
        fprintf(stderr, "%s: descriptor rejected: %s\n", prefix, fastnorm_last_error());
        return 1;
    }
    bytes = (size_t)n * es;
    x = read_file(path(prefix, "x"), bytes);
    dy = read_file(path(prefix, "dy"), bytes);
    if (has_r) r = read_file(path(prefix, "r"), bytes);
    if (has_w) w = read_file(path(prefix, "w"), (size_t)np_ * ps);
    if (has_b) b = read_file(path(prefix, "b"), (size_t)np_ * ps);
    imean = read_file(path(prefix, "imean"), (size_t)ns * 8);
    irstd = read_file(path(prefix, "irstd"), (size_t)ns * 8);
    y = xmalloc(bytes);
    yinf = xmalloc(bytes);
    dx = xmalloc(bytes);
    tmp = xmalloc(bytes);
    tmp2 = xmalloc(bytes);
    mean = xmalloc((size_t)ns * 8);
    rstd = xmalloc((size_t)ns * 8);
    m2 = xmalloc((size_t)ns * 8);
    r2 = xmalloc((size_t)ns * 8);
    if (has_r) dres = xmalloc(bytes);
    if (has_w) dw = xmalloc((size_t)np_ * ps);
    if (has_b) db = xmalloc((size_t)np_ * ps);

    st = train(d, fused, x, r, w, b, y, mean, rstd);
    CHECK(st == FASTNORM_OK, "%s forward_training: %s %s", prefix, fastnorm_status_string(st),
          fastnorm_last_error());
    st = infer(d, fused, x, r, w, b, imean, irstd, yinf);
    CHECK(st == FASTNORM_OK, "%s forward_inference: %s %s", prefix, fastnorm_status_string(st),
          fastnorm_last_error());
    st = back(d, fused, dy, x, r, w, b, mean, rstd, dx, dres, dw, db);
    CHECK(st == FASTNORM_OK, "%s backward: %s %s", prefix, fastnorm_status_string(st), fastnorm_last_error());

    /* in place: y == x */
    memcpy(tmp, x, bytes);
    st = train(d, fused, tmp, r, w, b, tmp, m2, r2);
    CHECK(st == FASTNORM_OK && memcmp(tmp, y, bytes) == 0 && memcmp(m2, mean, (size_t)ns * 8) == 0
              && memcmp(r2, rstd, (size_t)ns * 8) == 0,
          "%s forward_training in place differs (%s)", prefix, fastnorm_status_string(st));
    memcpy(tmp, x, bytes);
    st = infer(d, fused, tmp, r, w, b, imean, irstd, tmp);
    CHECK(st == FASTNORM_OK && memcmp(tmp, yinf, bytes) == 0, "%s forward_inference in place differs",
          prefix);
    /* in place: dx == dy, then dx == x */
    memcpy(tmp, dy, bytes);
    st = back(d, fused, tmp, x, r, w, b, mean, rstd, tmp, NULL, NULL, NULL);
    CHECK(st == FASTNORM_OK && memcmp(tmp, dx, bytes) == 0, "%s backward dx == dy differs", prefix);
    memcpy(tmp, x, bytes);
    st = back(d, fused, dy, tmp, r, w, b, mean, rstd, tmp, NULL, NULL, NULL);
    CHECK(st == FASTNORM_OK && memcmp(tmp, dx, bytes) == 0, "%s backward dx == x differs", prefix);
    if (has_r) {
        /* in place: y == residual; dresidual == dy */
        memcpy(tmp, r, bytes);
        st = train(d, fused, x, tmp, w, b, tmp, m2, r2);
        CHECK(st == FASTNORM_OK && memcmp(tmp, y, bytes) == 0, "%s forward_training y == residual differs",
              prefix);
        memcpy(tmp, r, bytes);
        st = infer(d, fused, x, tmp, w, b, imean, irstd, tmp);
        CHECK(st == FASTNORM_OK && memcmp(tmp, yinf, bytes) == 0,
              "%s forward_inference y == residual differs", prefix);
        memcpy(tmp, dy, bytes);
        st = back(d, fused, tmp, x, r, w, b, mean, rstd, tmp2, tmp, NULL, NULL);
        CHECK(st == FASTNORM_OK && memcmp(tmp, dres, bytes) == 0 && memcmp(tmp2, dx, bytes) == 0,
              "%s backward dresidual == dy differs", prefix);
    }

    write_file(path(prefix, "y"), y, bytes);
    write_file(path(prefix, "mean"), mean, (size_t)ns * 8);
    write_file(path(prefix, "rstd"), rstd, (size_t)ns * 8);
    write_file(path(prefix, "yinf"), yinf, bytes);
    write_file(path(prefix, "dx"), dx, bytes);
    if (has_r) write_file(path(prefix, "dres"), dres, bytes);
    if (has_w) write_file(path(prefix, "dw"), dw, (size_t)np_ * ps);
    if (has_b) write_file(path(prefix, "db"), db, (size_t)np_ * ps);
    free(x);
    free(dy);
    free(r);
    free(w);
    free(b);
    free(y);
    free(yinf);
    free(dx);
    free(dres);
    free(tmp);
    free(tmp2);
    free(mean);
    free(rstd);
    free(m2);
    free(r2);
    free(imean);
    free(irstd);
    free(dw);
    free(db);
    return 0;
}

static int run_skip_case(const char *prefix, const fastnorm_desc *d, int has_w, int has_b, int has_sb)
{
    int64_t n = desc_elements(d), np_, ns;
    size_t es = dtype_size(d), ps = param_size(d), bytes, pbytes;
    void *x, *s, *sb = NULL, *dy, *w = NULL, *b = NULL, *y, *h, *dx, *dw = NULL, *db = NULL, *dsb = NULL, *t1,
                 *t2;
    double *mean, *rstd, *m2, *r2;
    fastnorm_status st;

    if ((st = fastnorm_num_params(d, &np_)) != FASTNORM_OK
        || (st = fastnorm_num_stats(d, &ns)) != FASTNORM_OK) {
        fprintf(stderr, "%s: descriptor rejected: %s\n", prefix, fastnorm_last_error());
        return 1;
    }
    bytes = (size_t)n * es;
    pbytes = (size_t)np_ * ps;
    x = read_file(path(prefix, "x"), bytes);
    s = read_file(path(prefix, "s"), bytes);
    dy = read_file(path(prefix, "dy"), bytes);
    if (has_sb) sb = read_file(path(prefix, "sb"), pbytes);
    if (has_w) w = read_file(path(prefix, "w"), pbytes);
    if (has_b) b = read_file(path(prefix, "b"), pbytes);
    y = xmalloc(bytes);
    h = xmalloc(bytes);
    dx = xmalloc(bytes);
    t1 = xmalloc(bytes);
    t2 = xmalloc(bytes);
    mean = xmalloc((size_t)ns * 8);
    rstd = xmalloc((size_t)ns * 8);
    m2 = xmalloc((size_t)ns * 8);
    r2 = xmalloc((size_t)ns * 8);
    if (has_w) dw = xmalloc(pbytes);
    if (has_b) db = xmalloc(pbytes);
    if (has_sb) dsb = xmalloc(pbytes);

    st = fastnorm_skip_forward_training(d, x, s, sb, w, b, h, y, mean, rstd);
    CHECK(st == FASTNORM_OK, "%s skip_forward_training: %s %s", prefix, fastnorm_status_string(st),
          fastnorm_last_error());
    st = fastnorm_skip_backward(d, dy, h, w, b, mean, rstd, dx, dw, db, dsb);
    CHECK(st == FASTNORM_OK, "%s skip_backward: %s %s", prefix, fastnorm_status_string(st),
          fastnorm_last_error());

    /* in place: h == x and y == skip, then h == skip and y == x */
    memcpy(t1, x, bytes);
    memcpy(t2, s, bytes);
    st = fastnorm_skip_forward_training(d, t1, t2, sb, w, b, t1, t2, m2, r2);
    CHECK(st == FASTNORM_OK && memcmp(t1, h, bytes) == 0 && memcmp(t2, y, bytes) == 0
              && memcmp(m2, mean, (size_t)ns * 8) == 0 && memcmp(r2, rstd, (size_t)ns * 8) == 0,
          "%s skip_forward_training h == x, y == skip differs (%s)", prefix, fastnorm_status_string(st));
    memcpy(t1, x, bytes);
    memcpy(t2, s, bytes);
    st = fastnorm_skip_forward_training(d, t1, t2, sb, w, b, t2, t1, m2, r2);
    CHECK(st == FASTNORM_OK && memcmp(t2, h, bytes) == 0 && memcmp(t1, y, bytes) == 0,
          "%s skip_forward_training h == skip, y == x differs (%s)", prefix, fastnorm_status_string(st));
    /* in place: dx == dy */
    memcpy(t1, dy, bytes);
    st = fastnorm_skip_backward(d, t1, h, w, b, mean, rstd, t1, NULL, NULL, NULL);
    CHECK(st == FASTNORM_OK && memcmp(t1, dx, bytes) == 0, "%s skip_backward dx == dy differs", prefix);

    write_file(path(prefix, "y"), y, bytes);
    write_file(path(prefix, "h"), h, bytes);
    write_file(path(prefix, "mean"), mean, (size_t)ns * 8);
    write_file(path(prefix, "rstd"), rstd, (size_t)ns * 8);
    write_file(path(prefix, "dx"), dx, bytes);
    if (has_w) write_file(path(prefix, "dw"), dw, pbytes);
    if (has_b) write_file(path(prefix, "db"), db, pbytes);
    if (has_sb) write_file(path(prefix, "dsb"), dsb, pbytes);
    free(x);
    free(s);
    free(sb);
    free(dy);
    free(w);
    free(b);
    free(y);
    free(h);
    free(dx);
    free(t1);
    free(t2);
    free(mean);
    free(rstd);
    free(m2);
    free(r2);
    free(dw);
    free(db);
    free(dsb);
    return 0;
}

int main(int argc, char **argv)
{
    FILE *manifest;
    char prefix[2048];
    int cases = 0;
    if (argc != 2) {
        fprintf(stderr, "usage: %s MANIFEST\n", argv[0]);
        return 2;
    }
    manifest = fopen(argv[1], "r");
    if (manifest == NULL) {
        fprintf(stderr, "cannot open %s\n", argv[1]);
        return 2;
    }
    while (fscanf(manifest, "%2047s", prefix) == 1) {
        fastnorm_desc d;
        int kind, dtype, layout, rank, i, nd, has_w, has_b, activation, has_r, skip, param_dtype, failed;
        long long groups, dim;
        int64_t dims[FASTNORM_MAX_RANK];
        double eps, slope;
        if (fscanf(manifest, "%d %d %d %d", &kind, &dtype, &layout, &rank) != 4 || rank < 1
            || rank > FASTNORM_MAX_RANK) {
            fprintf(stderr, "bad manifest line for %s\n", prefix);
            return 2;
        }
        for (i = 0; i < rank; ++i) {
            if (fscanf(manifest, "%lld", &dim) != 1) return 2;
            dims[i] = dim;
        }
        if (fastnorm_desc_init(&d, sizeof d, (fastnorm_kind)kind, (fastnorm_dtype)dtype, rank, dims)
            != FASTNORM_OK) {
            fprintf(stderr, "%s: fastnorm_desc_init: %s\n", prefix, fastnorm_last_error());
            return 2;
        }
        d.layout = layout;
        if (fscanf(manifest, "%lld %d %lf %d %d %d %lf %d %d %d", &groups, &nd, &eps, &has_w, &has_b,
                   &activation, &slope, &has_r, &skip, &param_dtype)
            != 10)
            return 2;
        d.param_dtype = param_dtype;
        d.num_groups = groups;
        d.normalized_ndim = nd;
        d.eps = eps;
        d.activation = activation;
        d.negative_slope = slope;
        failed = skip ? run_skip_case(prefix, &d, has_w, has_b, skip == 2)
                      : run_case(prefix, &d, has_w, has_b, has_r);
        if (failed) ++g_failures;
        ++cases;
    }
    fclose(manifest);
    printf("compare: %d cases, %d failures\n", cases, g_failures);
    return g_failures ? 1 : 0;
}
