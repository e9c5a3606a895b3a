/*
 * fastnorm_capi.c -- implementation of fastnorm.h (capi/include/), compiled into
 * libfastnorm.so by `python -m fastnorm.capi build` (cffi embedding mode).
 *
 * What the build provides (fastnorm/capi/build.py):
 *   - Python.h: this file is the cffi "set_source" preamble, which cffi
 *     compiles after its own #include <Python.h> (included again below, a
 *     no-op, so that the file states what it uses);
 *   - fastnorm_generated.h, written by build.py into the build's temporary
 *     directory (on the include path): the kernel flag values of
 *     fastnorm._kernels (K_BATCH, K_CENTERED, K_PER_ELEMENT, K_CHANNELS_LAST),
 *     the slots of the function table in the order of
 *     fastnorm.capi._runtime.TABLE_ORDER (SLOT_*), the values of its
 *     after-fork slot (AFTER_FORK_PARALLEL, AFTER_FORK_SERIAL), and the Python environment
 *     baked into the library (FASTNORM_BAKED_EXECUTABLE,
 *     FASTNORM_BAKED_PY_VERSION).  Nothing here is copied from Python by hand;
 *   - _fastnorm_py_init and _fastnorm_py_load, defined by cffi from the
 *     extern "Python" declarations of build.py (declared below).
 * With those, the file compiles on its own (tests/test_capi.py checks it with
 * gcc -fsyntax-only).
 *
 * Structure
 *   1. validation of the descriptor and buffers (pure C, before any write);
 *   2. runtime start: the embedded interpreter (PyConfig, with the baked
 *      executable so that the build environment's sys.path is found), then
 *      one call into Python (_fastnorm_py_init, cffi extern "Python") that
 *      starts Numba's threading layer and returns its entry points;
 *   3. entry points: validate, make sure the runtime is up and the cfunc of
 *      the call loaded (the first call of each operation and dtype asks
 *      Python for it: _fastnorm_py_load, which loads it from Numba's cache),
 *      set the thread count, call the cfunc through a function pointer (no
 *      Python, no GIL).
 *      In a child forked after the runtime started on GNU OpenMP (whose
 *      parallel regions kill a forked child), the cfuncs get the thread
 *      count 0 and run the kernels' serial builds (same results, bitwise).
 */
#include <Python.h>

#define FASTNORM_BUILDING 1
#include "fastnorm.h"

/* Written by fastnorm/capi/build.py at build time (kernel flags, table slots, baked paths). */
#include "fastnorm_generated.h"

#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Implemented in Python (embedding init code), see fastnorm/capi/build.py. */
int _fastnorm_py_init(int64_t *table, int64_t table_len, int32_t owns_interpreter, char *message,
                      int64_t message_len);
int _fastnorm_py_load(int32_t slot, int64_t *address, char *message, int64_t message_len);

/* Signatures of the cfuncs of fastnorm/capi/_cfuncs.py, and of the threading layer's. */
typedef int32_t (*forward_fn)(const void *x, const void *r, int64_t nr, const void *w, int64_t nw,
                              const void *b, int64_t nb, void *y, double *mean, double *rstd, int64_t nstats,
                              int64_t batch, int64_t channels, int64_t spatial, int64_t groups, int64_t flags,
                              double eps, int64_t activation, double slope, int64_t param16,
                              int64_t num_threads);
typedef int32_t (*backward_fn)(const void *dy, const void *x, const void *r, int64_t nr, const void *w,
                               int64_t nw, const void *b, int64_t nb, const double *mean, const double *rstd,
                               int64_t nstats, void *dx, void *dr, int64_t ndr, void *dw, int64_t ndw,
                               void *db, int64_t ndb, void *dsb, int64_t ndsb, int64_t batch,
                               int64_t channels, int64_t spatial, int64_t groups, int64_t flags, double eps,
                               int64_t activation, double slope, int64_t param16, int64_t num_threads);
typedef int32_t (*skip_forward_fn)(const void *x, const void *s, const void *sb, int64_t nsb, const void *w,
                                   int64_t nw, const void *b, int64_t nb, void *h, void *y, double *mean,
                                   double *rstd, int64_t nstats, int64_t batch, int64_t channels,
                                   int64_t spatial, int64_t groups, int64_t flags, double eps,
                                   int64_t activation, double slope, int64_t param16, int64_t num_threads);
typedef int32_t (*batch_stats_fn)(const void *x, double *mean, double *m2, int64_t batch, int64_t channels,
                                  int64_t spatial, int64_t groups, int64_t flags, double eps,
                                  int64_t activation, double slope, int64_t num_threads);
typedef int32_t (*backward_reduce_fn)(const void *dy, const void *x, const double *mean, const double *rstd,
                                      double *sum_dy, double *sum_dy_xhat, int64_t batch, int64_t channels,
                                      int64_t spatial, int64_t groups, int64_t flags, double eps,
                                      int64_t activation, double slope, int64_t num_threads);
typedef int32_t (*backward_apply_fn)(const void *dy, const void *x, const void *w, int64_t nw,
                                     const double *mean, const double *rstd, const double *sum_dy,
                                     const double *sum_dy_xhat, double count, void *dx, int64_t batch,
                                     int64_t channels, int64_t spatial, int64_t groups, int64_t flags,
                                     double eps, int64_t activation, double slope, int64_t num_threads);
typedef int32_t (*update_running_fn)(void *running_mean, void *running_var, const double *mean,
                                     const double *var, int64_t channels, double count, double factor);
typedef int32_t (*merge_stats_fn)(int64_t ranks, int64_t channels, const int64_t *counts, const double *means,
                                  const double *m2s, double *mean, double *var, int64_t *total);
typedef void (*set_threads_fn)(int);
typedef int (*get_threads_fn)(void);

/* The cfunc slots of each operation, by plan.dtype_index. */
static const int FORWARD_TRAINING_SLOTS[4] = {SLOT_FORWARD_TRAINING_FLOAT32, SLOT_FORWARD_TRAINING_FLOAT64,
                                              SLOT_FORWARD_TRAINING_FLOAT16, SLOT_FORWARD_TRAINING_BFLOAT16};
static const int FORWARD_INFERENCE_SLOTS[4] = {SLOT_FORWARD_INFERENCE_FLOAT32, SLOT_FORWARD_INFERENCE_FLOAT64,
                                               SLOT_FORWARD_INFERENCE_FLOAT16,
                                               SLOT_FORWARD_INFERENCE_BFLOAT16};
static const int BACKWARD_SLOTS[4] = {SLOT_BACKWARD_FLOAT32, SLOT_BACKWARD_FLOAT64, SLOT_BACKWARD_FLOAT16,
                                      SLOT_BACKWARD_BFLOAT16};
static const int SKIP_FORWARD_SLOTS[4] = {SLOT_SKIP_FORWARD_FLOAT32, SLOT_SKIP_FORWARD_FLOAT64,
                                          SLOT_SKIP_FORWARD_FLOAT16, SLOT_SKIP_FORWARD_BFLOAT16};
static const int UPDATE_RUNNING_SLOTS[4] = {SLOT_UPDATE_RUNNING_FLOAT32, SLOT_UPDATE_RUNNING_FLOAT64,
                                            SLOT_UPDATE_RUNNING_FLOAT16, SLOT_UPDATE_RUNNING_BFLOAT16};
/* The split BatchNorm's cfuncs exist for float32 and float64 data (dtype_index 0 and 1). */
static const int BATCH_STATS_SLOTS[2] = {SLOT_BATCH_STATS_FLOAT32, SLOT_BATCH_STATS_FLOAT64};
static const int BACKWARD_REDUCE_SLOTS[2] = {SLOT_BACKWARD_REDUCE_FLOAT32, SLOT_BACKWARD_REDUCE_FLOAT64};
static const int BACKWARD_APPLY_SLOTS[2] = {SLOT_BACKWARD_APPLY_FLOAT32, SLOT_BACKWARD_APPLY_FLOAT64};

