/*
 * fork: the parent starts the runtime and calls every entry point on tensors
 * large enough for the parallel kernels, then forks; the child makes the same
 * calls and compares its results bitwise with the parent's (which it
 * inherited), and the parent calls again after the fork.  Prints "key=value"
 * lines for tests/test_capi.py: the threading layer, the child's exit status
 * (or signal: GNU OpenMP's parallel regions kill a forked child unless the
 * library runs the serial builds there) and the mismatch counts.  The child
 * also makes a call whose kernel the parent never loaded (the running-
 * statistics update), which it loads itself; it prints the result, and the
 * parent the same call's after the fork, for the test to compare.
 */
#define _POSIX_C_SOURCE 200809L
#include <sys/wait.h>
#include <unistd.h>

#include "common.h"

#define NCASES 6

typedef struct result {
    void *y, *yinf, *dx, *dw, *db;
    double *mean, *rstd;
    size_t data_bytes, param_bytes, stats_bytes;
} result;

static fastnorm_desc cases[NCASES];
static void *inputs_x[NCASES], *inputs_dy[NCASES], *inputs_w[NCASES], *inputs_b[NCASES];

/* Every view (rows, planes, channels-last) and both dtypes; 36864 elements each,
   above the largest tensor the serial builds run by default (16384). */
static void make_cases(void)
{
    static const int64_t dims[4] = {4, 16, 24, 24};
    static const int kinds[NCASES] = {FASTNORM_BATCH_NORM, FASTNORM_GROUP_NORM, FASTNORM_INSTANCE_NORM,
                                      FASTNORM_GROUP_NORM, FASTNORM_LAYER_NORM, FASTNORM_RMS_NORM};
    int i;
    for (i = 0; i < NCASES; ++i) {
        fastnorm_desc *d = &cases[i];
        fastnorm_desc_init(d, sizeof *d, (fastnorm_kind)kinds[i], i % 2 ? FASTNORM_FLOAT64 : FASTNORM_FLOAT32,
                           4, dims);
        if (kinds[i] == FASTNORM_GROUP_NORM) d->num_groups = 4;
        if (kinds[i] == FASTNORM_LAYER_NORM || kinds[i] == FASTNORM_RMS_NORM) d->normalized_ndim = 2;
        else if (i >= 2) d->layout = FASTNORM_CHANNELS_LAST;
        d->eps = 1e-5;
    }
}

static void alloc_result(int c, result *r)
{
    int64_t np_ = 0, ns = 0;
    size_t es = dtype_size(&cases[c]);
    fastnorm_num_params(&cases[c], &np_);
    fastnorm_num_stats(&cases[c], &ns);
    r->data_bytes = (size_t)desc_elements(&cases[c]) * es;
    r->param_bytes = (size_t)np_ * es;
    r->stats_bytes = (size_t)ns * 8;
    r->y = xmalloc(r->data_bytes);
    r->yinf = xmalloc(r->data_bytes);
    r->dx = xmalloc(r->data_bytes);
    r->dw = xmalloc(r->param_bytes);
    r->db = xmalloc(r->param_bytes);
    r->mean = xmalloc(r->stats_bytes);
    r->rstd = xmalloc(r->stats_bytes);
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

static int same(const result *a, const result *b)
{
    return !memcmp(a->y, b->y, a->data_bytes) && !memcmp(a->yinf, b->yinf, a->data_bytes)
        && !memcmp(a->dx, b->dx, a->data_bytes) && !memcmp(a->dw, b->dw, a->param_bytes)
        && !memcmp(a->db, b->db, a->param_bytes) && !memcmp(a->mean, b->mean, a->stats_bytes)
        && !memcmp(a->rstd, b->rstd, a->stats_bytes);
}

/* A running-statistics update, whose kernel no other call of this program
   loads; prints its status and results as "<label>_update=...". */
static void print_update(const char *label)
{
    static const int64_t dims[2] = {4, 3};
    const double mean[3] = {0.5, -1.25, 3.0}, var[3] = {2.0, 0.125, 7.5};
    double running_mean[3] = {0.0, 1.0, -2.0}, running_var[3] = {1.0, 0.5, 4.0};
    fastnorm_desc d;
    fastnorm_status st;
    fastnorm_desc_init(&d, sizeof d, FASTNORM_BATCH_NORM, FASTNORM_FLOAT64, 2, dims);
    st = fastnorm_update_running_stats(&d, mean, var, 4, 0.1, running_mean, running_var);
    printf("%s_update=%s %a %a %a %a %a %a\n", label, fastnorm_status_string(st), running_mean[0],
           running_mean[1], running_mean[2], running_var[0], running_var[1], running_var[2]);
    fflush(stdout);
}

/* Runs every case into `out` and counts the results that differ from `want` (or failed). */
static int mismatches(const result *want, result *out)
{
    int c, bad = 0;
    for (c = 0; c < NCASES; ++c) {
        if (!run(c, &out[c])) {
            fprintf(stderr, "case %d failed: %s\n", c, fastnorm_last_error());
            ++bad;
        } else if (!same(&want[c], &out[c])) {
            ++bad;
        }
    }
    return bad;
}

int main(void)
{
    static result parent[NCASES], again[NCASES];
    const char *layer = "";
    int c, max_threads = 0, status = 0;
    pid_t pid;

    make_cases();
    for (c = 0; c < NCASES; ++c) {
        size_t es = dtype_size(&cases[c]);
        int64_t n = desc_elements(&cases[c]), np_ = 0;
        fastnorm_num_params(&cases[c], &np_);
        inputs_x[c] = xmalloc((size_t)n * es);
        inputs_dy[c] = xmalloc((size_t)n * es);
        inputs_w[c] = xmalloc((size_t)np_ * es);
        inputs_b[c] = xmalloc((size_t)np_ * es);
        fill(inputs_x[c], n, cases[c].dtype, 4u * (unsigned)c + 1u);
        fill(inputs_dy[c], n, cases[c].dtype, 4u * (unsigned)c + 2u);
        fill(inputs_w[c], np_, cases[c].dtype, 4u * (unsigned)c + 3u);
        fill(inputs_b[c], np_, cases[c].dtype, 4u * (unsigned)c + 4u);
        alloc_result(c, &parent[c]);
        alloc_result(c, &again[c]);
        if (!run(c, &parent[c])) {
            fprintf(stderr, "parent case %d failed: %s\n", c, fastnorm_last_error());
            return 2;
        }
    }
    if (fastnorm_runtime_info(&max_threads, &layer) != FASTNORM_OK) return 2;
    printf("layer=%s\nmax_threads=%d\n", layer, max_threads);
    fflush(stdout);

    pid = fork();
    if (pid < 0) return 2;
    if (pid == 0) {
        alarm(120); /* never outlive a hung test */
        /* `again` is the child's copy: the parent's results stay untouched in `parent`. */
        printf("child_mismatches=%d\n", mismatches(parent, again));
        fflush(stdout);
        print_update("child");
        _exit(0);
    }
    if (waitpid(pid, &status, 0) != pid) return 2;
    if (WIFEXITED(status)) printf("child_exit=%d\n", WEXITSTATUS(status));
    else if (WIFSIGNALED(status)) printf("child_signal=%d\n", WTERMSIG(status));
    printf("parent_after_fork_mismatches=%d\n", mismatches(parent, again));
    print_update("parent");
    return 0;
}