/* ------------------------------------------------------------------------ */
/* Errors                                                                    */
/* ------------------------------------------------------------------------ */

static __thread char tls_error[1024];

static fastnorm_status fail(fastnorm_status status, const char *fmt, ...)
{
    va_list args;
    va_start(args, fmt);
    vsnprintf(tls_error, sizeof tls_error, fmt, args);
    va_end(args);
    return status;
}

FASTNORM_API const char *fastnorm_last_error(void) { return tls_error; }

FASTNORM_API int fastnorm_version(void) { return FASTNORM_VERSION; }

FASTNORM_API const char *fastnorm_version_string(void) { return FASTNORM_VERSION_STRING; }

FASTNORM_API const char *fastnorm_status_string(fastnorm_status status)
{
    switch (status) {
    case FASTNORM_OK: return "FASTNORM_OK";
    case FASTNORM_INVALID_ARGUMENT: return "FASTNORM_INVALID_ARGUMENT";
    case FASTNORM_UNSUPPORTED: return "FASTNORM_UNSUPPORTED";
    case FASTNORM_NOT_INITIALIZED: return "FASTNORM_NOT_INITIALIZED";
    case FASTNORM_INTERNAL_ERROR: return "FASTNORM_INTERNAL_ERROR";
    case FASTNORM_NULL_POINTER: return "FASTNORM_NULL_POINTER";
    case FASTNORM_SIZE_OVERFLOW: return "FASTNORM_SIZE_OVERFLOW";
    case FASTNORM_OVERLAP: return "FASTNORM_OVERLAP";
    case FASTNORM_VERSION_MISMATCH: return "FASTNORM_VERSION_MISMATCH";
    }
    return "FASTNORM_UNKNOWN_STATUS";
}

/* ------------------------------------------------------------------------ */
/* Descriptor versions                                                       */
/* ------------------------------------------------------------------------ */

/*
 * fastnorm_desc grows by appending fields (docs/c-api.md, "ABI policy").  A
 * descriptor's struct_size must be the size of the struct of one released
 * header: KNOWN_DESC_SIZES lists them, oldest first.  The size of a version
 * is the end of its last field (as sizeof, since that field is 8 bytes and
 * 8-aligned), which stays right after fields are appended behind it.
 *
 * When appending a field to fastnorm_desc in fastnorm.h: add the new
 * version's size (offsetof(new last field) + its size, rounded up to the
 * struct's alignment) at the end of KNOWN_DESC_SIZES and the field's default
 * (the value that keeps the older behaviour) to desc_defaults().  The check
 * below fails to compile until the newest entry is sizeof(fastnorm_desc).
 */
#define DESC_SIZE_0_2 (offsetof(fastnorm_desc, flags) + sizeof(uint64_t))
#define DESC_SIZE_0_3 (offsetof(fastnorm_desc, negative_slope) + sizeof(double))

static const size_t KNOWN_DESC_SIZES[] = {DESC_SIZE_0_2, DESC_SIZE_0_3};
#define NUM_KNOWN_DESC_SIZES (sizeof KNOWN_DESC_SIZES / sizeof KNOWN_DESC_SIZES[0])
#define NEWEST_DESC_SIZE DESC_SIZE_0_3

/* Compile-time check (C99): the public activation values are the kernels' codes, which the
   library passes through unchanged (K_ACTIVATION_* are generated from fastnorm._kernels). */
#define SAME_CODE(public, kernel) ((int)(public) == (int)(kernel))
typedef char activation_codes_match
    [(SAME_CODE(FASTNORM_RELU, K_ACTIVATION_RELU) && SAME_CODE(FASTNORM_LEAKY_RELU, K_ACTIVATION_LEAKY_RELU)
      && SAME_CODE(FASTNORM_SIGMOID, K_ACTIVATION_SIGMOID) && SAME_CODE(FASTNORM_TANH, K_ACTIVATION_TANH)
      && SAME_CODE(FASTNORM_SILU, K_ACTIVATION_SILU) && SAME_CODE(FASTNORM_GELU, K_ACTIVATION_GELU)
      && SAME_CODE(FASTNORM_GELU_TANH, K_ACTIVATION_GELU_TANH))
         ? 1
         : -1];

/* Compile-time check (C99): the newest known size is this header's struct. */
typedef char newest_desc_size_is_sizeof_fastnorm_desc[NEWEST_DESC_SIZE == sizeof(fastnorm_desc) ? 1 : -1];

/* Defaults of every field a smaller (older) descriptor lacks: 0.3's epilogue (none). */
static void desc_defaults(fastnorm_desc *d)
{
    memset(d, 0, sizeof *d);
    d->struct_size = sizeof *d;
    d->activation = FASTNORM_ACTIVATION_NONE;
    d->negative_slope = 0.01;
}

/* The status of a struct_size value (`what` names it in the message). */
static fastnorm_status check_struct_size(size_t size, const char *what)
{
    size_t i;
    for (i = 0; i < NUM_KNOWN_DESC_SIZES; ++i)
        if (size == KNOWN_DESC_SIZES[i]) return FASTNORM_OK;
    if (size > NEWEST_DESC_SIZE)
        return fail(FASTNORM_VERSION_MISMATCH,
                    "%s=%lu is larger than any fastnorm_desc this library (%s) knows (newest: %lu bytes): "
                    "the program was compiled with a newer fastnorm.h",
                    what, (unsigned long)size, FASTNORM_VERSION_STRING, (unsigned long)NEWEST_DESC_SIZE);
    return fail(FASTNORM_INVALID_ARGUMENT,
                "%s=%lu is not the size of a fastnorm_desc (%lu bytes in %s): initialize the descriptor "
                "with fastnorm_desc_init(&desc, sizeof desc, ...)",
                what, (unsigned long)size, (unsigned long)NEWEST_DESC_SIZE, FASTNORM_VERSION_STRING);
}

/* Copy the caller's descriptor (of any known version) into a full one. */
static fastnorm_status read_desc(const fastnorm_desc *in, fastnorm_desc *out)
{
    fastnorm_status st;
    if (in == NULL) return fail(FASTNORM_NULL_POINTER, "desc is NULL");
    if ((st = check_struct_size(in->struct_size, "desc->struct_size")) != FASTNORM_OK) return st;
    desc_defaults(out);
    memcpy(out, in, in->struct_size);
    return FASTNORM_OK;
}

/* ------------------------------------------------------------------------ */
/* Descriptor -> kernel call plan                                            */
/* ------------------------------------------------------------------------ */

typedef struct plan {
    int32_t kind;    /* fastnorm_kind */
    int dtype_index; /* 0: float32, 1: float64, 2: float16, 3: bfloat16 (the cfunc slots' order) */
    int64_t itemsize;
    int64_t param_itemsize; /* bytes per element of weight, bias and their gradients */
    int64_t param16;        /* 1: 16-bit parameters (param_dtype == dtype, 16-bit data) */
    int64_t batch, channels, spatial, groups, flags;
    int64_t size;    /* elements of x */
    int64_t nparams; /* elements of weight / bias */
    int64_t nstats;  /* elements of mean / rstd */
    int64_t group_size;
    double eps;
    int64_t activation; /* fastnorm_activation, the kernels' code (same values) */
    double negative_slope;
} plan;

static const char *kind_name(int32_t kind)
{
    static const char *names[] = {"?", "batch_norm", "instance_norm", "group_norm", "layer_norm", "rms_norm"};
    return (kind >= 1 && kind <= 5) ? names[kind] : "?";
}

/* a * b for positive a, b; returns 0 on overflow of INT64_MAX / limit. */
static int mul_checked(int64_t a, int64_t b, int64_t limit, int64_t *out)
{
    if (a > limit / b) return 0;
    *out = a * b;
    return 1;
}

static fastnorm_status make_plan(const fastnorm_desc *desc, int training, plan *p)
{
    int32_t k, rank, i;
    int64_t limit, lead = 1, trail = 1, total = 1;
    fastnorm_desc full;
    const fastnorm_desc *d = &full;
    fastnorm_status st;

    if ((st = read_desc(desc, &full)) != FASTNORM_OK) return st;
    k = d->kind;
    if (k < FASTNORM_BATCH_NORM || k > FASTNORM_RMS_NORM)
        return fail(FASTNORM_INVALID_ARGUMENT, "desc->kind=%d is not a fastnorm_kind (1..5)", (int)k);
    p->kind = k;
    switch (d->dtype) {
    case FASTNORM_FLOAT32:
        p->dtype_index = 0;
        p->itemsize = 4;
        break;
    case FASTNORM_FLOAT64:
        p->dtype_index = 1;
        p->itemsize = 8;
        break;
    case FASTNORM_FLOAT16:
        p->dtype_index = 2;
        p->itemsize = 2;
        break;
    case FASTNORM_BFLOAT16:
        p->dtype_index = 3;
        p->itemsize = 2;
        break;
    default: return fail(FASTNORM_INVALID_ARGUMENT, "desc->dtype=%d is not a fastnorm_dtype", (int)d->dtype);
    }
    p->param_itemsize = p->itemsize;
    p->param16 = 0;
    if (d->param_dtype == FASTNORM_DTYPE_DEFAULT || d->param_dtype == d->dtype) {
        p->param16 = p->itemsize == 2;
    } else if (d->param_dtype == FASTNORM_FLOAT32 && p->itemsize == 2) {
        p->param_itemsize = 4; /* 16-bit data with float32 parameters (torch's "mixed" mode) */
    } else if (d->param_dtype >= FASTNORM_FLOAT32 && d->param_dtype <= FASTNORM_BFLOAT16) {
        return fail(FASTNORM_UNSUPPORTED,
                    "desc->param_dtype=%d with desc->dtype=%d: parameters must have the data dtype, or "
                    "FASTNORM_FLOAT32 with 16-bit data",
                    (int)d->param_dtype, (int)d->dtype);
    } else {
        return fail(FASTNORM_INVALID_ARGUMENT, "desc->param_dtype=%d is not a fastnorm_dtype",
                    (int)d->param_dtype);
    }
    if (d->layout != FASTNORM_CHANNELS_FIRST && d->layout != FASTNORM_CHANNELS_LAST)
        return fail(FASTNORM_INVALID_ARGUMENT, "desc->layout=%d is not a fastnorm_layout", (int)d->layout);
    if (d->flags != 0)
        return fail(FASTNORM_UNSUPPORTED, "desc->flags=0x%llx: no flag is defined in this version",
                    (unsigned long long)d->flags);
    if (!isfinite(d->eps) || d->eps < 0.0)
        return fail(FASTNORM_INVALID_ARGUMENT, "desc->eps=%g must be finite and >= 0", d->eps);
    if (d->activation < FASTNORM_ACTIVATION_NONE || d->activation > FASTNORM_GELU_TANH)
        return fail(FASTNORM_INVALID_ARGUMENT, "desc->activation=%d is not a fastnorm_activation (0..7)",
                    (int)d->activation);
    if (d->reserved != 0)
        return fail(FASTNORM_INVALID_ARGUMENT, "desc->reserved=%d must be 0", (int)d->reserved);
    if (!isfinite(d->negative_slope))
        return fail(FASTNORM_INVALID_ARGUMENT, "desc->negative_slope=%g must be finite", d->negative_slope);
    if (p->itemsize == 2 && d->activation != FASTNORM_ACTIVATION_NONE)
        return fail(FASTNORM_UNSUPPORTED,
                    "desc->activation=%d with 16-bit data is not supported yet: normalize with "
                    "FASTNORM_ACTIVATION_NONE (a residual is supported) and apply it afterwards",
                    (int)d->activation);
    p->activation = d->activation;
    p->negative_slope = d->negative_slope;
    rank = d->rank;
    if (k == FASTNORM_GROUP_NORM) {
        if (d->num_groups < 1)
            return fail(FASTNORM_INVALID_ARGUMENT, "group_norm: desc->num_groups=%lld must be >= 1",
                        (long long)d->num_groups);
    } else if (d->num_groups != 0) {
        return fail(FASTNORM_INVALID_ARGUMENT, "%s: desc->num_groups=%lld must be 0 (group_norm only)",
                    kind_name(k), (long long)d->num_groups);
    }
    if (k == FASTNORM_LAYER_NORM || k == FASTNORM_RMS_NORM) {
        if (rank < 1 || rank > FASTNORM_MAX_RANK)
            return fail(FASTNORM_INVALID_ARGUMENT, "%s: desc->rank=%d must be in 1..%d", kind_name(k),
                        (int)rank, FASTNORM_MAX_RANK);
        if (d->normalized_ndim < 1 || d->normalized_ndim > rank)
            return fail(FASTNORM_INVALID_ARGUMENT, "%s: desc->normalized_ndim=%d must be in 1..rank=%d",
                        kind_name(k), (int)d->normalized_ndim, (int)rank);
        if (d->layout != FASTNORM_CHANNELS_FIRST)
            return fail(FASTNORM_INVALID_ARGUMENT,
                        "%s: layout must be FASTNORM_CHANNELS_FIRST (it normalizes the trailing dims)",
                        kind_name(k));
    } else {
        if (rank < 2 || rank > 5)
            return fail(FASTNORM_INVALID_ARGUMENT,
                        "%s: desc->rank=%d must be in 2..5: (N, C, *spatial) with spatial rank 0-3",
                        kind_name(k), (int)rank);
        if (d->normalized_ndim != 0)
            return fail(FASTNORM_INVALID_ARGUMENT, "%s: desc->normalized_ndim=%d must be 0", kind_name(k),
                        (int)d->normalized_ndim);
    }
    /* Every dim >= 1 and the byte size of every buffer (data: itemsize, stats:
       8 bytes) must fit in int64. */
    limit = INT64_MAX / 8;
    for (i = 0; i < rank; ++i) {
        if (d->dims[i] < 1)
            return fail(FASTNORM_INVALID_ARGUMENT,
                        "desc->dims[%d]=%lld: every dim must be >= 1 (skip empty tensors)", (int)i,
                        (long long)d->dims[i]);
    }
    for (i = 0; i < rank; ++i) {
        if (!mul_checked(total, d->dims[i], limit, &total))
            return fail(FASTNORM_SIZE_OVERFLOW, "the product of desc->dims overflows int64 bytes");
    }
    p->size = total;
    p->eps = d->eps;
    if (k == FASTNORM_LAYER_NORM || k == FASTNORM_RMS_NORM) {
        for (i = 0; i < rank - d->normalized_ndim; ++i) lead *= d->dims[i];
        for (i = rank - d->normalized_ndim; i < rank; ++i) trail *= d->dims[i];
        p->batch = lead;
        p->channels = 1;
        p->spatial = trail;
        p->groups = 1;
        p->flags = K_PER_ELEMENT | (k == FASTNORM_LAYER_NORM ? K_CENTERED : 0);
        p->nparams = trail;
        p->nstats = lead;
        p->group_size = trail;
        return FASTNORM_OK;
    }
    p->batch = d->dims[0];
    if (d->layout == FASTNORM_CHANNELS_LAST) {
        p->channels = d->dims[rank - 1];
        for (i = 1; i < rank - 1; ++i) trail *= d->dims[i];
    } else {
        p->channels = d->dims[1];
        for (i = 2; i < rank; ++i) trail *= d->dims[i];
    }
    p->spatial = trail;
    p->flags = K_CENTERED | (d->layout == FASTNORM_CHANNELS_LAST ? K_CHANNELS_LAST : 0);
    p->nparams = p->channels;
    if (k == FASTNORM_BATCH_NORM) {
        p->groups = p->channels;
        p->flags |= K_BATCH;
        p->nstats = p->channels;
        p->group_size = p->batch * p->spatial;
        if (training && p->group_size == 1)
            return fail(FASTNORM_INVALID_ARGUMENT,
                        "batch_norm: expected more than 1 value per channel when training (N*S == 1)");
    } else {
        p->groups = k == FASTNORM_INSTANCE_NORM ? p->channels : d->num_groups;
        if (p->channels % p->groups != 0)
            return fail(FASTNORM_INVALID_ARGUMENT,
                        "group_norm: num_groups=%lld does not divide C=%lld channels", (long long)p->groups,
                        (long long)p->channels);
        p->nstats = p->batch * p->groups;
        p->group_size = (p->channels / p->groups) * p->spatial;
        if (training && k == FASTNORM_INSTANCE_NORM && p->spatial == 1)
            return fail(FASTNORM_INVALID_ARGUMENT,
                        "instance_norm: expected more than 1 spatial element when training");
    }
    return FASTNORM_OK;
}

FASTNORM_API fastnorm_status fastnorm_desc_init(fastnorm_desc *desc, size_t struct_size, fastnorm_kind kind,
                                                fastnorm_dtype dtype, int32_t rank, const int64_t *dims)
{
    fastnorm_desc full;
    fastnorm_status st;
    int32_t i;
    if (desc == NULL) return fail(FASTNORM_NULL_POINTER, "desc is NULL");
    if (dims == NULL) return fail(FASTNORM_NULL_POINTER, "dims is NULL");
    if ((st = check_struct_size(struct_size, "struct_size")) != FASTNORM_OK) return st;
    if ((int)kind < FASTNORM_BATCH_NORM || (int)kind > FASTNORM_RMS_NORM)
        return fail(FASTNORM_INVALID_ARGUMENT, "kind=%d is not a fastnorm_kind (1..5)", (int)kind);
    switch (dtype) {
    case FASTNORM_FLOAT32:
    case FASTNORM_FLOAT64:
    case FASTNORM_FLOAT16:
    case FASTNORM_BFLOAT16: break;
    default:
        return fail(FASTNORM_INVALID_ARGUMENT,
                    "dtype=%d is not a data fastnorm_dtype (FASTNORM_FLOAT32, 64, FLOAT16, BFLOAT16)",
                    (int)dtype);
    }
    if (rank < 1 || rank > FASTNORM_MAX_RANK)
        return fail(FASTNORM_INVALID_ARGUMENT, "rank=%d must be in 1..%d", (int)rank, FASTNORM_MAX_RANK);
    desc_defaults(&full);
    full.struct_size = struct_size;
    full.kind = kind;
    full.dtype = dtype;
    full.param_dtype = FASTNORM_DTYPE_DEFAULT;
    full.layout = FASTNORM_CHANNELS_FIRST;
    full.rank = rank;
    full.normalized_ndim = (kind == FASTNORM_LAYER_NORM || kind == FASTNORM_RMS_NORM) ? 1 : 0;
    full.num_groups = 0;
    full.eps = 1e-5;
    full.flags = 0;
    for (i = 0; i < rank; ++i) full.dims[i] = dims[i];
    memcpy(desc, &full, struct_size); /* exactly the caller's struct */
    return FASTNORM_OK;
}

FASTNORM_API fastnorm_status fastnorm_num_params(const fastnorm_desc *desc, int64_t *count)
{
    plan p;
    fastnorm_status st;
    if (count == NULL) return fail(FASTNORM_NULL_POINTER, "count is NULL");
    if ((st = make_plan(desc, 0, &p)) != FASTNORM_OK) return st;
    *count = p.nparams;
    return FASTNORM_OK;
}

FASTNORM_API fastnorm_status fastnorm_num_stats(const fastnorm_desc *desc, int64_t *count)
{
    plan p;
    fastnorm_status st;
    if (count == NULL) return fail(FASTNORM_NULL_POINTER, "count is NULL");
    if ((st = make_plan(desc, 0, &p)) != FASTNORM_OK) return st;
    *count = p.nstats;
    return FASTNORM_OK;
}

/* ------------------------------------------------------------------------ */
/* Buffer checks                                                             */
/* ------------------------------------------------------------------------ */

typedef struct buffer {
    const char *name;
    const void *ptr; /* NULL: absent */
    int64_t bytes;
    int output;
    int64_t align; /* required alignment: the element size */
} buffer;

static fastnorm_status check_aligned(const buffer *b, int64_t align)
{
    if (b->ptr != NULL && ((uintptr_t)b->ptr % (uintptr_t)align) != 0)
        return fail(FASTNORM_INVALID_ARGUMENT, "%s=%p is not aligned to %lld bytes", b->name, b->ptr,
                    (long long)align);
    return FASTNORM_OK;
}

static int overlap(const buffer *a, const buffer *b)
{
    uintptr_t a0 = (uintptr_t)a->ptr, b0 = (uintptr_t)b->ptr;
    if (a->ptr == NULL || b->ptr == NULL) return 0;
    return a0 < b0 + (uintptr_t)b->bytes && b0 < a0 + (uintptr_t)a->bytes;
}

/* Every output must be disjoint from every other buffer, except the exact
   aliases listed as (output index, input index) pairs in `allowed`. */
static fastnorm_status check_overlaps(const buffer *bufs, int n, const int (*allowed)[2], int nallowed)
{
    int i, j, a;
    for (i = 0; i < n; ++i) {
        if (!bufs[i].output) continue;
        for (j = 0; j < n; ++j) {
            int ok = 0;
            if (j == i || (bufs[j].output && j < i) || !overlap(&bufs[i], &bufs[j])) continue;
            for (a = 0; a < nallowed; ++a)
                if (allowed[a][0] == i && allowed[a][1] == j && bufs[i].ptr == bufs[j].ptr) ok = 1;
            if (!ok)
                return fail(FASTNORM_OVERLAP, "%s overlaps %s%s", bufs[i].name, bufs[j].name,
                            nallowed ? " (only the documented exact aliases are allowed)" : "");
        }
    }
    return FASTNORM_OK;
}

/* ------------------------------------------------------------------------ */
/* Runtime                                                                   */
/* ------------------------------------------------------------------------ */

enum { STATE_NONE = 0, STATE_READY = 1, STATE_FAILED = 2 };

/* Held while the runtime starts and while a cfunc loads (the only times C
   runs Python); see the fork handlers below. */
static pthread_mutex_t init_lock = PTHREAD_MUTEX_INITIALIZER;
static int runtime_state = STATE_NONE; /* atomic */
/* cfunc slots are 0 until their first call loads them (atomic); then fixed. */
static int64_t runtime_table[SLOT_COUNT];
static char runtime_message[4096]; /* layer name on success, reason on failure */
static int max_threads = 1;
static int wanted_threads = 0; /* atomic; 0 = max_threads */
/* 1 in a child forked after the runtime started on a threading layer that
   cannot run there (SLOT_AFTER_FORK == AFTER_FORK_SERIAL: GNU OpenMP). */
static int serial_after_fork = 0; /* atomic */

static int owns_interpreter = 0;

/* Fork handlers.  With the library's own interpreter, fork() waits for a
   cfunc load under way, so the child inherits a consistent runtime and a free
   GIL.  A host Python process may fork (os.fork) while holding the GIL, which
   a load under way waits for: waiting for init_lock there could deadlock, so
   the child instead gets a fresh init_lock (the loading thread is not in the
   child; its slot is still 0 and loads again on first use). */
static void lock_for_fork(void)
{
    if (owns_interpreter) pthread_mutex_lock(&init_lock);
}

static void unlock_in_parent(void)
{
    if (owns_interpreter) pthread_mutex_unlock(&init_lock);
}

static void reset_in_child(void)
{
    if (runtime_table[SLOT_AFTER_FORK] == AFTER_FORK_SERIAL)
        __atomic_store_n(&serial_after_fork, 1, __ATOMIC_RELAXED);
    if (owns_interpreter) pthread_mutex_unlock(&init_lock);
    else pthread_mutex_init(&init_lock, NULL);
}

static fastnorm_status start_interpreter(void)
{
    PyStatus status;
    PyConfig config;
    const char *home;

    if (Py_IsInitialized()) return FASTNORM_OK; /* host process already runs Python */
    owns_interpreter = 1;
    PyConfig_InitPythonConfig(&config);
    config.install_signal_handlers = 0;
    config.parse_argv = 0;
    home = getenv("FASTNORM_PYTHONHOME");
    if (home != NULL && home[0] != '\0') status = PyConfig_SetBytesString(&config, &config.home, home);
    else
        /* Start the interpreter as if FASTNORM_BAKED_EXECUTABLE were run: its
           prefix, virtual environment and site-packages are found as usual. */
        status = PyConfig_SetBytesString(&config, &config.program_name, FASTNORM_BAKED_EXECUTABLE);
    if (!PyStatus_Exception(status)) status = Py_InitializeFromConfig(&config);
    PyConfig_Clear(&config);
    if (PyStatus_Exception(status)) {
        snprintf(runtime_message, sizeof runtime_message,
                 "cannot start the embedded Python interpreter (%s%s%s); built with %s, "
                 "set FASTNORM_PYTHONHOME to a Python %s prefix",
                 status.func ? status.func : "", status.func ? ": " : "",
                 status.err_msg ? status.err_msg : "exit requested", FASTNORM_BAKED_EXECUTABLE,
                 FASTNORM_BAKED_PY_VERSION);
        return FASTNORM_NOT_INITIALIZED;
    }
    PyEval_SaveThread(); /* release the GIL: cffi and the kernels never need it */
    return FASTNORM_OK;
}

FASTNORM_API fastnorm_status fastnorm_init(void)
{
    int state = __atomic_load_n(&runtime_state, __ATOMIC_ACQUIRE);
    if (state == STATE_READY) return FASTNORM_OK;
    pthread_mutex_lock(&init_lock);
    state = __atomic_load_n(&runtime_state, __ATOMIC_ACQUIRE);
    if (state == STATE_NONE) {
        state = STATE_FAILED;
        runtime_message[0] = '\0';
        if (start_interpreter() == FASTNORM_OK) {
            if (_fastnorm_py_init(runtime_table, SLOT_COUNT, owns_interpreter, runtime_message,
                                  (int64_t)sizeof runtime_message)
                == 1) {
                int i, ok = 1;
                for (i = SLOT_SET_THREADS; i < SLOT_COUNT; ++i) ok = ok && runtime_table[i] != 0;
                if (ok && pthread_atfork(lock_for_fork, unlock_in_parent, reset_in_child) != 0) {
                    snprintf(runtime_message, sizeof runtime_message,
                             "cannot register the fork handler (pthread_atfork failed)");
                } else if (ok) {
                    max_threads = (int)runtime_table[SLOT_MAX_THREADS];
                    state = STATE_READY;
                } else {
                    snprintf(runtime_message, sizeof runtime_message,
                             "the Python runtime returned an incomplete function table");
                }
            } else if (runtime_message[0] == '\0') {
                snprintf(runtime_message, sizeof runtime_message,
                         "the embedded Python init code failed (its traceback went to stderr)");
            }
        }
        __atomic_store_n(&runtime_state, state, __ATOMIC_RELEASE);
    }
    pthread_mutex_unlock(&init_lock);
    if (state != STATE_READY)
        return fail(FASTNORM_NOT_INITIALIZED, "fastnorm runtime not available: %s", runtime_message);
    return FASTNORM_OK;
}

static fastnorm_status ensure_runtime(void)
{
    if (__atomic_load_n(&runtime_state, __ATOMIC_ACQUIRE) == STATE_READY) return FASTNORM_OK;
    return fastnorm_init();
}

/* Start the runtime if needed and return the cfunc of table slot `slot` in
   *fn, loading it on the first call (one load per slot and process, under
   init_lock).  A failed load is not sticky: the next call tries again. */
static fastnorm_status ensure_kernel(int slot, void **fn)
{
    static char message[4096]; /* written under init_lock, copied out before it is released */
    char reason[sizeof message];
    int64_t address;
    fastnorm_status st = ensure_runtime();
    if (st != FASTNORM_OK) return st;
    address = __atomic_load_n(&runtime_table[slot], __ATOMIC_ACQUIRE);
    if (address == 0) {
        pthread_mutex_lock(&init_lock);
        address = __atomic_load_n(&runtime_table[slot], __ATOMIC_ACQUIRE);
        if (address == 0) {
            message[0] = '\0';
            if (_fastnorm_py_load(slot, &address, message, (int64_t)sizeof message) != 1) address = 0;
            if (address != 0) __atomic_store_n(&runtime_table[slot], address, __ATOMIC_RELEASE);
            else snprintf(reason, sizeof reason, "%s", message[0] ? message : "(no traceback)");
        }
        pthread_mutex_unlock(&init_lock);
        if (address == 0)
            return fail(FASTNORM_INTERNAL_ERROR, "cannot load the kernel of this call (table slot %d): %s",
                        slot, reason);
    }
    *fn = (void *)(uintptr_t)address;
    return FASTNORM_OK;
}

FASTNORM_API fastnorm_status fastnorm_set_num_threads(int num_threads)
{
    fastnorm_status st = ensure_runtime();
    if (st != FASTNORM_OK) return st;
    if (num_threads < 0 || num_threads > max_threads)
        return fail(FASTNORM_INVALID_ARGUMENT, "num_threads=%d must be in 0..%d (NUMBA_NUM_THREADS)",
                    num_threads, max_threads);
    __atomic_store_n(&wanted_threads, num_threads, __ATOMIC_RELAXED);
    return FASTNORM_OK;
}

FASTNORM_API fastnorm_status fastnorm_get_num_threads(int *num_threads)
{
    fastnorm_status st;
    int n;
    if (num_threads == NULL) return fail(FASTNORM_NULL_POINTER, "num_threads is NULL");
    if ((st = ensure_runtime()) != FASTNORM_OK) return st;
    n = __atomic_load_n(&wanted_threads, __ATOMIC_RELAXED);
    *num_threads = n > 0 ? n : max_threads;
    return FASTNORM_OK;
}

FASTNORM_API fastnorm_status fastnorm_runtime_info(int *max_threads_out, const char **layer)
{
    fastnorm_status st = ensure_runtime();
    if (st != FASTNORM_OK) return st;
    if (max_threads_out != NULL) *max_threads_out = max_threads;
    if (layer != NULL) *layer = runtime_message;
    return FASTNORM_OK;
}

/* Numba's thread count is thread-local to the launching thread: set it for
   this call and restore the caller's value afterwards.  The count is also
   passed to the cfunc, whose schedule may depend on it (as in Python); 0 in
   a forked child that must run the serial builds (see serial_after_fork). */
static int enter_threads(int *threads)
{
    int n = __atomic_load_n(&wanted_threads, __ATOMIC_RELAXED);
    int previous = ((get_threads_fn)(uintptr_t)runtime_table[SLOT_GET_THREADS])();
    if (n <= 0) n = max_threads;
    if (previous != n) ((set_threads_fn)(uintptr_t)runtime_table[SLOT_SET_THREADS])(n);
    *threads = __atomic_load_n(&serial_after_fork, __ATOMIC_RELAXED) ? 0 : n;
    return previous;
}

static void leave_threads(int previous)
{
    int n = ((get_threads_fn)(uintptr_t)runtime_table[SLOT_GET_THREADS])();
    if (previous >= 1 && previous != n)
        ((set_threads_fn)(uintptr_t)runtime_table[SLOT_SET_THREADS])(previous);
}

/* ------------------------------------------------------------------------ */
/* Entry points                                                              */
/* ------------------------------------------------------------------------ */

#define REQUIRE(ptr)                                                               \
    do {                                                                           \
        if ((ptr) == NULL) return fail(FASTNORM_NULL_POINTER, "%s is NULL", #ptr); \
    } while (0)

static fastnorm_status check_buffers(const buffer *bufs, int n, const int (*allowed)[2], int nallowed)
{
    int i;
    fastnorm_status st;
    for (i = 0; i < n; ++i)
        if ((st = check_aligned(&bufs[i], bufs[i].align)) != FASTNORM_OK) return st;
    return check_overlaps(bufs, n, allowed, nallowed);
}

/* Shared body of the forward entry points: training (mean/rstd are outputs)
 * and inference (mean/rstd are inputs), with or without a residual. */
static fastnorm_status forward_common(const fastnorm_desc *desc, int training, const void *x,
                                      const void *residual, const void *weight, const void *bias,
                                      const double *mean, const double *rstd, void *y)
{
    void *fn;
    static const int allowed[][2] = {{6, 0}, {6, 1}}; /* y == x, y == residual */
    plan p;
    fastnorm_status st;
    int32_t rc;
    int previous, slot, threads;
    if ((st = make_plan(desc, training, &p)) != FASTNORM_OK) return st;
    REQUIRE(x);
    REQUIRE(y);
    REQUIRE(mean);
    REQUIRE(rstd);
    {
        buffer bufs[] = {
            {"x", x, p.size * p.itemsize, 0, p.itemsize},
            {"residual", residual, p.size * p.itemsize, 0, p.itemsize},
            {"weight", weight, p.nparams * p.param_itemsize, 0, p.param_itemsize},
            {"bias", bias, p.nparams * p.param_itemsize, 0, p.param_itemsize},
            {"mean", mean, p.nstats * 8, training, 8},
            {"rstd", rstd, p.nstats * 8, training, 8},
            {"y", y, p.size * p.itemsize, 1, p.itemsize},
        };
        if ((st = check_buffers(bufs, 7, allowed, 2)) != FASTNORM_OK) return st;
    }
    slot = training ? FORWARD_TRAINING_SLOTS[p.dtype_index] : FORWARD_INFERENCE_SLOTS[p.dtype_index];
    if ((st = ensure_kernel(slot, &fn)) != FASTNORM_OK) return st;
    previous = enter_threads(&threads);
    rc = ((forward_fn)fn)(x, residual, residual ? p.size : 0, weight, weight ? p.nparams : 0, bias,
                          bias ? p.nparams : 0, y, (double *)mean, (double *)rstd, p.nstats, p.batch,
                          p.channels, p.spatial, p.groups, p.flags, p.eps, p.activation, p.negative_slope,
                          p.param16, (int64_t)threads);
    leave_threads(previous);
    if (rc != 1)
        return fail(FASTNORM_INTERNAL_ERROR, "the %s kernel failed (out of memory?)",
                    training ? "forward" : "inference");
    return FASTNORM_OK;
}

FASTNORM_API fastnorm_status fastnorm_forward_training(const fastnorm_desc *desc, const void *x,
                                                       const void *weight, const void *bias, void *y,
                                                       double *mean, double *rstd)
{
    return forward_common(desc, 1, x, NULL, weight, bias, mean, rstd, y);
}

FASTNORM_API fastnorm_status fastnorm_forward_inference(const fastnorm_desc *desc, const void *x,
                                                        const void *weight, const void *bias,
                                                        const double *mean, const double *rstd, void *y)
{
    return forward_common(desc, 0, x, NULL, weight, bias, mean, rstd, y);
}

FASTNORM_API fastnorm_status fastnorm_forward_training_fused(const fastnorm_desc *desc, const void *x,
                                                             const void *residual, const void *weight,
                                                             const void *bias, void *y, double *mean,
                                                             double *rstd)
{
    return forward_common(desc, 1, x, residual, weight, bias, mean, rstd, y);
}

FASTNORM_API fastnorm_status fastnorm_forward_inference_fused(const fastnorm_desc *desc, const void *x,
                                                              const void *residual, const void *weight,
                                                              const void *bias, const double *mean,
                                                              const double *rstd, void *y)
{
    return forward_common(desc, 0, x, residual, weight, bias, mean, rstd, y);
}

/* The skip add's entry points take LayerNorm and RMSNorm descriptors only. */
static fastnorm_status check_skip_kind(const plan *p, const char *function)
{
    if (p->kind != FASTNORM_LAYER_NORM && p->kind != FASTNORM_RMS_NORM)
        return fail(FASTNORM_INVALID_ARGUMENT,
                    "%s: desc->kind=%s: the pre-norm skip add is for layer_norm and rms_norm only", function,
                    kind_name(p->kind));
    return FASTNORM_OK;
}

FASTNORM_API fastnorm_status fastnorm_skip_forward_training(const fastnorm_desc *desc, const void *x,
                                                            const void *skip, const void *skip_bias,
                                                            const void *weight, const void *bias, void *h,
                                                            void *y, double *mean, double *rstd)
{
    void *fn;
    /* h == x, h == skip, y == x, y == skip (never y == h) */
    static const int allowed[][2] = {{7, 0}, {7, 1}, {8, 0}, {8, 1}};
    plan p;
    fastnorm_status st;
    int32_t rc;
    int previous, threads;
    if ((st = make_plan(desc, 1, &p)) != FASTNORM_OK) return st;
    if ((st = check_skip_kind(&p, "fastnorm_skip_forward_training")) != FASTNORM_OK) return st;
    REQUIRE(x);
    REQUIRE(skip);
    REQUIRE(h);
    REQUIRE(y);
    REQUIRE(mean);
    REQUIRE(rstd);
    {
        buffer bufs[] = {
            {"x", x, p.size * p.itemsize, 0, p.itemsize},
            {"skip", skip, p.size * p.itemsize, 0, p.itemsize},
            {"skip_bias", skip_bias, p.nparams * p.param_itemsize, 0, p.param_itemsize},
            {"weight", weight, p.nparams * p.param_itemsize, 0, p.param_itemsize},
            {"bias", bias, p.nparams * p.param_itemsize, 0, p.param_itemsize},
            {"mean", mean, p.nstats * 8, 1, 8},
            {"rstd", rstd, p.nstats * 8, 1, 8},
            {"h", h, p.size * p.itemsize, 1, p.itemsize},
            {"y", y, p.size * p.itemsize, 1, p.itemsize},
        };
        if ((st = check_buffers(bufs, 9, allowed, 4)) != FASTNORM_OK) return st;
    }
    if ((st = ensure_kernel(SKIP_FORWARD_SLOTS[p.dtype_index], &fn)) != FASTNORM_OK) return st;
    previous = enter_threads(&threads);
    rc = ((skip_forward_fn)fn)(x, skip, skip_bias, skip_bias ? p.nparams : 0, weight, weight ? p.nparams : 0,
                               bias, bias ? p.nparams : 0, h, y, mean, rstd, p.nstats, p.batch, p.channels,
                               p.spatial, p.groups, p.flags, p.eps, p.activation, p.negative_slope, p.param16,
                               (int64_t)threads);
    leave_threads(previous);
    if (rc != 1) return fail(FASTNORM_INTERNAL_ERROR, "the skip forward kernel failed (out of memory?)");
    return FASTNORM_OK;
}

/* Shared body of the backward entry points; `fused` says whether the caller
 * could pass the epilogue's buffers (fastnorm_backward_fused, fastnorm_skip_backward),
 * `skip` whether it is the skip add's (x is h, and dskip_bias may be asked for). */
static fastnorm_status backward_common(const fastnorm_desc *desc, int fused, int skip, const void *dy,
                                       const void *x, const void *residual, const void *weight,
                                       const void *bias, const double *mean, const double *rstd, void *dx,
                                       void *dresidual, void *dweight, void *dbias, void *dskip_bias)
{
    void *fn;
    /* dx == dy, dx == x, dresidual == dy */
    static const int allowed[][2] = {{7, 0}, {7, 1}, {8, 0}};
    plan p;
    fastnorm_status st;
    int32_t rc;
    int previous, threads;
    if ((st = make_plan(desc, 1, &p)) != FASTNORM_OK) return st;
    if (skip && (st = check_skip_kind(&p, "fastnorm_skip_backward")) != FASTNORM_OK) return st;
    if (!fused && p.activation != FASTNORM_ACTIVATION_NONE)
        return fail(FASTNORM_INVALID_ARGUMENT,
                    "desc->activation=%d: fastnorm_backward cannot recompute the activation's input; call "
                    "fastnorm_backward_fused with the forward's bias and residual",
                    (int)p.activation);
    REQUIRE(dy);
    if (x == NULL) return fail(FASTNORM_NULL_POINTER, "%s is NULL", skip ? "h" : "x");
    REQUIRE(mean);
    REQUIRE(rstd);
    REQUIRE(dx);
    {
        buffer bufs[] = {
            {"dy", dy, p.size * p.itemsize, 0, p.itemsize},
            {skip ? "h" : "x", x, p.size * p.itemsize, 0, p.itemsize},
            {"residual", residual, p.size * p.itemsize, 0, p.itemsize},
            {"weight", weight, p.nparams * p.param_itemsize, 0, p.param_itemsize},
            {"bias", bias, p.nparams * p.param_itemsize, 0, p.param_itemsize},
            {"mean", mean, p.nstats * 8, 0, 8},
            {"rstd", rstd, p.nstats * 8, 0, 8},
            {"dx", dx, p.size * p.itemsize, 1, p.itemsize},
            {"dresidual", dresidual, p.size * p.itemsize, 1, p.itemsize},
            {"dweight", dweight, p.nparams * p.param_itemsize, 1, p.param_itemsize},
            {"dbias", dbias, p.nparams * p.param_itemsize, 1, p.param_itemsize},
            {"dskip_bias", dskip_bias, p.nparams * p.param_itemsize, 1, p.param_itemsize},
        };
        if ((st = check_buffers(bufs, 12, allowed, 3)) != FASTNORM_OK) return st;
    }
    if ((st = ensure_kernel(BACKWARD_SLOTS[p.dtype_index], &fn)) != FASTNORM_OK) return st;
    previous = enter_threads(&threads);
    rc = ((backward_fn)fn)(dy, x, residual, residual ? p.size : 0, weight, weight ? p.nparams : 0, bias,
                           bias ? p.nparams : 0, mean, rstd, p.nstats, dx, dresidual, dresidual ? p.size : 0,
                           dweight, dweight ? p.nparams : 0, dbias, dbias ? p.nparams : 0, dskip_bias,
                           dskip_bias ? p.nparams : 0, p.batch, p.channels, p.spatial, p.groups, p.flags,
                           p.eps, p.activation, p.negative_slope, p.param16, (int64_t)threads);
    leave_threads(previous);
    if (rc != 1) return fail(FASTNORM_INTERNAL_ERROR, "the backward kernel failed (out of memory?)");
    return FASTNORM_OK;
}

FASTNORM_API fastnorm_status fastnorm_backward(const fastnorm_desc *desc, const void *dy, const void *x,
                                               const void *weight, const double *mean, const double *rstd,
                                               void *dx, void *dweight, void *dbias)
{
    return backward_common(desc, 0, 0, dy, x, NULL, weight, NULL, mean, rstd, dx, NULL, dweight, dbias, NULL);
}

FASTNORM_API fastnorm_status fastnorm_backward_fused(const fastnorm_desc *desc, const void *dy, const void *x,
                                                     const void *residual, const void *weight,
                                                     const void *bias, const double *mean, const double *rstd,
                                                     void *dx, void *dresidual, void *dweight, void *dbias)
{
    return backward_common(desc, 1, 0, dy, x, residual, weight, bias, mean, rstd, dx, dresidual, dweight,
                           dbias, NULL);
}

FASTNORM_API fastnorm_status fastnorm_skip_backward(const fastnorm_desc *desc, const void *dy, const void *h,
                                                    const void *weight, const void *bias, const double *mean,
                                                    const double *rstd, void *dx, void *dweight, void *dbias,
                                                    void *dskip_bias)
{
    return backward_common(desc, 1, 1, dy, h, NULL, weight, bias, mean, rstd, dx, NULL, dweight, dbias,
                           dskip_bias);
}

/* ------------------------------------------------------------------------ */
/* BatchNorm split across processes                                          */
/* ------------------------------------------------------------------------ */

/* The plan of a split pass: this rank's samples (no one-value-per-channel check), a BatchNorm
   descriptor without an activation, float32 or float64 data. */
static fastnorm_status split_plan(const fastnorm_desc *desc, const char *function, plan *p)
{
    fastnorm_status st;
    if ((st = make_plan(desc, 0, p)) != FASTNORM_OK) return st;
    if (p->kind != FASTNORM_BATCH_NORM)
        return fail(FASTNORM_INVALID_ARGUMENT, "%s: desc->kind=%s: the split passes are BatchNorm's",
                    function, kind_name(p->kind));
    if (p->activation != FASTNORM_ACTIVATION_NONE)
        return fail(FASTNORM_INVALID_ARGUMENT,
                    "%s: desc->activation=%d: the split passes take the gradient at the norm's output "
                    "(no fused activation)",
                    function, (int)p->activation);
    if (p->dtype_index > 1)
        return fail(FASTNORM_UNSUPPORTED, "%s: 16-bit data is not supported by the split passes yet",
                    function);
    return FASTNORM_OK;
}

FASTNORM_API fastnorm_status fastnorm_batch_stats(const fastnorm_desc *desc, const void *x, int64_t *count,
                                                  double *mean, double *m2)
{
    void *fn;
    plan p;
    fastnorm_status st;
    int32_t rc;
    int previous, threads;
    if ((st = split_plan(desc, "fastnorm_batch_stats", &p)) != FASTNORM_OK) return st;
    REQUIRE(x);
    REQUIRE(count);
    REQUIRE(mean);
    REQUIRE(m2);
    {
        buffer bufs[] = {
            {"x", x, p.size * p.itemsize, 0, p.itemsize},
            {"count", count, 8, 1, 8},
            {"mean", mean, p.channels * 8, 1, 8},
            {"m2", m2, p.channels * 8, 1, 8},
        };
        if ((st = check_buffers(bufs, 4, NULL, 0)) != FASTNORM_OK) return st;
    }
    if ((st = ensure_kernel(BATCH_STATS_SLOTS[p.dtype_index], &fn)) != FASTNORM_OK) return st;
    previous = enter_threads(&threads);
    rc = ((batch_stats_fn)fn)(x, mean, m2, p.batch, p.channels, p.spatial, p.groups, p.flags, p.eps,
                              p.activation, p.negative_slope, (int64_t)threads);
    leave_threads(previous);
    if (rc != 1) return fail(FASTNORM_INTERNAL_ERROR, "the batch statistics kernel failed (out of memory?)");
    *count = p.group_size;
    return FASTNORM_OK;
}

FASTNORM_API fastnorm_status fastnorm_merge_stats(int64_t num_ranks, int64_t channels, const int64_t *counts,
                                                  const double *means, const double *m2s, int64_t *count,
                                                  double *mean, double *var)
{
    void *fn;
    fastnorm_status st;
    int64_t r, total = 0, values;
    int32_t rc;
    REQUIRE(counts);
    REQUIRE(means);
    REQUIRE(m2s);
    REQUIRE(count);
    REQUIRE(mean);
    REQUIRE(var);
    if (num_ranks < 1 || channels < 1)
        return fail(FASTNORM_INVALID_ARGUMENT, "num_ranks=%lld and channels=%lld must be >= 1",
                    (long long)num_ranks, (long long)channels);
    if (!mul_checked(num_ranks, channels, INT64_MAX / 8, &values))
        return fail(FASTNORM_SIZE_OVERFLOW, "num_ranks * channels doubles overflow int64 bytes");
    if (num_ranks > INT64_MAX / 8)
        return fail(FASTNORM_SIZE_OVERFLOW, "num_ranks int64 counts overflow int64 bytes");
    {
        buffer bufs[] = {
            {"counts", counts, num_ranks * 8, 0, 8}, {"means", means, values * 8, 0, 8},
            {"m2s", m2s, values * 8, 0, 8},          {"count", count, 8, 1, 8},
            {"mean", mean, channels * 8, 1, 8},      {"var", var, channels * 8, 1, 8},
        };
        if ((st = check_buffers(bufs, 6, NULL, 0)) != FASTNORM_OK) return st;
    }
    for (r = 0; r < num_ranks; ++r) {
        if (counts[r] < 0)
            return fail(FASTNORM_INVALID_ARGUMENT, "counts[%lld]=%lld must be >= 0", (long long)r,
                        (long long)counts[r]);
        if (counts[r] > INT64_MAX - total)
            return fail(FASTNORM_SIZE_OVERFLOW, "the sum of counts overflows int64");
        total += counts[r];
    }
    if (total == 0)
        return fail(FASTNORM_INVALID_ARGUMENT,
                    "every count is 0: no rank has any element; the statistics "
                    "are undefined");
    if ((st = ensure_kernel(SLOT_MERGE_STATS_FLOAT64, &fn)) != FASTNORM_OK) return st;
    rc = ((merge_stats_fn)fn)(num_ranks, channels, counts, means, m2s, mean, var, count);
    if (rc != 1) return fail(FASTNORM_INTERNAL_ERROR, "the merge failed (out of memory?)");
    return FASTNORM_OK;
}

FASTNORM_API fastnorm_status fastnorm_backward_reduce(const fastnorm_desc *desc, const void *dy,
                                                      const void *x, const double *mean, const double *rstd,
                                                      double *sum_dy, double *sum_dy_xhat)
{
    void *fn;
    plan p;
    fastnorm_status st;
    int32_t rc;
    int previous, threads;
    if ((st = split_plan(desc, "fastnorm_backward_reduce", &p)) != FASTNORM_OK) return st;
    REQUIRE(dy);
    REQUIRE(x);
    REQUIRE(mean);
    REQUIRE(rstd);
    REQUIRE(sum_dy);
    REQUIRE(sum_dy_xhat);
    {
        buffer bufs[] = {
            {"dy", dy, p.size * p.itemsize, 0, p.itemsize},
            {"x", x, p.size * p.itemsize, 0, p.itemsize},
            {"mean", mean, p.channels * 8, 0, 8},
            {"rstd", rstd, p.channels * 8, 0, 8},
            {"sum_dy", sum_dy, p.channels * 8, 1, 8},
            {"sum_dy_xhat", sum_dy_xhat, p.channels * 8, 1, 8},
        };
        if ((st = check_buffers(bufs, 6, NULL, 0)) != FASTNORM_OK) return st;
    }
    if ((st = ensure_kernel(BACKWARD_REDUCE_SLOTS[p.dtype_index], &fn)) != FASTNORM_OK) return st;
    previous = enter_threads(&threads);
    rc = ((backward_reduce_fn)fn)(dy, x, mean, rstd, sum_dy, sum_dy_xhat, p.batch, p.channels, p.spatial,
                                  p.groups, p.flags, p.eps, p.activation, p.negative_slope, (int64_t)threads);
    leave_threads(previous);
    if (rc != 1) return fail(FASTNORM_INTERNAL_ERROR, "the backward reduce kernel failed (out of memory?)");
    return FASTNORM_OK;
}

FASTNORM_API fastnorm_status fastnorm_backward_apply(const fastnorm_desc *desc, const void *dy, const void *x,
                                                     const void *weight, const double *mean,
                                                     const double *rstd, const double *sum_dy,
                                                     const double *sum_dy_xhat, int64_t count, void *dx)
{
    void *fn;
    static const int allowed[][2] = {{7, 0}, {7, 1}}; /* dx == dy, dx == x */
    plan p;
    fastnorm_status st;
    int32_t rc;
    int previous, threads;
    if ((st = split_plan(desc, "fastnorm_backward_apply", &p)) != FASTNORM_OK) return st;
    REQUIRE(dy);
    REQUIRE(x);
    REQUIRE(mean);
    REQUIRE(rstd);
    REQUIRE(sum_dy);
    REQUIRE(sum_dy_xhat);
    REQUIRE(dx);
    if (count < p.group_size)
        return fail(FASTNORM_INVALID_ARGUMENT,
                    "fastnorm_backward_apply: count=%lld is below this rank's %lld elements per channel: "
                    "pass the global count",
                    (long long)count, (long long)p.group_size);
    {
        buffer bufs[] = {
            {"dy", dy, p.size * p.itemsize, 0, p.itemsize},
            {"x", x, p.size * p.itemsize, 0, p.itemsize},
            {"weight", weight, p.nparams * p.param_itemsize, 0, p.param_itemsize},
            {"mean", mean, p.channels * 8, 0, 8},
            {"rstd", rstd, p.channels * 8, 0, 8},
            {"sum_dy", sum_dy, p.channels * 8, 0, 8},
            {"sum_dy_xhat", sum_dy_xhat, p.channels * 8, 0, 8},
            {"dx", dx, p.size * p.itemsize, 1, p.itemsize},
        };
        if ((st = check_buffers(bufs, 8, allowed, 2)) != FASTNORM_OK) return st;
    }
    if ((st = ensure_kernel(BACKWARD_APPLY_SLOTS[p.dtype_index], &fn)) != FASTNORM_OK) return st;
    previous = enter_threads(&threads);
    rc = ((backward_apply_fn)fn)(dy, x, weight, weight ? p.nparams : 0, mean, rstd, sum_dy, sum_dy_xhat,
                                 (double)count, dx, p.batch, p.channels, p.spatial, p.groups, p.flags, p.eps,
                                 p.activation, p.negative_slope, (int64_t)threads);
    leave_threads(previous);
    if (rc != 1) return fail(FASTNORM_INTERNAL_ERROR, "the backward apply kernel failed (out of memory?)");
    return FASTNORM_OK;
}

FASTNORM_API fastnorm_status fastnorm_update_running_stats(const fastnorm_desc *desc, const double *mean,
                                                           const double *var, int64_t count, double momentum,
                                                           void *running_mean, void *running_var)
{
    void *fn;
    plan p;
    fastnorm_status st;
    int32_t rc;
    int slot;
    if ((st = make_plan(desc, 0, &p)) != FASTNORM_OK) return st;
    if (p.kind != FASTNORM_BATCH_NORM)
        return fail(FASTNORM_INVALID_ARGUMENT,
                    "fastnorm_update_running_stats: desc->kind=%s: running statistics are BatchNorm's",
                    kind_name(p.kind));
    REQUIRE(mean);
    REQUIRE(var);
    REQUIRE(running_mean);
    REQUIRE(running_var);
    if (count < 2)
        return fail(FASTNORM_INVALID_ARGUMENT,
                    "count=%lld must be > 1 (the unbiased variance divides by count - 1)", (long long)count);
    if (!(momentum >= 0.0 && momentum <= 1.0))
        return fail(FASTNORM_INVALID_ARGUMENT, "momentum=%g must be in [0, 1]", momentum);
    {
        buffer bufs[] = {
            {"mean", mean, p.channels * 8, 0, 8},
            {"var", var, p.channels * 8, 0, 8},
            {"running_mean", running_mean, p.nparams * p.param_itemsize, 1, p.param_itemsize},
            {"running_var", running_var, p.nparams * p.param_itemsize, 1, p.param_itemsize},
        };
        if ((st = check_buffers(bufs, 4, NULL, 0)) != FASTNORM_OK) return st;
    }
    /* the running statistics have the parameter dtype: float32 ones with 16-bit data use float32's cfunc */
    slot = p.param_itemsize == 4 ? UPDATE_RUNNING_SLOTS[0] : UPDATE_RUNNING_SLOTS[p.dtype_index];
    if ((st = ensure_kernel(slot, &fn)) != FASTNORM_OK) return st;
    rc = ((update_running_fn)fn)(running_mean, running_var, mean, var, p.channels, (double)count, momentum);
    if (rc != 1) return fail(FASTNORM_INTERNAL_ERROR, "the running statistics update failed");
    return FASTNORM_OK;
}
