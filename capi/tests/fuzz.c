/*
 * fuzz: random calls of the thirteen compute entry points of the C ABI
 * (fastnorm_forward_training, fastnorm_forward_inference, fastnorm_backward;
 * their fused forms with the residual + activation epilogue,
 * fastnorm_forward_training_fused, fastnorm_forward_inference_fused,
 * fastnorm_backward_fused; the pre-norm skip add's
 * fastnorm_skip_forward_training, fastnorm_skip_backward; the BatchNorm split
 * across processes (since 0.6): fastnorm_batch_stats, fastnorm_merge_stats,
 * fastnorm_backward_reduce, fastnorm_backward_apply,
 * fastnorm_update_running_stats) with random descriptors (struct_size and the
 * epilogue fields activation, reserved, negative_slope included), random
 * scalar arguments (count, momentum; merge_stats' num_ranks, channels and the
 * counts it reads), NULL / misaligned / aliased / overlapping buffers, plus
 * fastnorm_num_stats / fastnorm_num_params on the same descriptors.
 *
 * For every call the harness derives the acceptable statuses from the rules of
 * fastnorm.h / docs/c-api.md alone (its own model, not the library's code):
 *   - "definite": one status per rule the call violates.  If the call violates
 *     no rule it must return FASTNORM_OK; otherwise it must return the status
 *     of one of the violated rules (the docs do not fix a precedence).
 *   - "possible": statuses the docs leave open (e.g. a rule that depends on a
 *     field that is itself invalid, or float32 / 16-bit tensors whose element
 *     count times 8 -- but not times their largest element size -- overflows
 *     int64: the library bounds every buffer's byte size conservatively).
 *     Accepted, never required.
 * Invalid calls must leave the whole buffer arena (sentinel-filled outputs,
 * inputs, guard bytes) and the descriptor untouched and set a message (one
 * that names param_dtype, activation or flags when that field alone makes the
 * call FASTNORM_UNSUPPORTED).  Valid calls (small tensors, every dtype and
 * activation) must return FASTNORM_OK, write nothing outside their outputs,
 * and match a double-precision reference computed here: the norm,
 * z = norm(x) * weight + bias + residual, torch's activation formulas and
 * their derivatives (dz = dy * act'(z), ReLU's derivative 0 at z == 0, leaky
 * ReLU's the slope), the skip add h = x + skip + skip_bias, and the norm's
 * backward with dz.
 *
 * 16-bit data (FASTNORM_FLOAT16 / FASTNORM_BFLOAT16, since 0.5), with 16-bit or
 * float32 parameters (param_dtype), is generated and checked like float32
 * data (without an activation: FASTNORM_UNSUPPORTED): the harness converts
 * with its own exact bit-level code (checked at start-up on all 65,536
 * patterns and every tie), and a 16-bit output must be the float32 result
 * rounded once to nearest even (see check_values); dskip_bias is the column
 * sums of the 16-bit dx.
 *
 * The split BatchNorm passes share the descriptor rules, with their own:
 * batch_stats, backward_reduce and backward_apply take a FASTNORM_BATCH_NORM
 * descriptor (another kind: FASTNORM_INVALID_ARGUMENT) without an activation
 * (FASTNORM_INVALID_ARGUMENT) and float32 / float64 data (16-bit:
 * FASTNORM_UNSUPPORTED), never check for one value per channel, and
 * backward_apply's count must be >= this rank's N * prod(spatial);
 * update_running_stats takes a BatchNorm descriptor of any data dtype (its
 * running statistics have the parameter dtype), count >= 2 and a momentum in
 * [0, 1] (NaN is not); merge_stats takes no descriptor: num_ranks >= 1,
 * channels >= 1, counts >= 0 and not all 0 (FASTNORM_INVALID_ARGUMENT), and
 * FASTNORM_SIZE_OVERFLOW for num_ranks * channels doubles or a sum of counts
 * beyond int64.  No output of theirs may overlap another buffer, except
 * backward_apply's dx == dy and dx == x.  Their references: count,
 * per-channel mean and m2 (sum of squared deviations); the mean and biased
 * variance of the union of the ranks (ranks with count 0 get NaN moments,
 * which must not be read); sum(dy) and sum(dy * xhat); dx = rstd * w * (dy -
 * sum_dy / m - xhat * sum_dy_xhat / m); the running statistics
 * (1 - momentum) * running + momentum * batch (the variance unbiased,
 * var * count / (count - 1)), computed in float64 and rounded once to the
 * parameter dtype.
 *
 * All buffers live in one arena (so that they can alias); a call whose
 * descriptor implies buffers larger than the arena always violates some rule
 * (a NULL required pointer is forced if nothing else would stop it), so the
 * kernels never run on undersized memory.
 *
 * Usage: fuzz [--seed S] [--calls N] [--first K] [--verbose]
 *   Call i uses its own generator seeded from (S, i), so `--first K --calls 1`
 *   replays call K of a run.  Prints the seed and counts; exit 0 = no failure.
 */
#include <float.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>

#include "common.h"

#define ARENA 32768
#define GUARD 256
#define MAX_ELEMS (ARENA / 2) /* 16-bit data */
#define MAX_SLOTS 12
#define SENTINEL 0xA5
#define MAX_FAILURES 20
#define DEFAULT_SEED 20261124ull
#define DEFAULT_CALLS 240000L
#define P_VALID16 0.4 /* share of 16-bit data among the valid descriptors */

enum {
    FWD,
    INF,
    BWD,
    FWD_FUSED,
    INF_FUSED,
    BWD_FUSED,
    SKIP_FWD,
    SKIP_BWD,
    BATCH_STATS, /* the BatchNorm split across processes (since 0.6) */
    MERGE,
    BWD_REDUCE,
    BWD_APPLY,
    RUNNING,
    NENTRY
};
#define NENTRY_OLD BATCH_STATS /* the entry points before 0.6: each 1 / 10 of the calls */
/* Buffer classes: their element count and dtype. */
enum {
    DATA,  /* the size of x, desc->dtype */
    PARAM, /* fastnorm_num_params elements of desc->param_dtype (0: desc->dtype) */
    STAT,  /* fastnorm_num_stats doubles (BatchNorm: C; merge_stats: channels) */
    ONE,   /* one int64 (a count) */
    RANKS, /* num_ranks int64 (merge_stats) */
    RSTAT  /* num_ranks * channels doubles (merge_stats) */
};
#define MAX_RANKS 16 /* merge_stats: counts[r] is call.counts[r % MAX_RANKS] */
#define NSTATUS 9
#define NACTIVATION (FASTNORM_GELU_TANH + 1)
#define BIT(s) (1u << (unsigned)(s))
#define INV BIT(FASTNORM_INVALID_ARGUMENT)
#define UNSUP BIT(FASTNORM_UNSUPPORTED)
#define NUL BIT(FASTNORM_NULL_POINTER)
#define OVF BIT(FASTNORM_SIZE_OVERFLOW)
#define OVL BIT(FASTNORM_OVERLAP)
#define VMM BIT(FASTNORM_VERSION_MISMATCH)

/* What a buffer argument holds; its name and its class (element count, dtype) follow from it. */
enum {
    R_NONE, /* ends a slot list */
    /* DATA: the size of x, desc->dtype */
    R_X,
    R_DY,
    R_H,
    R_RESIDUAL,
    R_SKIP,
    R_Y,
    R_DX,
    R_DRESIDUAL,
    /* PARAM: fastnorm_num_params elements of desc->param_dtype (0: desc->dtype) */
    R_WEIGHT,
    R_BIAS,
    R_SKIP_BIAS,
    R_DWEIGHT,
    R_DBIAS,
    R_DSKIP_BIAS,
    R_RUNNING_MEAN, /* read and written (update_running_stats) */
    R_RUNNING_VAR,
    /* STAT: fastnorm_num_stats doubles */
    R_MEAN,
    R_RSTD,
    R_M2,
    R_VAR,
    R_SUM_DY,
    R_SUM_DY_XHAT,
    /* ONE: an int64 */
    R_COUNT,
    /* RANKS: num_ranks int64 */
    R_COUNTS,
    /* RSTAT: num_ranks * channels doubles */
    R_MEANS,
    R_M2S,
    NROLE
};
/* clang-format off */
static const char *ROLE_NAME[NROLE] = {
    "-", "x", "dy", "h", "residual", "skip", "y", "dx", "dresidual", "weight", "bias", "skip_bias", "dweight",
    "dbias", "dskip_bias", "running_mean", "running_var", "mean", "rstd", "m2", "var", "sum_dy", "sum_dy_xhat",
    "count", "counts", "means", "m2s"};
/* clang-format on */
static int role_class(int role)
{
    return role >= R_MEANS ? RSTAT
        : role >= R_COUNTS ? RANKS
        : role >= R_COUNT  ? ONE
        : role >= R_MEAN   ? STAT
        : role >= R_WEIGHT ? PARAM
                           : DATA;
}

typedef struct slot_info {
    int role;
    int output;
    int required;
} slot_info;

typedef struct entry_info {
    const char *name;
    int training;              /* statistics of a training batch (one value per channel is rejected) */
    int no_activation;         /* refuses desc->activation (fastnorm_backward, the split passes) */
    unsigned kinds;            /* the kinds it takes (kind_bit; 0: every kind; others: INVALID_ARGUMENT) */
    int no16;                  /* 16-bit data is FASTNORM_UNSUPPORTED (the split passes) */
    slot_info slot[MAX_SLOTS]; /* buffer arguments in the order of fastnorm.h, up to R_NONE */
} entry_info;

static unsigned kind_bit(int32_t kind)
{
    return kind >= FASTNORM_BATCH_NORM && kind <= FASTNORM_RMS_NORM ? 1u << kind : 0u;
}
#define BN_ONLY (1u << FASTNORM_BATCH_NORM)
#define LNRMS_ONLY ((1u << FASTNORM_LAYER_NORM) | (1u << FASTNORM_RMS_NORM))

/* clang-format off */
#define IN(role) {role, 0, 1}
#define IN_OPT(role) {role, 0, 0}  /* NULL: absent */
#define OUT(role) {role, 1, 1}
#define OUT_OPT(role) {role, 1, 0} /* NULL: not wanted */

static const entry_info ENTRY[NENTRY] = {
    /* name, training, no_activation, kinds, no16, the buffer arguments */
    {"forward_training", 1, 0, 0, 0,
     {IN(R_X), IN_OPT(R_WEIGHT), IN_OPT(R_BIAS), OUT(R_Y), OUT(R_MEAN), OUT(R_RSTD)}},
    {"forward_inference", 0, 0, 0, 0,
     {IN(R_X), IN_OPT(R_WEIGHT), IN_OPT(R_BIAS), IN(R_MEAN), IN(R_RSTD), OUT(R_Y)}},
    {"backward", 1, 1, 0, 0,
     {IN(R_DY), IN(R_X), IN_OPT(R_WEIGHT), IN(R_MEAN), IN(R_RSTD), OUT(R_DX), OUT_OPT(R_DWEIGHT),
      OUT_OPT(R_DBIAS)}},
    {"forward_training_fused", 1, 0, 0, 0,
     {IN(R_X), IN_OPT(R_RESIDUAL), IN_OPT(R_WEIGHT), IN_OPT(R_BIAS), OUT(R_Y), OUT(R_MEAN), OUT(R_RSTD)}},
    {"forward_inference_fused", 0, 0, 0, 0,
     {IN(R_X), IN_OPT(R_RESIDUAL), IN_OPT(R_WEIGHT), IN_OPT(R_BIAS), IN(R_MEAN), IN(R_RSTD), OUT(R_Y)}},
    {"backward_fused", 1, 0, 0, 0,
     {IN(R_DY), IN(R_X), IN_OPT(R_RESIDUAL), IN_OPT(R_WEIGHT), IN_OPT(R_BIAS), IN(R_MEAN), IN(R_RSTD),
      OUT(R_DX), OUT_OPT(R_DRESIDUAL), OUT_OPT(R_DWEIGHT), OUT_OPT(R_DBIAS)}},
    {"skip_forward_training", 1, 0, LNRMS_ONLY, 0,
     {IN(R_X), IN(R_SKIP), IN_OPT(R_SKIP_BIAS), IN_OPT(R_WEIGHT), IN_OPT(R_BIAS), OUT(R_H), OUT(R_Y),
      OUT(R_MEAN), OUT(R_RSTD)}},
    {"skip_backward", 1, 0, LNRMS_ONLY, 0,
     {IN(R_DY), IN(R_H), IN_OPT(R_WEIGHT), IN_OPT(R_BIAS), IN(R_MEAN), IN(R_RSTD), OUT(R_DX),
      OUT_OPT(R_DWEIGHT), OUT_OPT(R_DBIAS), OUT_OPT(R_DSKIP_BIAS)}},
    /* the split passes: this rank's samples, no one-value-per-channel check (training 0); the count
       argument is an output of batch_stats and merge_stats */
    {"batch_stats", 0, 1, BN_ONLY, 1,
     {IN(R_X), OUT(R_COUNT), OUT(R_MEAN), OUT(R_M2)}},
    {"merge_stats", 0, 0, 0, 0, /* no descriptor: see run_model_merge */
     {IN(R_COUNTS), IN(R_MEANS), IN(R_M2S), OUT(R_COUNT), OUT(R_MEAN), OUT(R_VAR)}},
    {"backward_reduce", 0, 1, BN_ONLY, 1,
     {IN(R_DY), IN(R_X), IN(R_MEAN), IN(R_RSTD), OUT(R_SUM_DY), OUT(R_SUM_DY_XHAT)}},
    {"backward_apply", 0, 1, BN_ONLY, 1,
     {IN(R_DY), IN(R_X), IN_OPT(R_WEIGHT), IN(R_MEAN), IN(R_RSTD), IN(R_SUM_DY), IN(R_SUM_DY_XHAT),
      OUT(R_DX)}},
    {"update_running_stats", 0, 0, BN_ONLY, 0, /* running_mean / running_var: read and written */
     {IN(R_MEAN), IN(R_VAR), OUT(R_RUNNING_MEAN), OUT(R_RUNNING_VAR)}},
};
/* clang-format on */
#define SLOT(e, i) (ENTRY[(e)].slot[(i)])

static int nslots(int e)
{
    int n = 0;
    while (n < MAX_SLOTS && SLOT(e, n).role != R_NONE) ++n;
    return n;
}

/* Slot of a role in entry point e, -1 if e has no such argument. */
static int slot_of(int e, int role)
{
    int i;
    for (i = 0; i < nslots(e); ++i)
        if (SLOT(e, i).role == role) return i;
    return -1;
}

/* The documented exact aliases (docs/c-api.md, "Ownership and aliasing"): y == x (every forward),
   y == residual (fused forward), y == skip and h == x, h == skip (skip forward; never y == h),
   dx == dy, dx == x (backward, backward_apply), dx == h (skip backward), dresidual == dy (fused
   backward).  None for the other split passes. */
static int allowed_alias(int out_role, int in_role)
{
    switch (out_role) {
    case R_Y: return in_role == R_X || in_role == R_RESIDUAL || in_role == R_SKIP;
    case R_H: return in_role == R_X || in_role == R_SKIP;
    case R_DX: return in_role == R_DY || in_role == R_X || in_role == R_H;
    case R_DRESIDUAL: return in_role == R_DY;
    default: return 0;
    }
}

/* May the output in slot o of entry e be exactly the buffer in slot b? */
static int alias_ok(int e, int o, int b)
{
    return !SLOT(e, b).output && allowed_alias(SLOT(e, o).role, SLOT(e, b).role);
}

/* ------------------------------------------------------------------------ */
/* Random numbers (splitmix64)                                               */
/* ------------------------------------------------------------------------ */

typedef struct rng {
    uint64_t s;
} rng;

static uint64_t next_u64(rng *r)
{
    uint64_t z = (r->s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static int64_t below(rng *r, int64_t n) { return (int64_t)(next_u64(r) % (uint64_t)n); }
static double uniform(rng *r) { return (double)(next_u64(r) >> 11) * (1.0 / 9007199254740992.0); }
static int chance(rng *r, double p) { return uniform(r) < p; }
static double between(rng *r, double lo, double hi) { return lo + (hi - lo) * uniform(r); }

#define PICK(r, pool) ((pool)[below((r), (int64_t)(sizeof(pool) / sizeof((pool)[0])))])

static const int32_t KIND_POOL[] = {0, 1, 2, 3, 4, 5, 6, 7, -1, 100, INT32_MAX, INT32_MIN};
static const int32_t DTYPE_POOL[] = {0, 1, 2, 3, 4, 5, -1, 99, INT32_MAX, INT32_MIN};
static const int32_t PDTYPE_POOL[] = {0, 0, 1, 2, 3, 4, 5, -7, 1000, INT32_MIN};
static const int32_t LAYOUT_POOL[] = {0, 1, 2, -1, 7, INT32_MAX, INT32_MIN};
static const int32_t ACTIVATION_POOL[] = {0, 1, 2, 3, 4, 5, 6, 7, 8, -1, 100, INT32_MAX, INT32_MIN};
static const int32_t RANK_POOL[] = {-5, -1, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 16, 100, INT32_MAX, INT32_MIN};
static const int32_t NDIM_POOL[] = {-1, 0, 1, 2, 3, 4, 5, 7, 8, 9, 100, INT32_MAX, INT32_MIN};
/* clang-format off */
static const int64_t DIM_POOL[] = {0, 1, 2, 3, 4, 5, 7, -1, -2, INT64_MIN, INT64_MAX, INT64_MAX - 1,
                                   (int64_t)1 << 31, ((int64_t)1 << 32) + 1, (int64_t)1 << 40,
                                   3037000499LL, 3037000500LL, (int64_t)1 << 60, ((int64_t)1 << 60) + 1,
                                   (int64_t)1 << 61, (int64_t)1 << 62};
static const int64_t GROUP_POOL[] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 12, -1, -4, INT64_MAX, INT64_MIN,
                                     (int64_t)1 << 40};
/* clang-format on */
/* fastnorm_desc of the 0.2 header: up to and including flags */
#define DESC_SIZE_0_2 (offsetof(fastnorm_desc, flags) + sizeof(uint64_t))
static const size_t STRUCT_SIZE_POOL[] = {0,
                                          1,
                                          DESC_SIZE_0_2,
                                          DESC_SIZE_0_2 + 4,
                                          sizeof(size_t),
                                          sizeof(fastnorm_desc) / 2,
                                          sizeof(fastnorm_desc) - 8,
                                          sizeof(fastnorm_desc) - 1,
                                          sizeof(fastnorm_desc) + 1,
                                          sizeof(fastnorm_desc) + 8,
                                          2 * sizeof(fastnorm_desc),
                                          (size_t)1 << 31,
                                          (size_t)-1};
static const double EPS_VALID[] = {1e-5, 1e-3, 0.1, 1.0, FLT_EPSILON, DBL_EPSILON, 0.0, -0.0, 1e-12};
/* leaky ReLU slopes: any finite value is valid (torch's default 0.01) */
static const double SLOPE_VALID[] = {0.01, 0.2, 0.0, -0.0, 1.0, -0.5, 3.0, 1e-3};

/* count arguments (backward_apply: >= N * prod(spatial); update_running_stats: >= 2), momenta (in
   [0, 1]), merge_stats' num_ranks / channels (>= 1) and counts (>= 0, not all 0, sum in int64) */
/* clang-format off */
static const int64_t COUNT_POOL[] = {0, 1, 2, 3, -1, -2, 1000, INT64_MIN, INT64_MAX, INT64_MAX - 1,
                                     (int64_t)1 << 53, ((int64_t)1 << 53) + 1, (int64_t)1 << 62};
/* clang-format on */
static const double MOMENTUM_VALID[] = {0.1, 0.01, 0.5, 1.0, 0.0, -0.0, 1.0 / 3.0, 0.999, DBL_MIN};
static const int64_t RANKS_POOL[] = {
    0, 1, 2, 3, 5, 8, 17, -1, INT64_MIN, INT64_MAX, (int64_t)1 << 32, (int64_t)1 << 60, 4096, 4097};
static const int64_t RANK_COUNT_POOL[] = {
    0, 0, 1, 2, 7, 100, -1, INT64_MIN, INT64_MAX, INT64_MAX / 2 + 1, (int64_t)1 << 62, (int64_t)1 << 40};

static double bad_or_odd_momentum(rng *r)
{
    switch (below(r, 12)) {
    case 0: return NAN;
    case 1: return -NAN;
    case 2: return INFINITY;
    case 3: return -INFINITY;
    case 4: return 1.0000000000000002; /* the next double after 1 */
    case 5: return -DBL_MIN;
    case 6: return 2.0;
    case 7: return -0.5;
    case 8: return 4.9406564584124654e-324;
    default: return PICK(r, MOMENTUM_VALID);
    }
}

static double bad_or_odd_eps(rng *r)
{
    switch (below(r, 14)) {
    case 0: return -1e-5;
    case 1: return -0.0;
    case 2: return NAN;
    case 3: return -NAN;
    case 4: return INFINITY;
    case 5: return -INFINITY;
    case 6: return DBL_MAX;
    case 7: return DBL_MIN;
    case 8: return 4.9406564584124654e-324; /* smallest denormal */
    case 9: return -DBL_MIN;
    case 10: return 0.0;
    case 11: return 1e300;
    case 12: return -DBL_MAX;
    default: return PICK(r, EPS_VALID);
    }
}

/* ------------------------------------------------------------------------ */
/* Calls and the model of the documented rules                               */
/* ------------------------------------------------------------------------ */

typedef struct call {
    int entry;
    int desc_null;
    fastnorm_desc d;
    int64_t off[MAX_SLOTS]; /* offset of each buffer in the arena, -1 = NULL */
    int64_t count;          /* backward_apply, update_running_stats */
    double momentum;        /* update_running_stats */
    /* merge_stats: num_ranks, channels, and the counts it reads (counts[r % MAX_RANKS], written into
       the arena by write_counts just before the call) */
    int64_t ranks, channels, counts[MAX_RANKS];
    char what[512]; /* how the call was made (for failure messages) */
} call;

typedef struct model {
    unsigned definite, possible;
    int geom_ok, backed;
    int kind, layout;
    int32_t dtype, pdtype;       /* of the data, of the parameters (0: unknown) */
    int64_t itemsize, pitemsize; /* their bytes per element (0: unknown) */
    int64_t size, nparams, nstats, N, C, S, G, K;
    int64_t R, total; /* merge_stats: num_ranks, the sum of the counts */
    int64_t bytes[MAX_SLOTS];
    /* the field of the one rule making the call FASTNORM_UNSUPPORTED (param_dtype, activation, flags;
       NULL if none, several, or UNSUPPORTED is only possible): its message names it */
    const char *unsup_field;
} model;

static void note(call *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void note(call *c, const char *fmt, ...)
{
    size_t used = strlen(c->what);
    va_list args;
    if (used + 2 >= sizeof c->what) return;
    if (used) c->what[used++] = ' ', c->what[used] = '\0';
    va_start(args, fmt);
    vsnprintf(c->what + used, sizeof c->what - used, fmt, args);
    va_end(args);
}

/* Product of v[0..n) (all >= 1), saturated: *over = 1 if it exceeds INT64_MAX. */
static int64_t product(const int64_t *v, int n, int *over)
{
    int64_t p = 1;
    int i;
    *over = 0;
    for (i = 0; i < n; ++i) {
        if (v[i] > INT64_MAX / p) {
            *over = 1;
            return INT64_MAX;
        }
        p *= v[i];
    }
    return p;
}

/* Bytes per element of a fastnorm_dtype, 0 if it is not one. */
static int64_t dtype_itemsize(int32_t dtype)
{
    switch (dtype) {
    case FASTNORM_FLOAT32: return 4;
    case FASTNORM_FLOAT64: return 8;
    case FASTNORM_FLOAT16:
    case FASTNORM_BFLOAT16: return 2;
    default: return 0;
    }
}

static int is16(int32_t dtype) { return dtype == FASTNORM_FLOAT16 || dtype == FASTNORM_BFLOAT16; }

static int ranges_overlap(int64_t a, int64_t abytes, int64_t b, int64_t bbytes)
{
    uint64_t a0 = (uint64_t)a, b0 = (uint64_t)b;
    return a0 < b0 + (uint64_t)bbytes && b0 < a0 + (uint64_t)abytes;
}

/* Bytes a buffer of class cls must be aligned to: its element size (0: unknown). */
static int64_t class_align(const model *m, int cls)
{
    return cls == DATA ? m->itemsize : cls == PARAM ? m->pitemsize : 8;
}

/* Bytes of a buffer of class cls (parameters of an unknown dtype: the data's element size). */
static int64_t class_bytes(const model *m, int cls)
{
    switch (cls) {
    case DATA: return m->size * m->itemsize;
    case PARAM: return m->nparams * (m->pitemsize ? m->pitemsize : m->itemsize);
    case STAT: return m->nstats * 8;
    case ONE: return 8;
    case RANKS: return m->R * 8;
    default: return m->R * m->C * 8;
    }
}

/* merge_stats' counts[r], as written into the arena */
static int64_t count_of(const call *c, int64_t r) { return c->counts[r % MAX_RANKS]; }

/*
 * The rules of fastnorm_merge_stats (fastnorm.h): every pointer required, every buffer of 8-byte
 * elements, num_ranks and channels >= 1, num_ranks * channels doubles within int64 bytes
 * (FASTNORM_SIZE_OVERFLOW), outputs overlapping nothing, and the counts it reads: >= 0, not all 0
 * (FASTNORM_INVALID_ARGUMENT), their sum within int64 (FASTNORM_SIZE_OVERFLOW).  The counts are those
 * of the call (write_counts puts them into the arena); unknown when the counts buffer does not fit in
 * the arena (then nothing is "backed").
 */
static void run_model_merge(const call *c, model *m)
{
    int e = c->entry, ns = nslots(e), i, o, b, cslot = slot_of(e, R_COUNTS);
    unsigned def = 0, pos = 0;
    int64_t R = c->ranks, C = c->channels, r;
    memset(m, 0, sizeof *m);
    for (i = 0; i < ns; ++i) {
        if (c->off[i] < 0) def |= NUL;
        else if (c->off[i] % 8 != 0) def |= INV;
    }
    if (R < 1 || C < 1) {
        def |= INV;
    } else if (R > INT64_MAX / 8 / C) {
        def |= OVF; /* num_ranks * channels doubles */
    } else {
        m->R = R;
        m->C = m->nstats = C;
        m->geom_ok = m->backed = 1;
        for (i = 0; i < ns; ++i) {
            m->bytes[i] = class_bytes(m, role_class(SLOT(e, i).role));
            if (c->off[i] >= 0 && m->bytes[i] > ARENA - c->off[i]) m->backed = 0;
        }
        for (o = 0; o < ns; ++o) {
            if (!SLOT(e, o).output || c->off[o] < 0) continue;
            for (b = 0; b < ns; ++b)
                if (b != o && c->off[b] >= 0
                    && ranges_overlap(c->off[o], m->bytes[o], c->off[b], m->bytes[b]))
                    def |= OVL;
        }
        if (c->off[cslot] >= 0 && m->bytes[cslot] <= ARENA - c->off[cslot]) {
            int neg = 0, over = 0;
            int64_t total = 0;
            for (r = 0; r < R; ++r) {
                int64_t n = count_of(c, r);
                if (n < 0) neg = 1;
                else if (n > INT64_MAX - total) over = 1;
                else total += n;
            }
            if (neg) def |= INV;
            if (over) *(neg ? &pos : &def) |= OVF; /* "the sum of counts": with a negative one, open */
            if (!neg && !over && total == 0) def |= INV;
            m->total = total;
        } else if (c->off[cslot] >= 0) {
            pos |= INV | OVF; /* counts beyond the arena: not known here */
        }
    }
    if (!m->geom_ok) /* buffer sizes unknown */
        for (o = 0; o < ns; ++o) {
            if (!SLOT(e, o).output || c->off[o] < 0) continue;
            for (b = 0; b < ns; ++b)
                if (b != o && c->off[b] == c->off[o]) pos |= OVL;
        }
    m->definite = def;
    m->possible = pos & ~def;
}

/*
 * The rules of docs/c-api.md, checked independently.  desc_only: the rules of
 * fastnorm_num_stats / fastnorm_num_params (descriptor only, not training;
 * count_null: their count pointer is NULL).
 */
static void run_model(const call *c, int desc_only, int count_null, model *m)
{
    const fastnorm_desc *d = &c->d;
    int e = c->entry, ns = nslots(e), i, o, b;
    int training = !desc_only && ENTRY[e].training;
    int no_data = !desc_only && slot_of(e, R_X) < 0 && slot_of(e, R_H) < 0 && slot_of(e, R_DY) < 0;
    int kind_ok, lnlike, layout_ok, rank_ok = 0, dims_ok = 0;
    int32_t pd = d->param_dtype == FASTNORM_DTYPE_DEFAULT ? d->dtype : d->param_dtype;
    int64_t maxitem;
    unsigned def = 0, pos = 0, *overlap;
    int n_unsup = 0;

    if (e == MERGE && !desc_only) {
        run_model_merge(c, m);
        return;
    }
    memset(m, 0, sizeof *m);
    if (desc_only) {
        if (count_null) def |= NUL;
    } else {
        for (i = 0; i < ns; ++i)
            if (SLOT(e, i).required && c->off[i] < 0) def |= NUL;
        /* update_running_stats: "count < 2, momentum outside [0, 1]" (NaN is not inside) */
        if (e == RUNNING && c->count < 2) def |= INV;
        if (e == RUNNING && !(c->momentum >= 0.0 && c->momentum <= 1.0)) def |= INV;
        /* backward_apply: the count rule needs the descriptor's N * prod(spatial) */
        if (e == BWD_APPLY && c->desc_null) pos |= INV;
    }
    if (c->desc_null) {
        def |= NUL;
        /* Element sizes are unknown without a descriptor. */
        if (!desc_only)
            for (i = 0; i < ns; ++i)
                if (c->off[i] >= 0 && c->off[i] % 8 != 0) pos |= INV;
        m->definite = def;
        m->possible = pos;
        return;
    }
    /* The library knows two descriptor sizes, 0.2's and 0.3's (also 0.4's): others are invalid, larger
       ones a newer header's.  A 0.2 descriptor's epilogue fields are not read (they get their defaults). */
    if (d->struct_size != sizeof(fastnorm_desc) && d->struct_size != DESC_SIZE_0_2)
        def |= d->struct_size < sizeof(fastnorm_desc) ? INV : VMM;
    else if (d->struct_size == sizeof(fastnorm_desc)) {
        int act_ok = d->activation >= FASTNORM_ACTIVATION_NONE && d->activation <= FASTNORM_GELU_TANH;
        /* negative_slope must be finite whatever the activation (fastnorm.h: "a non-finite
           desc->negative_slope" is FASTNORM_INVALID_ARGUMENT; "ignored" by the others' results) */
        if (!act_ok || d->reserved != 0 || !isfinite(d->negative_slope)) def |= INV;
        /* fastnorm_backward refuses an activation (its backward is fastnorm_backward_fused) */
        if (act_ok && d->activation != FASTNORM_ACTIVATION_NONE && !desc_only && ENTRY[e].no_activation)
            def |= INV;
    }
    kind_ok = d->kind >= FASTNORM_BATCH_NORM && d->kind <= FASTNORM_RMS_NORM;
    lnlike = d->kind == FASTNORM_LAYER_NORM || d->kind == FASTNORM_RMS_NORM;
    if (!kind_ok) def |= INV;
    /* the skip add (LayerNorm / RMSNorm), the split passes (BatchNorm): "FASTNORM_INVALID_ARGUMENT for a
       descriptor of another kind" */
    if (kind_ok && !desc_only && ENTRY[e].kinds && !(ENTRY[e].kinds & kind_bit(d->kind))) def |= INV;
    /* data: float32, float64, float16, bfloat16 (the 16-bit ones since 0.5) */
    m->itemsize = dtype_itemsize(d->dtype);
    if (m->itemsize) m->dtype = d->dtype;
    else def |= INV;
    /* parameters: the data dtype, or float32 with 16-bit data; another fastnorm_dtype is mixed */
    if (d->param_dtype != FASTNORM_DTYPE_DEFAULT && d->param_dtype != d->dtype) {
        if (!dtype_itemsize(d->param_dtype)) def |= INV; /* unknown enum value */
        else if (!m->itemsize) pos |= UNSUP;             /* "different" from an unknown dtype */
        else if (!(is16(d->dtype) && d->param_dtype == FASTNORM_FLOAT32)) { /* mixed */ def |= UNSUP;
            m->unsup_field = "param_dtype";
            ++n_unsup;
        }
    }
    if (m->itemsize && dtype_itemsize(pd)) {
        m->pdtype = pd;
        m->pitemsize = dtype_itemsize(pd);
    }
    maxitem = m->pitemsize > m->itemsize ? m->pitemsize : m->itemsize;
    /* "an activation with 16-bit data" (not read from a 0.2 descriptor; an unknown value is invalid
       anyway, and may be called unsupported too) */
    if (is16(d->dtype) && d->struct_size == sizeof(fastnorm_desc)
        && d->activation != FASTNORM_ACTIVATION_NONE) {
        if (d->activation > FASTNORM_ACTIVATION_NONE && d->activation <= FASTNORM_GELU_TANH) {
            def |= UNSUP;
            m->unsup_field = "activation";
            ++n_unsup;
        } else {
            pos |= UNSUP;
        }
    }
    /* the split passes: "float32 and float64 data (16-bit data: FASTNORM_UNSUPPORTED)"; the message
       need not name a field */
    if (!desc_only && ENTRY[e].no16 && is16(d->dtype)) {
        def |= UNSUP;
        ++n_unsup;
    }
    layout_ok = d->layout == FASTNORM_CHANNELS_FIRST || d->layout == FASTNORM_CHANNELS_LAST;
    if (!layout_ok) def |= INV;
    if (d->flags != 0) {
        def |= UNSUP;
        m->unsup_field = "flags";
        ++n_unsup;
    }
    if (!isfinite(d->eps) || d->eps < 0.0) def |= INV;
    if (kind_ok) {
        if (lnlike) {
            rank_ok = d->rank >= 1 && d->rank <= FASTNORM_MAX_RANK;
            if (!rank_ok || d->normalized_ndim < 1 || d->normalized_ndim > d->rank) def |= INV;
            if (d->layout != FASTNORM_CHANNELS_FIRST) def |= INV;
            if (d->num_groups != 0) def |= INV;
        } else {
            rank_ok = d->rank >= 2 && d->rank <= 5;
            if (!rank_ok) def |= INV;
            if (d->normalized_ndim != 0) def |= INV;
            if (d->kind == FASTNORM_GROUP_NORM ? d->num_groups < 1 : d->num_groups != 0) def |= INV;
        }
    }
    if (d->rank >= 1 && d->rank <= FASTNORM_MAX_RANK) {
        int any_bad = 0, over = 0;
        int64_t prod;
        for (i = 0; i < d->rank; ++i)
            if (d->dims[i] < 1) any_bad = 1;
        if (any_bad) {
            /* product of the positive dims, for the "possible" overflow status */
            int64_t p = 1;
            for (i = 0; i < d->rank && !over; ++i) {
                if (d->dims[i] < 1) continue;
                if (d->dims[i] > INT64_MAX / p) over = 1;
                else p *= d->dims[i];
            }
            if (kind_ok && rank_ok) def |= INV;
            if (over || p > INT64_MAX / 8) pos |= OVF;
        } else {
            int over8, over_item;
            prod = product(d->dims, d->rank, &over);
            over8 = over || prod > INT64_MAX / 8;
            /* the largest element: 16-bit data may have float32 parameters (nparams <= size) */
            over_item = over || (m->itemsize ? prod > INT64_MAX / maxitem : over8);
            if (kind_ok && rank_ok && m->itemsize) {
                if (over_item) def |= OVF; /* a data buffer's byte size overflows */
                /* float32 / 16-bit: only count * 8 overflows.  Without a data buffer
                   (update_running_stats) such a call is otherwise valid: the status table's rule ("the
                   element count implied by dims, times 8 bytes, does not fit in int64") decides. */
                else if (over8) *(no_data ? &def : &pos) |= OVF;
                dims_ok = !over_item;
            } else if (over8) {
                pos |= OVF;
            }
            m->size = prod;
        }
    }
    m->kind = d->kind;
    m->layout = d->layout;
    if (dims_ok) {
        const int64_t *dm = d->dims;
        int r = d->rank, over = 0;
        if (lnlike) {
            if (d->normalized_ndim >= 1 && d->normalized_ndim <= r) {
                m->N = product(dm, r - d->normalized_ndim, &over);
                m->K = product(dm + r - d->normalized_ndim, d->normalized_ndim, &over);
                m->C = 1;
                m->S = m->K;
                m->nparams = m->K;
                m->nstats = m->N;
                m->geom_ok = 1;
            }
        } else if (layout_ok) {
            m->N = dm[0];
            m->C = d->layout == FASTNORM_CHANNELS_LAST ? dm[r - 1] : dm[1];
            m->S = m->size / (m->N * m->C);
            m->nparams = m->C;
            if (d->kind == FASTNORM_BATCH_NORM) {
                m->G = m->C;
                m->nstats = m->C;
                m->geom_ok = 1;
            } else if (d->kind == FASTNORM_INSTANCE_NORM) {
                m->G = m->C;
                m->nstats = m->N * m->C;
                m->geom_ok = 1;
            } else if (d->num_groups >= 1) {
                if (m->C % d->num_groups != 0) {
                    def |= INV;
                } else {
                    m->G = d->num_groups;
                    m->nstats = m->N * m->G;
                    m->geom_ok = 1;
                }
            }
            if (training && d->kind == FASTNORM_BATCH_NORM && m->N * m->S == 1) def |= INV;
            if (training && d->kind == FASTNORM_INSTANCE_NORM && m->S == 1) def |= INV;
        }
        if (m->geom_ok && m->nstats > INT64_MAX / 8) {
            def |= OVF; /* mean / rstd byte size */
            m->geom_ok = 0;
        }
    }
    /* backward_apply: "a count below this rank's" N * prod(spatial) is FASTNORM_INVALID_ARGUMENT */
    if (!desc_only && e == BWD_APPLY) {
        if (m->geom_ok && d->kind == FASTNORM_BATCH_NORM) {
            if (c->count < m->N * m->S) def |= INV;
        } else {
            pos |= INV;
        }
    }
    if (!desc_only) {
        for (i = 0; i < ns; ++i) {
            int64_t align = class_align(m, role_class(SLOT(e, i).role));
            if (c->off[i] < 0) continue;
            if (align) {
                if (c->off[i] % align != 0) def |= INV;
            } else if (c->off[i] % 8 != 0) {
                pos |= INV; /* element size unknown */
            }
        }
        /* The skip add's buffer sizes are those of a LayerNorm / RMSNorm descriptor, the split passes'
           those of a BatchNorm one: with another kind (rejected anyway) an overlap is only possible. */
        overlap = ENTRY[e].kinds && !(ENTRY[e].kinds & kind_bit(d->kind)) ? &pos : &def;
        if (m->geom_ok) {
            m->backed = 1;
            for (i = 0; i < ns; ++i) {
                m->bytes[i] = class_bytes(m, role_class(SLOT(e, i).role));
                if (c->off[i] >= 0 && m->bytes[i] > ARENA - c->off[i]) m->backed = 0;
            }
            for (o = 0; o < ns; ++o) {
                if (!SLOT(e, o).output || c->off[o] < 0) continue;
                for (b = 0; b < ns; ++b) {
                    if (b == o || c->off[b] < 0) continue;
                    if (!ranges_overlap(c->off[o], m->bytes[o], c->off[b], m->bytes[b])) continue;
                    if (alias_ok(e, o, b) && c->off[o] == c->off[b]) continue;
                    *overlap |= OVL;
                }
            }
        } else {
            for (o = 0; o < ns; ++o) {
                if (!SLOT(e, o).output || c->off[o] < 0) continue;
                for (b = 0; b < ns; ++b)
                    if (b != o && c->off[b] == c->off[o] && !alias_ok(e, o, b)) pos |= OVL;
            }
        }
    }
    m->definite = def;
    m->possible = pos & ~def;
    if (n_unsup != 1 || (pos & UNSUP)) m->unsup_field = NULL;
}

/* ------------------------------------------------------------------------ */
/* Generating calls                                                          */
/* ------------------------------------------------------------------------ */

static void cap_elements(fastnorm_desc *d, int keep, int64_t cap)
{
    int over, i, big;
    while (product(d->dims, d->rank, &over) > cap) {
        big = -1;
        for (i = 0; i < d->rank; ++i)
            if (i != keep && d->dims[i] > 1 && (big < 0 || d->dims[i] > d->dims[big])) big = i;
        if (big < 0) return;
        --d->dims[big];
    }
}

/* A small valid descriptor for entry point e (for the skip add and the split passes, one time in ten
   a descriptor valid for the other entry points, whose kind alone breaks its LayerNorm / RMSNorm or
   BatchNorm rule; for the split passes but update_running_stats, one time in ten 16-bit data). */
static void gen_valid_desc(rng *r, int e, fastnorm_desc *d)
{
    int i, kind = 1 + (int)below(r, 5);
    if (ENTRY[e].kinds == LNRMS_ONLY && !chance(r, 0.1)) kind = FASTNORM_LAYER_NORM + (int)below(r, 2);
    if (ENTRY[e].kinds == BN_ONLY && !chance(r, 0.1)) kind = FASTNORM_BATCH_NORM;
    memset(d, 0, sizeof *d);
    d->struct_size = sizeof *d;
    d->kind = kind;
    /* float32 or float64 data (parameters of the same dtype) or, 40 % of the valid calls, 16-bit data
       with 16-bit (param_dtype 0 or the dtype) or float32 parameters */
    if (chance(r, ENTRY[e].no16 ? 0.1 : P_VALID16)) {
        d->dtype = chance(r, 0.5) ? FASTNORM_FLOAT16 : FASTNORM_BFLOAT16;
        d->param_dtype = (int32_t)below(r, 3);
        if (d->param_dtype == 2) d->param_dtype = d->dtype;
    } else {
        d->dtype = 1 + (int)below(r, 2);
        d->param_dtype = chance(r, 0.5) ? 0 : d->dtype;
    }
    d->eps = PICK(r, EPS_VALID);
    if (kind <= FASTNORM_GROUP_NORM) {
        int rank = 2 + (int)below(r, 4), cidx;
        int64_t s = 1, c;
        d->rank = rank;
        d->layout = (int)below(r, 2);
        for (i = 0; i < rank; ++i) d->dims[i] = 1 + below(r, 4);
        d->dims[0] = 1 + below(r, 3);
        cidx = d->layout ? rank - 1 : 1;
        d->dims[cidx] = 1 + below(r, 6);
        cap_elements(d, cidx, 256);
        c = d->dims[cidx];
        if (kind == FASTNORM_GROUP_NORM) {
            int64_t divisors[6], n = 0, g;
            for (g = 1; g <= c; ++g)
                if (c % g == 0) divisors[n++] = g;
            d->num_groups = divisors[below(r, n)];
        }
        for (i = 1; i < rank; ++i)
            if (i != cidx) s *= d->dims[i];
        if (ENTRY[e].training && kind == FASTNORM_BATCH_NORM && d->dims[0] * s == 1) d->dims[0] = 2;
        if (ENTRY[e].training && kind == FASTNORM_INSTANCE_NORM && s == 1) {
            if (rank == 2) {
                d->rank = 3;
                if (d->layout) {
                    d->dims[2] = c;
                    d->dims[1] = 2;
                } else {
                    d->dims[2] = 2;
                }
            } else {
                d->dims[d->layout ? 1 : 2] = 2;
            }
        }
    } else {
        d->rank = 1 + (int)below(r, 8);
        for (i = 0; i < d->rank; ++i) d->dims[i] = chance(r, 0.4) ? 1 : 1 + below(r, 4);
        cap_elements(d, -1, 256);
        d->normalized_ndim = 1 + (int)below(r, d->rank);
    }
    /* every forward applies the activation; fastnorm_backward refuses one, and 16-bit data has none
       (FASTNORM_UNSUPPORTED: the mutations of dtype and activation make such calls) */
    d->activation = ENTRY[e].no_activation || is16(d->dtype) || chance(r, 0.2)
        ? FASTNORM_ACTIVATION_NONE
        : (int32_t)below(r, NACTIVATION);
    d->negative_slope = PICK(r, SLOPE_VALID);
}

/* Output slot placed exactly on slot b by alias[] (-1: none). */
static int output_on(const int *alias, int ns, int b)
{
    int o;
    for (o = 0; o < ns; ++o)
        if (alias[o] == b) return o;
    return -1;
}

/* Place the buffers of a valid call: disjoint, aligned, inside the arena,
   some optional ones NULL, some documented exact aliases. */
static void place_valid(rng *r, call *c)
{
    int e = c->entry, ns = nslots(e), i, j, alias[MAX_SLOTS], order[MAX_SLOTS], n = 0;
    int pair[MAX_SLOTS * MAX_SLOTS][2], npair = 0;
    int64_t cursor, last_end = 0;
    model m;
    for (i = 0; i < ns; ++i) {
        c->off[i] = 0;
        alias[i] = -1;
    }
    run_model(c, 0, 0, &m);
    for (i = 0; i < ns; ++i)
        if (!SLOT(e, i).required && chance(r, 0.25)) c->off[i] = -1;
    /* an output on one of its allowed inputs (never two outputs on the same input) */
    for (i = 0; i < ns; ++i) {
        int cand[MAX_SLOTS], nc = 0;
        if (!SLOT(e, i).output || c->off[i] < 0 || !chance(r, 0.3)) continue;
        for (j = 0; j < ns; ++j)
            if (c->off[j] >= 0 && alias_ok(e, i, j) && output_on(alias, ns, j) < 0) cand[nc++] = j;
        if (nc == 0) continue;
        alias[i] = cand[below(r, nc)];
        note(c, "%s==%s", ROLE_NAME[SLOT(e, i).role], ROLE_NAME[SLOT(e, alias[i]).role]);
    }
    /* two inputs of the same class sharing memory (read only: allowed), unless an output on one of
       them would then be on an input it may not alias */
    for (i = 0; i < ns; ++i)
        for (j = i + 1; j < ns; ++j) {
            int oi = output_on(alias, ns, i), oj = output_on(alias, ns, j);
            if (SLOT(e, i).output || SLOT(e, j).output || c->off[i] < 0 || c->off[j] < 0) continue;
            if (role_class(SLOT(e, i).role) != role_class(SLOT(e, j).role)) continue;
            if (oi >= 0 && oj >= 0) continue; /* two outputs on the same memory */
            if ((oi >= 0 && !alias_ok(e, oi, j)) || (oj >= 0 && !alias_ok(e, oj, i))) continue;
            pair[npair][0] = i;
            pair[npair++][1] = j;
        }
    if (npair > 0 && chance(r, 0.15)) {
        int k = (int)below(r, npair);
        alias[pair[k][1]] = pair[k][0];
        note(c, "%s==%s", ROLE_NAME[SLOT(e, pair[k][1]).role], ROLE_NAME[SLOT(e, pair[k][0]).role]);
    }
    for (i = 0; i < ns; ++i)
        if (c->off[i] >= 0 && alias[i] < 0) order[n++] = i;
    for (i = n - 1; i > 0; --i) {
        int k = (int)below(r, i + 1), t = order[i];
        order[i] = order[k];
        order[k] = t;
    }
    cursor = 8 * below(r, 8);
    for (j = 0; j < n; ++j) {
        int cls;
        int64_t item;
        i = order[j];
        cls = role_class(SLOT(e, i).role);
        item = class_align(&m, cls);
        cursor = (cursor + 7) / 8 * 8;
        if (item < 8 && chance(r, 0.3)) cursor += item * (1 + below(r, 8 / item - 1)); /* item-aligned only */
        c->off[i] = cursor;
        last_end = cursor + m.bytes[i];
        cursor = last_end + 8 * below(r, 5);
    }
    if (n > 0 && chance(r, 0.2)) { /* last buffer ends exactly at the end of the arena */
        int64_t delta = ARENA - last_end;
        delta -= delta % 8;
        for (j = 0; j < n; ++j) c->off[order[j]] += delta;
        note(c, "at-arena-end");
    }
    for (i = 0; i < ns; ++i) { /* at most two steps: output -> input -> input */
        for (j = i; alias[j] >= 0;) j = alias[j];
        c->off[i] = c->off[j];
    }
}

/* a + b with wrap-around (no signed overflow in the harness itself) */
static int64_t wrap_add(int64_t a, int64_t b) { return (int64_t)((uint64_t)a + (uint64_t)b); }

/* backward_apply's lower bound of count: this rank's N * prod(spatial) (2 if unknown) */
static int64_t local_count(const call *c)
{
    model m;
    run_model(c, 0, 0, &m);
    return m.geom_ok && c->d.kind == FASTNORM_BATCH_NORM ? m.N * m.S : 2;
}

/* The scalar arguments of a valid call: backward_apply's global count (this rank's N * prod(spatial)
   or more, up to INT64_MAX), update_running_stats' count (> 1) and momentum (in [0, 1]). */
static void gen_valid_scalars(rng *r, call *c)
{
    if (c->entry == BWD_APPLY) {
        int64_t local = local_count(c);
        double u = uniform(r);
        c->count = u < 0.3 ? local : u < 0.95 ? local * (1 + below(r, 4)) + below(r, 3) : PICK(r, COUNT_POOL);
        if (c->count < local) c->count = local;
    } else if (c->entry == RUNNING) {
        c->count = chance(r, 0.9) ? 2 + below(r, 1000) : PICK(r, COUNT_POOL);
        if (c->count < 2) c->count = 2;
        c->momentum = PICK(r, MOMENTUM_VALID);
    }
}

/* A valid merge_stats call's num_ranks (1..6), channels (1..8) and counts (some 0, some up to 2^49;
   not all 0). */
static void gen_valid_merge(rng *r, call *c)
{
    int64_t k, total = 0;
    c->ranks = 1 + below(r, 6);
    c->channels = 1 + below(r, 8);
    for (k = 0; k < MAX_RANKS; ++k) {
        double u = uniform(r);
        c->counts[k] = u < 0.25 ? 0 : u < 0.95 ? 1 + below(r, 300) : (int64_t)1 << (20 + below(r, 30));
    }
    for (k = 0; k < c->ranks; ++k) total += c->counts[k];
    if (total == 0) c->counts[below(r, c->ranks)] = 1 + below(r, 50);
}

/* merge_stats: num_ranks, channels and the counts (negative, all 0, a sum beyond int64, ...) */
static void mutate_merge(rng *r, call *c)
{
    int64_t k, n = c->ranks >= 1 && c->ranks <= MAX_RANKS ? c->ranks : MAX_RANKS;
    switch (below(r, 7)) {
    case 0:
        c->ranks = PICK(r, RANKS_POOL);
        note(c, "num_ranks=%lld", (long long)c->ranks);
        break;
    case 1:
        c->channels = PICK(r, RANKS_POOL);
        note(c, "channels=%lld", (long long)c->channels);
        break;
    case 2:
    case 3:
        k = below(r, n);
        c->counts[k] = PICK(r, RANK_COUNT_POOL);
        note(c, "counts[%lld]=%lld", (long long)k, (long long)c->counts[k]);
        break;
    case 4:
        for (k = 0; k < MAX_RANKS; ++k) c->counts[k] = 0;
        note(c, "counts=0");
        break;
    case 5: /* the sum just beyond INT64_MAX, or right at it */
        k = below(r, n);
        c->counts[k] = INT64_MAX - below(r, 3);
        c->counts[(k + 1) % MAX_RANKS] = chance(r, 0.5) ? 1 : 0;
        note(c, "counts[%lld]=INT64_MAX-%lld,counts[%lld]=%lld", (long long)k,
             (long long)(INT64_MAX - c->counts[k]), (long long)((k + 1) % MAX_RANKS),
             (long long)c->counts[(k + 1) % MAX_RANKS]);
        break;
    default: { /* num_ranks * channels doubles right at the int64 byte-size limit */
        int64_t ch = c->channels >= 1 && c->channels <= 64 ? c->channels : 1 + below(r, 8);
        c->channels = ch;
        c->ranks = wrap_add(INT64_MAX / 8 / ch, below(r, 3) - 1);
        note(c, "num_ranks=%lld(boundary) channels=%lld", (long long)c->ranks, (long long)ch);
        break;
    }
    }
}

static int64_t clamp_off(int64_t v)
{
    if (v < 0) return 0;
    if (v > ARENA) return ARENA;
    return v;
}

static void mutate(rng *r, call *c)
{
    fastnorm_desc *d = &c->d;
    int e = c->entry, ns = nslots(e), i, k, what = (int)below(r, 27);
    int rank_idx = d->rank >= 1 && d->rank <= FASTNORM_MAX_RANK ? d->rank : FASTNORM_MAX_RANK;
    /* 25: count (backward_apply, update_running_stats), 26: momentum (update_running_stats) */
    if ((what == 25 && e != BWD_APPLY && e != RUNNING) || (what == 26 && e != RUNNING))
        what = (int)below(r, 25);
    /* merge_stats has no descriptor: its own arguments instead of the descriptor's fields */
    if (e == MERGE && what != 12 && what != 13 && what != 14 && what != 15 && what != 16 && what != 18
        && what != 23) {
        mutate_merge(r, c);
        return;
    }
    switch (what) {
    case 0:
        d->kind = PICK(r, KIND_POOL);
        note(c, "kind=%d", (int)d->kind);
        break;
    case 1:
        d->dtype = PICK(r, DTYPE_POOL);
        note(c, "dtype=%d", (int)d->dtype);
        break;
    case 2:
        d->param_dtype = PICK(r, PDTYPE_POOL);
        note(c, "param_dtype=%d", (int)d->param_dtype);
        break;
    case 3:
        d->layout = PICK(r, LAYOUT_POOL);
        note(c, "layout=%d", (int)d->layout);
        break;
    case 4:
        d->rank = PICK(r, RANK_POOL);
        note(c, "rank=%d", (int)d->rank);
        break;
    case 5:
        i = (int)below(r, FASTNORM_MAX_RANK);
        d->dims[i] = PICK(r, DIM_POOL);
        note(c, "dims[%d]=%lld", i, (long long)d->dims[i]);
        break;
    case 6: /* product overflows */
        for (k = 0; k < 2 + below(r, 2); ++k) {
            i = (int)below(r, rank_idx);
            d->dims[i] = PICK(r, DIM_POOL);
        }
        note(c, "dims-overflow");
        break;
    case 7: { /* product right at an int64 byte-size boundary */
        static const int64_t limits[] = {INT64_MAX / 8, INT64_MAX / 4, INT64_MAX / 2, INT64_MAX};
        int j;
        int64_t p = 1, lim = PICK(r, limits);
        i = (int)below(r, rank_idx);
        for (j = 0; j < rank_idx; ++j)
            if (j != i) {
                if (d->dims[j] < 1 || d->dims[j] > 16) d->dims[j] = 1 + below(r, 4);
                p *= d->dims[j];
            }
        d->dims[i] = wrap_add(lim / p, below(r, 3) - 1);
        if (d->dims[i] < 1) d->dims[i] = 1;
        note(c, "dims[%d]=%lld(boundary %lld/%lld)", i, (long long)d->dims[i], (long long)lim, (long long)p);
        break;
    }
    case 8:
        if (chance(r, 0.5)) {
            int64_t cc = d->rank >= 2 && d->rank <= 5 ? d->dims[d->layout == 1 ? d->rank - 1 : 1] : 4;
            int64_t rel[] = {wrap_add(cc, 1),  wrap_add(cc, cc),
                             cc / 2 + 1,       wrap_add(0, (int64_t)(0 - (uint64_t)cc)),
                             wrap_add(cc, -1), cc};
            d->num_groups = PICK(r, rel);
        } else {
            d->num_groups = PICK(r, GROUP_POOL);
        }
        note(c, "num_groups=%lld", (long long)d->num_groups);
        break;
    case 9:
        d->normalized_ndim =
            chance(r, 0.5) ? (int32_t)((int64_t)d->rank + below(r, 3) - 1) : PICK(r, NDIM_POOL);
        note(c, "normalized_ndim=%d", (int)d->normalized_ndim);
        break;
    case 10:
        d->eps = bad_or_odd_eps(r);
        note(c, "eps=%g", d->eps);
        break;
    case 11:
        d->flags = chance(r, 0.5) ? (uint64_t)1 << below(r, 64) : next_u64(r);
        note(c, "flags=0x%llx", (unsigned long long)d->flags);
        break;
    case 12:
    case 13:
        if (below(r, 8) == 0 && e != MERGE) {
            c->desc_null = 1;
            note(c, "desc=NULL");
        } else {
            i = (int)below(r, ns);
            c->off[i] = -1;
            note(c, "%s=NULL", ROLE_NAME[SLOT(e, i).role]);
        }
        break;
    case 14:
        i = (int)below(r, ns);
        if (c->off[i] >= 0) {
            c->off[i] = clamp_off(c->off[i] + 1 + below(r, 7));
            note(c, "%s misaligned", ROLE_NAME[SLOT(e, i).role]);
        }
        break;
    case 15: { /* an output (or any buffer) at / near another one */
        int o = (int)below(r, ns), b = (int)below(r, ns);
        if (chance(r, 0.7)) {
            int outs[MAX_SLOTS], no = 0;
            for (k = 0; k < ns; ++k)
                if (SLOT(e, k).output) outs[no++] = k;
            o = outs[below(r, no)];
        }
        if (o == b || c->off[b] < 0) break;
        c->off[o] = clamp_off(c->off[b] + (chance(r, 0.4) ? 0 : 4 * (below(r, 9) - 4)));
        note(c, "%s=%s%+lld", ROLE_NAME[SLOT(e, o).role], ROLE_NAME[SLOT(e, b).role],
             (long long)(c->off[o] - c->off[b]));
        break;
    }
    case 16: {
        int a = (int)below(r, ns), b = (int)below(r, ns);
        int64_t t = c->off[a];
        c->off[a] = c->off[b];
        c->off[b] = t;
        note(c, "swap(%s,%s)", ROLE_NAME[SLOT(e, a).role], ROLE_NAME[SLOT(e, b).role]);
        break;
    }
    case 17: /* one value per channel */
        if (d->rank >= 2 && d->rank <= 5) {
            int cidx = d->layout == 1 ? d->rank - 1 : 1;
            for (i = 1; i < d->rank; ++i)
                if (i != cidx) d->dims[i] = 1;
            if (chance(r, 0.5)) d->dims[0] = 1;
            note(c, "spatial=1");
        }
        break;
    case 18:
        i = (int)below(r, ns);
        c->off[i] = below(r, ARENA + 1);
        if (chance(r, 0.6)) c->off[i] -= c->off[i] % 8;
        note(c, "%s@%lld", ROLE_NAME[SLOT(e, i).role], (long long)c->off[i]);
        break;
    case 19:
        d->struct_size = PICK(r, STRUCT_SIZE_POOL);
        note(c, "struct_size=%lu", (unsigned long)d->struct_size);
        break;
    case 20:
        d->activation = PICK(r, ACTIVATION_POOL);
        note(c, "activation=%d", (int)d->activation);
        break;
    case 21:
        d->negative_slope = bad_or_odd_eps(r);
        note(c, "negative_slope=%g", d->negative_slope);
        break;
    case 22:
        d->reserved = PICK(r, RANK_POOL);
        note(c, "reserved=%d", (int)d->reserved);
        break;
    case 23: { /* an output exactly on a buffer of its class it may not alias (y == h, dresidual == x, ...) */
        int pair[MAX_SLOTS * MAX_SLOTS][2], npair = 0, o, b;
        for (o = 0; o < ns; ++o)
            for (b = 0; b < ns; ++b)
                if (SLOT(e, o).output && b != o && c->off[b] >= 0 && !alias_ok(e, o, b)
                    && role_class(SLOT(e, o).role) == role_class(SLOT(e, b).role)) {
                    pair[npair][0] = o;
                    pair[npair++][1] = b;
                }
        if (npair == 0) break;
        k = (int)below(r, npair);
        c->off[pair[k][0]] = c->off[pair[k][1]];
        note(c, "%s==%s(not allowed)", ROLE_NAME[SLOT(e, pair[k][0]).role],
             ROLE_NAME[SLOT(e, pair[k][1]).role]);
        break;
    }
    case 25: { /* around this rank's N * prod(spatial) (backward_apply) or 2 (update_running_stats) */
        int64_t local = e == BWD_APPLY ? local_count(c) : 2;
        int64_t rel[] = {local - 1, local, wrap_add(local, 1), local / 2, wrap_add(local, -2)};
        c->count = chance(r, 0.6) ? PICK(r, rel) : PICK(r, COUNT_POOL);
        note(c, "count=%lld", (long long)c->count);
        break;
    }
    case 26:
        c->momentum = bad_or_odd_momentum(r);
        note(c, "momentum=%g", c->momentum);
        break;
    default:
        d->kind = 1 + (int32_t)below(r, 5);
        note(c, "kind->%d", (int)d->kind);
        break;
    }
}

static void gen_random(rng *r, call *c)
{
    fastnorm_desc *d = &c->d;
    int i;
    d->struct_size = chance(r, 0.8) ? sizeof *d : PICK(r, STRUCT_SIZE_POOL);
    d->kind = PICK(r, KIND_POOL);
    d->dtype = PICK(r, DTYPE_POOL);
    d->param_dtype = PICK(r, PDTYPE_POOL);
    d->layout = chance(r, 0.5) ? (int32_t)below(r, 2) : PICK(r, LAYOUT_POOL);
    d->rank = chance(r, 0.5) ? 1 + (int32_t)below(r, 8) : PICK(r, RANK_POOL);
    d->normalized_ndim = chance(r, 0.3) ? 0 : PICK(r, NDIM_POOL);
    d->num_groups = chance(r, 0.3) ? 0 : PICK(r, GROUP_POOL);
    for (i = 0; i < FASTNORM_MAX_RANK; ++i) d->dims[i] = chance(r, 0.6) ? 1 + below(r, 4) : PICK(r, DIM_POOL);
    d->eps = chance(r, 0.5) ? PICK(r, EPS_VALID) : bad_or_odd_eps(r);
    d->flags = chance(r, 0.7) ? 0 : (uint64_t)1 << below(r, 64);
    d->activation = chance(r, 0.6) ? 0 : PICK(r, ACTIVATION_POOL);
    d->reserved = chance(r, 0.9) ? 0 : PICK(r, RANK_POOL);
    d->negative_slope = chance(r, 0.8) ? 0.01 : bad_or_odd_eps(r);
    c->desc_null = below(r, 50) == 0 && c->entry != MERGE;
    c->count = chance(r, 0.5) ? PICK(r, COUNT_POOL) : 1 + below(r, 300);
    c->momentum = chance(r, 0.6) ? PICK(r, MOMENTUM_VALID) : bad_or_odd_momentum(r);
    c->ranks = chance(r, 0.5) ? 1 + below(r, 8) : PICK(r, RANKS_POOL);
    c->channels = chance(r, 0.5) ? 1 + below(r, 8) : PICK(r, RANKS_POOL);
    for (i = 0; i < MAX_RANKS; ++i) c->counts[i] = chance(r, 0.8) ? below(r, 100) : PICK(r, RANK_COUNT_POOL);
    for (i = 0; i < nslots(c->entry); ++i) {
        if (chance(r, 0.15)) {
            c->off[i] = -1;
        } else {
            c->off[i] = below(r, ARENA + 1);
            if (chance(r, 0.7)) c->off[i] -= c->off[i] % 8;
        }
    }
    note(c, "random");
}

/* ------------------------------------------------------------------------ */
/* Buffers, reference                                                        */
/* ------------------------------------------------------------------------ */

static unsigned char *g_arena, *g_snapshot;
static fastnorm_desc *g_desc; /* heap copy passed to the library (ASan sees over-reads) */
/* valid calls whose values were checked, per activation; not checked (z at ReLU's kink);
   checked with z exactly 0 at ReLU's kink */
static long g_checked_act[NACTIVATION], g_kink, g_zero_kink;

/*
 * The 16-bit formats, in plain C (no _Float16: check_conversions compares with it where the compiler
 * has it).  Values are held as doubles, which represent every float16 / bfloat16 / float32 value
 * exactly.
 *   round_binary: v rounded to nearest even to a binary format with `digits` significand bits (the
 *     leading one included), exponents emin..emax (subnormals below 2^emin), overflowing to infinity
 *     from the largest finite value plus half an ulp on, as IEEE 754 does.  Exact: frexp / ldexp
 *     scale by powers of 2, rint rounds to nearest even (the default rounding mode) in one step.
 *   float16: IEEE binary16 (11 digits, 2^-14 .. 65504, subnormals down to 2^-24).
 *   bfloat16: the upper half of a float32 (8 digits, float32's exponents); the library rounds the
 *     float32 bits to nearest even (a NaN stays a quiet NaN with its sign), which is round_binary
 *     of the float32 value.  NaN outputs are compared as NaN, not by payload.
 */
static double round_binary(double v, int digits, int emin, int emax)
{
    int e;
    double q;
    if (!isfinite(v) || v == 0.0) return v;
    (void)frexp(v, &e);             /* |v| in [2^(e-1), 2^e) */
    if (e - 1 < emin) e = emin + 1; /* subnormal: the quantum of the smallest binade */
    q = ldexp(rint(ldexp(v, digits - e)), e - digits);
    if (fabs(q) > ldexp(2.0 - ldexp(1.0, 1 - digits), emax)) q = copysign(INFINITY, v);
    return q;
}

static double round_f16(double v) { return round_binary(v, 11, -14, 15); }
static double round_bf16(double v) { return round_binary(v, 8, -126, 127); }

/* a float16 value (round_f16's result, inf or NaN) -> its bits; NaN: the quiet NaN with v's sign */
static uint16_t f16_bits(double v)
{
    uint16_t sign = signbit(v) ? 0x8000 : 0;
    double a = fabs(v);
    int e;
    if (isnan(v)) return sign | 0x7E00;
    if (isinf(v)) return sign | 0x7C00;
    if (a < ldexp(1.0, -14)) return sign | (uint16_t)ldexp(a, 24); /* subnormal: multiples of 2^-24 */
    (void)frexp(a, &e);                                            /* a in [2^(e-1), 2^e) */
    return sign | (uint16_t)((e + 14) << 10) | (uint16_t)(ldexp(a, 11 - e) - 1024.0);
}

static double f16_value(uint16_t b)
{
    int e = (b >> 10) & 0x1F, mant = b & 0x3FF;
    double a = e == 0 ? ldexp(mant, -24) : e == 31 ? (mant ? NAN : INFINITY) : ldexp(mant + 1024, e - 25);
    return b & 0x8000 ? -a : a;
}

/* a bfloat16 value (round_bf16's result, inf or NaN) -> its bits; NaN: 0x7FC0 with v's sign */
static uint16_t bf16_bits(double v)
{
    float f = (float)v; /* exact */
    uint32_t u;
    if (isnan(v)) return (signbit(v) ? 0x8000 : 0) | 0x7FC0;
    memcpy(&u, &f, 4);
    return (uint16_t)(u >> 16);
}

static double bf16_value(uint16_t b)
{
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* v rounded to the storage of dtype (float32 by C's conversion: the harness's values stay far
   inside its range) */
static double round_to(double v, int32_t dtype)
{
    switch (dtype) {
    case FASTNORM_FLOAT32: return (double)(float)v;
    case FASTNORM_FLOAT16: return round_f16(v);
    case FASTNORM_BFLOAT16: return round_bf16(v);
    default: return v;
    }
}

/* v rounded to the compute type of dtype's data: float32 for float32 and 16-bit data */
static double to_compute(double v, int32_t dtype) { return dtype == FASTNORM_FLOAT64 ? v : (double)(float)v; }

static double load(int64_t off, int64_t i, int32_t dtype)
{
    unsigned char *p = g_arena + off + dtype_itemsize(dtype) * i;
    float f;
    double v;
    uint16_t b;
    switch (dtype) {
    case FASTNORM_FLOAT32: memcpy(&f, p, 4); return f;
    case FASTNORM_FLOAT16: memcpy(&b, p, 2); return f16_value(b);
    case FASTNORM_BFLOAT16: memcpy(&b, p, 2); return bf16_value(b);
    default: memcpy(&v, p, 8); return v;
    }
}

/* stores v rounded to nearest (even) */
static void store(int64_t off, int64_t i, int32_t dtype, double v)
{
    unsigned char *p = g_arena + off + dtype_itemsize(dtype) * i;
    float f;
    uint16_t b;
    switch (dtype) {
    case FASTNORM_FLOAT32:
        f = (float)v;
        memcpy(p, &f, 4);
        break;
    case FASTNORM_FLOAT16:
        b = f16_bits(round_f16(v));
        memcpy(p, &b, 2);
        break;
    case FASTNORM_BFLOAT16:
        b = bf16_bits(round_bf16(v));
        memcpy(p, &b, 2);
        break;
    default: memcpy(p, &v, 8); break;
    }
}

/* Relative tolerance of the outputs computed in the compute type of dtype's data (their error scale
   is computed with the reference); 16-bit outputs then get their own rounding (check_values). */
static double data_rtol(int32_t dtype) { return dtype == FASTNORM_FLOAT64 ? 1e-10 : 1e-5; }

/* absolute tolerance added where results underflow (e.g. eps = 1e300 makes rstd tiny) */
static double underflow_floor(int32_t dtype) { return dtype == FASTNORM_FLOAT64 ? 1e-300 : 1e-37; }

/* The dtype of the buffers of a role: the data's, the parameters' or float64 (mean, rstd). */
static int32_t role_dtype(const model *m, int role)
{
    int cls = role_class(role);
    return cls == DATA ? m->dtype : cls == PARAM ? m->pdtype : FASTNORM_FLOAT64;
}

/* statistic and parameter index of element i */
static void index_map(const model *m, int64_t i, int64_t *stat, int64_t *param)
{
    int64_t n, ch;
    if (m->kind == FASTNORM_LAYER_NORM || m->kind == FASTNORM_RMS_NORM) {
        *stat = i / m->K;
        *param = i % m->K;
        return;
    }
    if (m->layout == FASTNORM_CHANNELS_LAST) {
        n = i / (m->S * m->C);
        ch = i % m->C;
    } else {
        n = i / (m->C * m->S);
        ch = (i / m->S) % m->C;
    }
    *param = ch;
    if (m->kind == FASTNORM_BATCH_NORM) *stat = ch;
    else if (m->kind == FASTNORM_INSTANCE_NORM) *stat = n * m->C + ch;
    else *stat = n * m->G + ch / (m->C / m->G);
}

/* Inputs as the library reads them (x_: the norm's input, x or h), absent ones as their defaults. */
static double x_[MAX_ELEMS], dy_[MAX_ELEMS], res_[MAX_ELEMS], skip_[MAX_ELEMS], w_[MAX_ELEMS], b_[MAX_ELEMS],
    skip_bias_[MAX_ELEMS], mean_[MAX_ELEMS], rstd_[MAX_ELEMS];
/* z = norm(x) * weight + bias + residual, dz = dy * act'(z), and their error scales; z_zero_: every
   term of z is exactly 0, so z is 0 in any precision */
static double z_[MAX_ELEMS], zmag_[MAX_ELEMS], dz_[MAX_ELEMS], dzmag_[MAX_ELEMS];
static char z_zero_[MAX_ELEMS];
/* reference of each output role and its error scale (sum of the magnitudes of the terms) */
static double ref_[NROLE][MAX_ELEMS], mag_[NROLE][MAX_ELEMS];
static int64_t stat_of[MAX_ELEMS], param_of[MAX_ELEMS];

/* Statistics of the data in x_ (double precision, two passes). */
static void reference_stats(const model *m, double eps, double *mean, double *rstd, double *min_var)
{
    int64_t i, s, group = m->size / m->nstats;
    int centered = m->kind != FASTNORM_RMS_NORM;
    for (s = 0; s < m->nstats; ++s) mean[s] = rstd[s] = 0.0;
    if (centered) {
        for (i = 0; i < m->size; ++i) mean[stat_of[i]] += x_[i];
        for (s = 0; s < m->nstats; ++s) mean[s] /= (double)group;
    }
    for (i = 0; i < m->size; ++i) {
        double dev = x_[i] - mean[stat_of[i]];
        rstd[stat_of[i]] += dev * dev;
    }
    *min_var = INFINITY;
    for (s = 0; s < m->nstats; ++s) {
        double var = rstd[s] / (double)group;
        if (var < *min_var) *min_var = var;
        rstd[s] = 1.0 / sqrt(var + eps);
    }
}

/* n values of the input `role` of call c as the library will read them; `absent` if c has no such
   input or passes NULL */
static void read_input(const call *c, const model *m, int role, int64_t n, double absent, double *v)
{
    int slot = slot_of(c->entry, role);
    int64_t off = slot < 0 ? -1 : c->off[slot], k;
    int32_t dtype = role_dtype(m, role);
    for (k = 0; k < n; ++k) v[k] = off >= 0 ? load(off, k, dtype) : absent;
}

/* x_ = the norm's input: h for the skip backward, h = x + skip + skip_bias for the skip forward
   (rounded to the compute type after each add, summed left to right, then stored: also its output
   h, whose reference is the unrounded sum for 16-bit data, see check_values), else x. */
static void read_norm_input(const call *c, const model *m)
{
    int64_t k, n = m->size;
    int32_t dt = m->dtype;
    read_input(c, m, c->entry == SKIP_BWD ? R_H : R_X, n, 0.0, x_);
    read_input(c, m, R_SKIP, n, 0.0, skip_);
    read_input(c, m, R_SKIP_BIAS, m->nparams, 0.0, skip_bias_);
    if (c->entry != SKIP_FWD) return;
    for (k = 0; k < n; ++k) {
        double sb = skip_bias_[param_of[k]];
        ref_[R_H][k] = to_compute(to_compute(x_[k] + skip_[k], dt) + sb, dt);
        mag_[R_H][k] = fabs(x_[k]) + fabs(skip_[k]) + fabs(sb);
        x_[k] = round_to(ref_[R_H][k], dt);
    }
}

/* The activation of the descriptor: a 0.2 descriptor's epilogue fields are not read (defaults). */
static int desc_activation(const fastnorm_desc *d, double *slope)
{
    int full = d->struct_size == sizeof *d;
    *slope = full ? d->negative_slope : 0.01;
    return full ? d->activation : FASTNORM_ACTIVATION_NONE;
}

/* act(z) and act'(z) in double precision (torch's formulas), and the error scales of their
   evaluation in the library's precision beyond the error already in z: y_err for act(z), and
   d_err (>= |act'(z)|) for act'(z). */
typedef struct act_value {
    double y, d, y_err, d_err;
} act_value;

static act_value activation(int act, double slope, double z)
{
    const double sqrt_2_pi = 0.7978845608028654, inv_sqrt_2 = 0.7071067811865476;
    const double inv_sqrt_2pi = 0.3989422804014327, c = 0.044715;
    act_value a = {z, 1.0, 0.0, 1.0}; /* FASTNORM_ACTIVATION_NONE */
    double s, t, phi;
    switch (act) {
    case FASTNORM_RELU: /* derivative 0 at 0 */
        a.y = z > 0.0 ? z : 0.0;
        a.d = a.d_err = z > 0.0 ? 1.0 : 0.0;
        break;
    case FASTNORM_LEAKY_RELU: /* derivative `slope` at 0 */
        a.y = z > 0.0 ? z : slope * z;
        a.d = z > 0.0 ? 1.0 : slope;
        a.d_err = fabs(a.d);
        break;
    case FASTNORM_SIGMOID:
        s = 1.0 / (1.0 + exp(-z));
        a.y = s;
        a.d = s * (1.0 - s);
        a.y_err = s;
        a.d_err = s; /* 1 - s cancels as s -> 1: a few ulp of 1, times s */
        break;
    case FASTNORM_TANH:
        t = tanh(z);
        a.y = t;
        a.d = 1.0 - t * t;
        a.y_err = fabs(t);
        a.d_err = 1.0; /* 1 - t^2 cancels as |t| -> 1: a few ulp of 1 */
        break;
    case FASTNORM_SILU:
        s = 1.0 / (1.0 + exp(-z));
        a.y = z * s;
        a.d = s * (1.0 + z * (1.0 - s));
        a.y_err = fabs(a.y);
        a.d_err = s * (1.0 + fabs(z)); /* 1 - s cancels, times |z| s */
        break;
    case FASTNORM_GELU:
        s = 0.5 * erfc(-z * inv_sqrt_2); /* Phi(z) */
        phi = inv_sqrt_2pi * exp(-0.5 * z * z);
        a.y = z * s;
        a.d = s + z * phi;
        /* z * (1 + erf(z / sqrt 2)) / 2 cancels for z < 0: a few ulp of 1, times |z| (and Phi's too) */
        a.y_err = fabs(z);
        a.d_err = 1.0 + fabs(z) * phi;
        break;
    case FASTNORM_GELU_TANH: {
        double du = sqrt_2_pi * (1.0 + 3.0 * c * z * z); /* d/dz of u = sqrt(2/pi) (z + c z^3) */
        t = tanh(sqrt_2_pi * (z + c * z * z * z));
        a.y = 0.5 * z * (1.0 + t);
        a.d = 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * du;
        /* 1 + t cancels for z < 0 (times |z|), 1 - t^2 as |t| -> 1 (times |z| du / 2) */
        a.y_err = fabs(z);
        a.d_err = 1.0 + 0.5 * fabs(z) * du;
        break;
    }
    default: break;
    }
    return a;
}

/* Upper bounds of |act'| (d1) and |act''| (d2), which carry the error of z into act(z) and act'(z):
   GELU's |act'| peaks at 1.13, SiLU's at 1.10; |act''| <= 0.8 for the smooth ones.  The jump of
   (leaky) ReLU's act' at 0 is handled apart (see reference_dz). */
static void activation_bounds(int act, double slope, double *d1, double *d2)
{
    *d1 = 1.0;
    *d2 = 0.0;
    if (act == FASTNORM_LEAKY_RELU) *d1 = fabs(slope) > 1.0 ? fabs(slope) : 1.0;
    else if (act >= FASTNORM_SIGMOID) *d1 = 1.2, *d2 = 1.0;
}

/* z_ = (x - mean) * rstd * weight + bias + residual (mean 0 for RMSNorm), from the arrays above. */
static void reference_z(const model *m)
{
    int64_t k;
    int rms = m->kind == FASTNORM_RMS_NORM;
    for (k = 0; k < m->size; ++k) {
        int64_t st = stat_of[k], p = param_of[k];
        double mu = rms ? 0.0 : mean_[st], sc = rstd_[st] * w_[p];
        z_[k] = (x_[k] - mu) * sc + b_[p] + res_[k];
        zmag_[k] = (fabs(x_[k]) + fabs(mu)) * fabs(sc) + fabs(b_[p]) + fabs(res_[k]);
        z_zero_[k] = x_[k] == mu && b_[p] == 0.0 && res_[k] == 0.0;
    }
}

/* y = act(z). */
static void reference_forward(const model *m, int act, double slope)
{
    int64_t k;
    double d1, d2;
    activation_bounds(act, slope, &d1, &d2);
    for (k = 0; k < m->size; ++k) {
        act_value a = activation(act, slope, z_[k]);
        ref_[R_Y][k] = a.y;
        mag_[R_Y][k] = d1 * zmag_[k] + a.y_err;
    }
}

/* dz = dy * act'(z), also the reference of dresidual.  Returns 0 if some z lies within its error
   (rtol * zmag, or below the dtype's underflow) of (leaky) ReLU's kink but is not exactly 0: the
   library's rounding may put it on the other side, where act' differs (its value is not checked then). */
static int reference_dz(const model *m, int act, double slope, int *zero_at_kink)
{
    int64_t k;
    int kinked = act == FASTNORM_RELU || act == FASTNORM_LEAKY_RELU;
    double d1, d2, rtol = data_rtol(m->dtype), tiny = underflow_floor(m->dtype);
    activation_bounds(act, slope, &d1, &d2);
    *zero_at_kink = 0;
    for (k = 0; k < m->size; ++k) {
        act_value a = activation(act, slope, z_[k]);
        if (kinked && z_zero_[k]) *zero_at_kink = 1;
        else if (kinked && fabs(z_[k]) <= rtol * zmag_[k] + tiny) return 0;
        dz_[k] = ref_[R_DRESIDUAL][k] = dy_[k] * a.d;
        dzmag_[k] = mag_[R_DRESIDUAL][k] = fabs(dy_[k]) * (d2 * zmag_[k] + a.d_err);
    }
    return 1;
}

/* The norm's backward with dz_ (error scales dzmag_) as the gradient of its output: dx, dweight,
   dbias, and dskip_bias (the column sums of dx). */
static void reference_backward(const model *m)
{
    static double sg[MAX_ELEMS], sgx[MAX_ELEMS], ag[MAX_ELEMS], agx[MAX_ELEMS];
    int64_t k, s, p, n = m->size, np = m->nparams, group = n / m->nstats;
    int rms = m->kind == FASTNORM_RMS_NORM;
    for (s = 0; s < m->nstats; ++s) sg[s] = sgx[s] = ag[s] = agx[s] = 0.0;
    for (p = 0; p < np; ++p) {
        ref_[R_DWEIGHT][p] = ref_[R_DBIAS][p] = ref_[R_DSKIP_BIAS][p] = 0.0;
        mag_[R_DWEIGHT][p] = mag_[R_DBIAS][p] = mag_[R_DSKIP_BIAS][p] = 0.0;
    }
    for (k = 0; k < n; ++k) {
        int64_t st = stat_of[k], pk = param_of[k];
        double g = w_[pk] * dz_[k], gm = fabs(w_[pk]) * dzmag_[k], xh = (x_[k] - mean_[st]) * rstd_[st];
        sg[st] += g;
        sgx[st] += g * xh;
        ag[st] += gm;
        agx[st] += gm * fabs(xh);
        ref_[R_DWEIGHT][pk] += dz_[k] * xh;
        mag_[R_DWEIGHT][pk] += dzmag_[k] * fabs(xh);
        ref_[R_DBIAS][pk] += dz_[k];
        mag_[R_DBIAS][pk] += dzmag_[k];
    }
    for (k = 0; k < n; ++k) {
        int64_t st = stat_of[k], pk = param_of[k];
        double g = w_[pk] * dz_[k], xh = (x_[k] - mean_[st]) * rstd_[st], rs = rstd_[st];
        double mg = rms ? 0.0 : sg[st] / (double)group, mgx = sgx[st] / (double)group;
        ref_[R_DX][k] = rs * (g - mg - xh * mgx);
        mag_[R_DX][k] = fabs(rs)
            * (fabs(w_[pk]) * dzmag_[k] + (rms ? 0.0 : ag[st] / (double)group)
               + fabs(xh) * agx[st] / (double)group);
        ref_[R_DSKIP_BIAS][pk] += ref_[R_DX][k];
        mag_[R_DSKIP_BIAS][pk] += mag_[R_DX][k];
    }
}

static int all_reasonable(const double *v, int64_t n)
{
    int64_t i;
    for (i = 0; i < n; ++i)
        if (!isfinite(v[i]) || fabs(v[i]) > 1e6) return 0;
    return 1;
}

/*
 * Valid call: fill the inputs with values (outputs: sentinel), compute the
 * reference of every output from the arena contents the library will see.
 * Returns 1 if the outputs' values are to be compared, 0 if not (inputs
 * unusual, e.g. aliased across types, or z at ReLU's kink; status and
 * untouched bytes are still checked).
 */
static int prepare_valid(rng *r, call *c, const model *m)
{
    int e = c->entry, ns = nslots(e), i, act, backward = slot_of(e, R_DX) >= 0, zero_at_kink;
    int stats_out = SLOT(e, slot_of(e, R_MEAN)).output;
    int64_t k, s, n = m->size, np = m->nparams, nst = m->nstats;
    double min_var, slope, xmax = 0.0;

    for (k = 0; k < n; ++k) index_map(m, k, &stat_of[k], &param_of[k]);
    /* inputs, in argument order (aliased inputs share values) */
    for (i = 0; i < ns; ++i) {
        int role = SLOT(e, i).role, cls = role_class(role);
        int64_t off = c->off[i];
        if (SLOT(e, i).output || off < 0) continue;
        if (cls == DATA) {
            double amp = role == R_DY || role == R_RESIDUAL ? 1.0 : 2.0;
            for (k = 0; k < n; ++k) store(off, k, m->dtype, between(r, -amp, amp));
        } else if (cls == PARAM) {
            double amp = role == R_WEIGHT ? 1.5 : 1.0;
            for (k = 0; k < np; ++k) store(off, k, m->pdtype, between(r, -amp, amp));
        } else if (!ENTRY[e].training) {
            for (k = 0; k < nst; ++k)
                store(off, k, FASTNORM_FLOAT64,
                      role == R_RSTD ? between(r, 0.25, 4.0) : between(r, -1.0, 1.0));
        }
    }
    if (ENTRY[e].training) { /* statistics of the norm's input; eps 0 with a zero variance would give inf */
        read_norm_input(c, m);
        reference_stats(m, c->d.eps, mean_, rstd_, &min_var);
        if (!(min_var + c->d.eps > 0.0)) {
            c->d.eps = 1e-5;
            note(c, "eps->1e-5");
            reference_stats(m, c->d.eps, mean_, rstd_, &min_var);
        }
        if (backward) { /* as written by the forward pass */
            for (s = 0; s < nst; ++s) store(c->off[slot_of(e, R_MEAN)], s, FASTNORM_FLOAT64, mean_[s]);
            for (s = 0; s < nst; ++s) store(c->off[slot_of(e, R_RSTD)], s, FASTNORM_FLOAT64, rstd_[s]);
        }
    }
    /* read back what the library will read */
    read_norm_input(c, m);
    read_input(c, m, R_DY, n, 0.0, dy_);
    read_input(c, m, R_RESIDUAL, n, 0.0, res_);
    read_input(c, m, R_WEIGHT, np, 1.0, w_);
    read_input(c, m, R_BIAS, np, 0.0, b_);
    if (!stats_out) {
        read_input(c, m, R_MEAN, nst, 0.0, mean_);
        read_input(c, m, R_RSTD, nst, 0.0, rstd_);
    }
    if (!all_reasonable(x_, n) || !all_reasonable(dy_, n) || !all_reasonable(res_, n)
        || !all_reasonable(skip_, n) || !all_reasonable(w_, np) || !all_reasonable(b_, np)
        || !all_reasonable(skip_bias_, np) || !all_reasonable(mean_, nst) || !all_reasonable(rstd_, nst))
        return 0;
    if (backward && m->kind == FASTNORM_RMS_NORM)
        for (s = 0; s < nst; ++s)
            if (mean_[s] != 0.0) return 0; /* the RMSNorm backward's use of mean is not documented */
    act = desc_activation(&c->d, &slope);
    if (act == FASTNORM_LEAKY_RELU && !(fabs(slope) <= 1e6)) return 0; /* slope * z may overflow */

    reference_z(m);
    if (!backward) {
        reference_forward(m, act, slope);
        if (stats_out) {
            for (k = 0; k < n; ++k) xmax = fabs(x_[k]) > xmax ? fabs(x_[k]) : xmax;
            for (s = 0; s < nst; ++s) {
                ref_[R_MEAN][s] = m->kind == FASTNORM_RMS_NORM ? 0.0 : mean_[s];
                mag_[R_MEAN][s] = m->kind == FASTNORM_RMS_NORM ? 0.0 : xmax;
                ref_[R_RSTD][s] = mag_[R_RSTD][s] = rstd_[s];
            }
        }
    } else {
        if (!reference_dz(m, act, slope, &zero_at_kink)) {
            ++g_kink;
            return 0;
        }
        g_zero_kink += zero_at_kink;
        reference_backward(m);
    }
    ++g_checked_act[act];
    return 1;
}

/* merge_stats: the call's counts into its counts buffer (the part inside the arena) */
static void write_counts(const call *c)
{
    int64_t k, off = c->off[slot_of(MERGE, R_COUNTS)];
    if (off < 0) return;
    for (k = 0; k < c->ranks && off + 8 * (k + 1) <= ARENA; ++k) {
        int64_t v = count_of(c, k);
        memcpy(g_arena + off + 8 * k, &v, 8);
    }
}

/* Inputs of the split passes as the library will read them: the global statistics' sums, the batch
   variance, the running statistics before the update, merge_stats' means and m2s. */
static double var_[MAX_ELEMS], sdy_[MAX_ELEMS], sdyx_[MAX_ELEMS], rmean_[MAX_ELEMS], rvar_[MAX_ELEMS],
    means_[MAX_ELEMS], m2s_[MAX_ELEMS];
/* the count output's reference (batch_stats, merge_stats) */
static int64_t g_ref_count;
/* valid merge_stats calls checked with NaN moments at a rank of count 0 ("not read") */
static long g_merge_nan;

/* n random values in [lo, hi) of dtype at arena offset off (rounded to nearest even) */
static void fill_random(rng *r, int64_t off, int64_t n, int32_t dtype, double lo, double hi)
{
    int64_t k;
    for (k = 0; k < n; ++k) store(off, k, dtype, between(r, lo, hi));
}

/* read_input, with the outputs absent but the running statistics (read and written) */
static void read_split_input(const call *c, const model *m, int role, int64_t n, double absent, double *v)
{
    int slot = slot_of(c->entry, role);
    int64_t k;
    if (slot >= 0 && SLOT(c->entry, slot).output && role != R_RUNNING_MEAN && role != R_RUNNING_VAR)
        for (k = 0; k < n; ++k) v[k] = absent;
    else read_input(c, m, role, n, absent, v);
}

static int all_finite_below(const double *v, int64_t n, double limit)
{
    int64_t i;
    for (i = 0; i < n; ++i)
        if (!(fabs(v[i]) <= limit)) return 0;
    return 1;
}

/* merge_stats' reference: the mean and biased variance of the union of the ranks (ranks of count 0
   skipped), in double precision, with error scales (sums of the magnitudes of the terms). */
static int reference_merge(const call *c, const model *m)
{
    int64_t R = m->R, C = m->C, rr, ch;
    double total = (double)m->total;
    for (rr = 0; rr < R; ++rr)
        if (count_of(c, rr) > 0
            && (!all_finite_below(means_ + rr * C, C, 1e6) || !all_finite_below(m2s_ + rr * C, C, 1e20)))
            return 0; /* e.g. means on the counts' bytes */
    for (ch = 0; ch < C; ++ch) {
        double sum = 0.0, asum = 0.0, mean, m2 = 0.0, am2 = 0.0;
        for (rr = 0; rr < R; ++rr) {
            double n = (double)count_of(c, rr), mu = means_[rr * C + ch];
            if (n == 0.0) continue;
            sum += n * mu;
            asum += n * fabs(mu);
        }
        mean = sum / total;
        for (rr = 0; rr < R; ++rr) {
            double n = (double)count_of(c, rr), mu = means_[rr * C + ch], q = m2s_[rr * C + ch];
            if (n == 0.0) continue;
            m2 += q + n * (mu - mean) * (mu - mean);
            am2 += fabs(q) + n * (fabs(mu) + fabs(mean)) * (fabs(mu) + fabs(mean));
        }
        ref_[R_MEAN][ch] = mean;
        mag_[R_MEAN][ch] = asum / total;
        ref_[R_VAR][ch] = m2 / total;
        mag_[R_VAR][ch] = am2 / total;
    }
    g_ref_count = m->total;
    return 1;
}

/*
 * Valid call of a split pass: fill the inputs (and the running statistics, read and written), compute
 * the reference of every output from the arena contents the library will see.  Returns 1 if the
 * outputs' values are to be compared, 0 if not (inputs unusual, e.g. aliased across types).
 */
static int prepare_split(rng *r, call *c, const model *m)
{
    int e = c->entry, ns = nslots(e), i;
    /* n: 0 without data (update_running_stats reads none: its dims may be beyond the arena) */
    int64_t k, s, n = slot_of(e, R_X) >= 0 ? m->size : 0, np = m->nparams, nst = m->nstats;
    int64_t group = nst ? n / nst : 0;
    double count = (double)c->count;

    for (k = 0; k < n; ++k) index_map(m, k, &stat_of[k], &param_of[k]);
    /* inputs, in argument order (aliased inputs share values) */
    for (i = 0; i < ns; ++i) {
        int role = SLOT(e, i).role;
        int64_t off = c->off[i], rr;
        if (off < 0 || (SLOT(e, i).output && role != R_RUNNING_MEAN && role != R_RUNNING_VAR)) continue;
        switch (role) {
        case R_X: fill_random(r, off, n, m->dtype, -2.0, 2.0); break;
        case R_DY: fill_random(r, off, n, m->dtype, -1.0, 1.0); break;
        case R_WEIGHT: fill_random(r, off, np, m->pdtype, -1.5, 1.5); break;
        case R_MEAN: fill_random(r, off, nst, FASTNORM_FLOAT64, -1.0, 1.0); break;
        case R_RSTD: fill_random(r, off, nst, FASTNORM_FLOAT64, 0.25, 4.0); break;
        case R_VAR: fill_random(r, off, nst, FASTNORM_FLOAT64, 0.0, 4.0); break;
        case R_SUM_DY:
        case R_SUM_DY_XHAT: fill_random(r, off, nst, FASTNORM_FLOAT64, -count, count); break;
        case R_RUNNING_MEAN: fill_random(r, off, np, m->pdtype, -1.0, 1.0); break;
        case R_RUNNING_VAR: fill_random(r, off, np, m->pdtype, 0.0, 2.0); break;
        case R_MEANS:
        case R_M2S: /* a rank of count 0: NaN one time in two (not read) */
            for (rr = 0; rr < m->R; ++rr) {
                int64_t cnt = count_of(c, rr);
                int nan = cnt == 0 && chance(r, 0.5);
                double hi = role == R_MEANS ? 2.0 : 4.0 * (double)cnt, lo = role == R_MEANS ? -2.0 : 0.0;
                for (k = 0; k < m->C; ++k)
                    store(off, rr * m->C + k, FASTNORM_FLOAT64, nan ? NAN : between(r, lo, hi));
            }
            break;
        default: break;
        }
    }
    if (e == MERGE) write_counts(c); /* last: the counts stay the call's if an input overlaps them */
    /* read back what the library will read */
    read_split_input(c, m, R_X, n, 0.0, x_);
    read_split_input(c, m, R_DY, n, 0.0, dy_);
    read_split_input(c, m, R_WEIGHT, np, 1.0, w_);
    read_split_input(c, m, R_MEAN, nst, 0.0, mean_);
    read_split_input(c, m, R_RSTD, nst, 0.0, rstd_);
    read_split_input(c, m, R_VAR, nst, 0.0, var_);
    read_split_input(c, m, R_SUM_DY, nst, 0.0, sdy_);
    read_split_input(c, m, R_SUM_DY_XHAT, nst, 0.0, sdyx_);
    read_split_input(c, m, R_RUNNING_MEAN, np, 0.0, rmean_);
    read_split_input(c, m, R_RUNNING_VAR, np, 0.0, rvar_);
    read_split_input(c, m, R_MEANS, m->R * m->C, 0.0, means_);
    read_split_input(c, m, R_M2S, m->R * m->C, 0.0, m2s_);
    if (!all_reasonable(x_, n) || !all_reasonable(dy_, n) || !all_reasonable(w_, np)
        || !all_reasonable(mean_, nst) || !all_reasonable(rstd_, nst) || !all_reasonable(var_, nst)
        || !all_finite_below(sdy_, nst, 1e20) || !all_finite_below(sdyx_, nst, 1e20)
        || !all_reasonable(rmean_, np) || !all_reasonable(rvar_, np))
        return 0;

    switch (e) {
    case BATCH_STATS: { /* count, mean, m2 = sum((x - mean)^2) per channel (two passes) */
        double xmax = 0.0;
        for (s = 0; s < nst; ++s) ref_[R_MEAN][s] = ref_[R_M2][s] = mag_[R_M2][s] = 0.0;
        for (k = 0; k < n; ++k) {
            ref_[R_MEAN][stat_of[k]] += x_[k];
            if (fabs(x_[k]) > xmax) xmax = fabs(x_[k]);
        }
        for (s = 0; s < nst; ++s) {
            ref_[R_MEAN][s] /= (double)group;
            mag_[R_MEAN][s] = xmax;
        }
        for (k = 0; k < n; ++k) {
            double mu = ref_[R_MEAN][stat_of[k]], dev = x_[k] - mu, a = fabs(x_[k]) + fabs(mu);
            ref_[R_M2][stat_of[k]] += dev * dev;
            mag_[R_M2][stat_of[k]] += a * a;
        }
        g_ref_count = group;
        return 1;
    }
    case MERGE: {
        int nan = 0;
        int64_t rr;
        for (rr = 0; rr < m->R; ++rr)
            if (count_of(c, rr) == 0 && (isnan(means_[rr * m->C]) || isnan(m2s_[rr * m->C]))) nan = 1;
        if (!reference_merge(c, m)) return 0;
        g_merge_nan += nan;
        return 1;
    }
    case BWD_REDUCE: /* sum(dy), sum(dy * (x - mean) * rstd) per channel */
        for (s = 0; s < nst; ++s)
            ref_[R_SUM_DY][s] = mag_[R_SUM_DY][s] = ref_[R_SUM_DY_XHAT][s] = mag_[R_SUM_DY_XHAT][s] = 0.0;
        for (k = 0; k < n; ++k) {
            int64_t st = stat_of[k];
            ref_[R_SUM_DY][st] += dy_[k];
            mag_[R_SUM_DY][st] += fabs(dy_[k]);
            ref_[R_SUM_DY_XHAT][st] += dy_[k] * (x_[k] - mean_[st]) * rstd_[st];
            mag_[R_SUM_DY_XHAT][st] += fabs(dy_[k]) * (fabs(x_[k]) + fabs(mean_[st])) * fabs(rstd_[st]);
        }
        return 1;
    case BWD_APPLY: /* dx = rstd * w * (dy - sum_dy / m - xhat * sum_dy_xhat / m), m = count */
        for (k = 0; k < n; ++k) {
            int64_t st = stat_of[k], p = param_of[k];
            double rs = rstd_[st], w = w_[p], xh = (x_[k] - mean_[st]) * rs;
            ref_[R_DX][k] = rs * w * (dy_[k] - sdy_[st] / count - xh * sdyx_[st] / count);
            mag_[R_DX][k] = fabs(rs * w)
                * (fabs(dy_[k]) + fabs(sdy_[st]) / count
                   + (fabs(x_[k]) + fabs(mean_[st])) * fabs(rs) * fabs(sdyx_[st]) / count);
        }
        return 1;
    default: { /* update_running_stats, in float64: rounded once to the parameter dtype (check_values) */
        double keep = 1.0 - c->momentum, f = c->momentum, corr = count / (count - 1.0);
        for (s = 0; s < np; ++s) {
            ref_[R_RUNNING_MEAN][s] = keep * rmean_[s] + f * mean_[s];
            mag_[R_RUNNING_MEAN][s] = fabs(keep * rmean_[s]) + fabs(f * mean_[s]);
            ref_[R_RUNNING_VAR][s] = keep * rvar_[s] + f * (var_[s] * corr);
            mag_[R_RUNNING_VAR][s] = fabs(keep * rvar_[s]) + fabs(f * var_[s] * corr);
        }
        return 1;
    }
    }
}

/* ------------------------------------------------------------------------ */
/* Running and checking                                                      */
/* ------------------------------------------------------------------------ */

static long g_count[NENTRY][NSTATUS + 1], g_helper_count[NSTATUS + 1];
/* valid calls and those checked against the reference, per data dtype; 16-bit data with float32
   parameters checked */
static long g_valid_dtype[FASTNORM_BFLOAT16 + 1], g_checked_dtype[FASTNORM_BFLOAT16 + 1], g_checked_mixed;
static long g_checked_entry[NENTRY];
static long g_calls, g_valid, g_checked, g_unchecked, g_after_invalid, g_single, g_forced, g_helpers;
static int g_fail, g_verbose;
static uint64_t g_seed;

static void describe(const call *c, char *buf, size_t size)
{
    const fastnorm_desc *d = &c->d;
    int i, n;
    size_t used;
    if (c->entry == MERGE) {
        n = snprintf(buf, size, "%s(num_ranks=%lld channels=%lld counts=[", ENTRY[c->entry].name,
                     (long long)c->ranks, (long long)c->channels);
        for (i = 0; i < MAX_RANKS && i < c->ranks && n > 0 && (size_t)n < size; ++i)
            n += snprintf(buf + n, size - (size_t)n, "%s%lld", i ? "," : "", (long long)c->counts[i]);
        if (n > 0 && (size_t)n < size)
            n += snprintf(buf + n, size - (size_t)n, "%s]", c->ranks > MAX_RANKS ? ",... repeated" : "");
    } else if (c->desc_null) {
        n = snprintf(buf, size, "%s(desc=NULL", ENTRY[c->entry].name);
    } else {
        n = snprintf(
            buf, size,
            "%s(struct_size=%lu kind=%d dtype=%d param_dtype=%d layout=%d rank=%d normalized_ndim=%d "
            "num_groups=%lld eps=%.17g flags=0x%llx activation=%d reserved=%d negative_slope=%.17g "
            "dims=[",
            ENTRY[c->entry].name, (unsigned long)d->struct_size, (int)d->kind, (int)d->dtype,
            (int)d->param_dtype, (int)d->layout, (int)d->rank, (int)d->normalized_ndim,
            (long long)d->num_groups, d->eps, (unsigned long long)d->flags, (int)d->activation,
            (int)d->reserved, d->negative_slope);
        for (i = 0; i < FASTNORM_MAX_RANK && n > 0 && (size_t)n < size; ++i)
            n += snprintf(buf + n, size - (size_t)n, "%s%lld", i ? "," : "", (long long)d->dims[i]);
        if (n > 0 && (size_t)n < size) n += snprintf(buf + n, size - (size_t)n, "]");
    }
    if ((c->entry == BWD_APPLY || c->entry == RUNNING) && n > 0 && (size_t)n < size)
        n += snprintf(buf + n, size - (size_t)n, " count=%lld", (long long)c->count);
    if (c->entry == RUNNING && n > 0 && (size_t)n < size)
        n += snprintf(buf + n, size - (size_t)n, " momentum=%.17g", c->momentum);
    for (i = 0; i < nslots(c->entry) && n > 0 && (size_t)n < size; ++i) {
        const char *name = ROLE_NAME[SLOT(c->entry, i).role];
        if (c->off[i] < 0) n += snprintf(buf + n, size - (size_t)n, " %s=NULL", name);
        else n += snprintf(buf + n, size - (size_t)n, " %s=@%lld", name, (long long)c->off[i]);
    }
    used = n > 0 ? (size_t)n : 0;
    if (used < size) snprintf(buf + used, size - used, ") [%s]", c->what);
}

static void mask_names(unsigned mask, char *buf, size_t size)
{
    int s;
    size_t used = 0;
    buf[0] = '\0';
    for (s = 0; s < NSTATUS; ++s)
        if ((mask & BIT(s)) && used < size)
            used += (size_t)snprintf(buf + used, size - used, "%s%s", used ? "|" : "",
                                     fastnorm_status_string((fastnorm_status)s) + 9);
    if (!mask) snprintf(buf, size, "-");
}

static void failure(long index, const call *c, const model *m, fastnorm_status st, const char *fmt, ...)
    __attribute__((format(printf, 5, 6)));
static void failure(long index, const call *c, const model *m, fastnorm_status st, const char *fmt, ...)
{
    char desc[2048], def[128], pos[128];
    va_list args;
    ++g_fail;
    describe(c, desc, sizeof desc);
    mask_names(m->definite, def, sizeof def);
    mask_names(m->possible, pos, sizeof pos);
    fprintf(stderr,
            "FAIL call %ld (seed %llu; replay: fuzz --seed %llu --first %ld --calls 1 --verbose): ", index,
            (unsigned long long)g_seed, (unsigned long long)g_seed, index);
    va_start(args, fmt);
    vfprintf(stderr, fmt, args);
    va_end(args);
    fprintf(stderr, "\n  call: %s\n  returned %s (\"%s\"); expected %s, also acceptable %s\n", desc,
            fastnorm_status_string(st), fastnorm_last_error(), m->definite ? def : "FASTNORM_OK", pos);
}

/* The call, its buffers in the argument order of fastnorm.h (that of the slot tables). */
static fastnorm_status invoke(const call *c)
{
    void *p[MAX_SLOTS];
    const fastnorm_desc *dp = c->desc_null ? NULL : g_desc;
    int i;
    for (i = 0; i < MAX_SLOTS; ++i)
        p[i] = i < nslots(c->entry) && c->off[i] >= 0 ? (void *)(g_arena + c->off[i]) : NULL;
    switch (c->entry) {
    case FWD: return fastnorm_forward_training(dp, p[0], p[1], p[2], p[3], p[4], p[5]);
    case INF: return fastnorm_forward_inference(dp, p[0], p[1], p[2], p[3], p[4], p[5]);
    case BWD: return fastnorm_backward(dp, p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7]);
    case FWD_FUSED: return fastnorm_forward_training_fused(dp, p[0], p[1], p[2], p[3], p[4], p[5], p[6]);
    case INF_FUSED: return fastnorm_forward_inference_fused(dp, p[0], p[1], p[2], p[3], p[4], p[5], p[6]);
    case BWD_FUSED:
        return fastnorm_backward_fused(dp, p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7], p[8], p[9], p[10]);
    case SKIP_FWD:
        return fastnorm_skip_forward_training(dp, p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7], p[8]);
    case SKIP_BWD:
        return fastnorm_skip_backward(dp, p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7], p[8], p[9]);
    case BATCH_STATS: return fastnorm_batch_stats(dp, p[0], p[1], p[2], p[3]);
    case MERGE: return fastnorm_merge_stats(c->ranks, c->channels, p[0], p[1], p[2], p[3], p[4], p[5]);
    case BWD_REDUCE: return fastnorm_backward_reduce(dp, p[0], p[1], p[2], p[3], p[4], p[5]);
    case BWD_APPLY:
        return fastnorm_backward_apply(dp, p[0], p[1], p[2], p[3], p[4], p[5], p[6], c->count, p[7]);
    default: return fastnorm_update_running_stats(dp, p[0], p[1], c->count, c->momentum, p[2], p[3]);
    }
}

static int status_index(fastnorm_status st) { return (int)st >= 0 && (int)st < NSTATUS ? (int)st : NSTATUS; }

/* Bytes of [from, to) equal to the snapshot? */
static int unchanged(int64_t from, int64_t to)
{
    return to <= from || memcmp(g_arena + from, g_snapshot + from, (size_t)(to - from)) == 0;
}

/* fastnorm_num_stats / fastnorm_num_params on the descriptor of c. */
static void check_helpers(long index, rng *r, call *c)
{
    model m;
    int count_null = chance(r, 0.05), which = (int)below(r, 2);
    int64_t count = -12345;
    fastnorm_status st;
    if (c->entry == MERGE) return; /* no descriptor */
    run_model(c, 1, count_null, &m);
    st = which ? fastnorm_num_params(c->desc_null ? NULL : g_desc, count_null ? NULL : &count)
               : fastnorm_num_stats(c->desc_null ? NULL : g_desc, count_null ? NULL : &count);
    ++g_helpers;
    ++g_helper_count[status_index(st)];
    if (st == FASTNORM_OK) {
        if (m.definite)
            failure(index, c, &m, st, "fastnorm_%s accepted an invalid descriptor",
                    which ? "num_params" : "num_stats");
        else if (count != (which ? m.nparams : m.nstats))
            failure(index, c, &m, st, "fastnorm_%s gave %lld, expected %lld",
                    which ? "num_params" : "num_stats", (long long)count,
                    (long long)(which ? m.nparams : m.nstats));
    } else {
        if (!((m.definite | m.possible) & BIT(status_index(st))))
            failure(index, c, &m, st, "fastnorm_%s returned an unexpected status",
                    which ? "num_params" : "num_stats");
        if (count != -12345)
            failure(index, c, &m, st, "fastnorm_%s wrote its count on failure",
                    which ? "num_params" : "num_stats");
    }
}

/* dskip_bias after 16-bit data: "the column sums of dx" (fastnorm.h), of the 16-bit dx the call
   wrote (as torch's autograd sums the 16-bit gradient of h), so its reference is summed here from
   the arena; dx itself is checked against the float64 reference. */
static void dskip_bias_of_dx(const call *c, const model *m)
{
    int64_t k, p, off = c->off[slot_of(c->entry, R_DX)];
    for (p = 0; p < m->nparams; ++p) ref_[R_DSKIP_BIAS][p] = mag_[R_DSKIP_BIAS][p] = 0.0;
    for (k = 0; k < m->size; ++k) {
        double g = load(off, k, m->dtype);
        ref_[R_DSKIP_BIAS][param_of[k]] += g;
        mag_[R_DSKIP_BIAS][param_of[k]] += fabs(g);
    }
}

/*
 * The outputs of a valid call against the reference.  The tolerance of an element is
 * rtol * (mag + 1e-3 * the output's largest mag) + floor, with rtol and floor of the compute type
 * (float32 for float32 and 16-bit data: rtol 1e-5, some 80 float32 ulps of the error scale mag;
 * float64 1e-10; mean / rstd and the running statistics, float64, 1e-9, but 32 float32 eps for
 * 16-bit data, whose blocks are summed in float32: docs/guarantees.md).  A float32 / float64 output must lie
 * within it of the reference.  A 16-bit output is its float32 result rounded once to nearest even
 * (fastnorm.h), and rounding is monotonic, so it must lie in [round(want - tol), round(want + tol)]
 * in its format: exactly the correctly rounded reference when no rounding boundary lies within the
 * float32 tolerance (most elements, counted in g_exact16), else one of the two neighbours, i.e. at
 * most one 16-bit ulp (2^-7 of the value for bfloat16, 2^-10 for float16) beyond the float32
 * tolerance.  Beyond float16's range the output must be infinite (IEEE overflow from 65520 on,
 * e.g. dx of a nearly constant row with a tiny eps).
 * The split passes: their float64 statistics (mean, m2, var) as mean / rstd; sum_dy and
 * sum_dy_xhat, sums of the data's products, with the data's rtol and floor; the running statistics,
 * computed in float64 (the statistics' rtol) and rounded once to the parameter dtype, in the rounded interval
 * as 16-bit outputs are (for every parameter dtype); counts exactly.
 */
static int is_running(int role) { return role == R_RUNNING_MEAN || role == R_RUNNING_VAR; }
static int is_sum(int role) { return role == R_SUM_DY || role == R_SUM_DY_XHAT; }
static double role_rtol(const model *m, int role)
{
    if (is_running(role) || (role_class(role) == STAT && !is_sum(role)))
        return is16(m->dtype) ? 32.0 * FLT_EPSILON : 1e-9;
    return data_rtol(m->dtype);
}
static double role_floor(const model *m, int role)
{
    if (is_running(role)) return underflow_floor(FASTNORM_FLOAT64);
    return underflow_floor(role_class(role) == STAT && !is_sum(role) ? FASTNORM_FLOAT64 : m->dtype);
}

static long g_elems16, g_exact16;
static void check_values(long index, const call *c, const model *m, fastnorm_status st)
{
    int e = c->entry, i;
    if (e == SKIP_BWD && is16(m->dtype)) dskip_bias_of_dx(c, m);
    for (i = 0; i < nslots(e); ++i) {
        int role = SLOT(e, i).role, cls = role_class(role);
        int32_t dt = role_dtype(m, role);
        int64_t k, n = cls == DATA ? m->size : cls == PARAM ? m->nparams : m->nstats;
        double rtol = role_rtol(m, role), smag = 0.0;
        double tiny = role_floor(m, role);
        if (!SLOT(e, i).output || c->off[i] < 0) continue;
        if (cls == ONE) { /* a count: exact */
            int64_t got;
            memcpy(&got, g_arena + c->off[i], 8);
            if (got != g_ref_count)
                failure(index, c, m, st, "%s = %lld, expected %lld", ROLE_NAME[role], (long long)got,
                        (long long)g_ref_count);
            continue;
        }
        for (k = 0; k < n; ++k)
            if (mag_[role][k] > smag) smag = mag_[role][k];
        for (k = 0; k < n; ++k) {
            double got = load(c->off[i], k, dt), want = ref_[role][k];
            double tol = rtol * (mag_[role][k] + 1e-3 * smag) + tiny, lo = want - tol, hi = want + tol;
            int ok;
            if ((is16(dt) || is_running(role)) && isfinite(want)) {
                /* 16-bit running statistics are rounded to float32 first, as every 16-bit store
                   (fastnorm.h, fastnorm_update_running_stats); rounding is monotone either way */
                if (is_running(role) && is16(dt)) {
                    lo = (double)(float)lo;
                    hi = (double)(float)hi;
                }
                lo = round_to(lo, dt);
                hi = round_to(hi, dt);
                if (is16(dt)) {
                    ++g_elems16;
                    g_exact16 += lo == hi;
                }
            }
            /* a non-finite reference: dskip_bias of an infinite (overflowed float16) dx */
            ok = isfinite(want) ? got >= lo && got <= hi : got == want || (isnan(want) && isnan(got));
            if (!ok) {
                failure(index, c, m, st, "%s[%lld] = %.17g, reference %.17g (tolerance %.3g: %.17g .. %.17g)",
                        ROLE_NAME[role], (long long)k, got, want, tol, lo, hi);
                break;
            }
        }
    }
}

/* The entry point of a call: each of those before 0.6 1 / 10 of the calls, each split pass 1 / 25. */
static int pick_entry(rng *r)
{
    int u = (int)below(r, 100);
    return u < 10 * NENTRY_OLD ? u / 10 : NENTRY_OLD + (u - 10 * NENTRY_OLD) / 4;
}

static void run_call(long index, int *previous_invalid)
{
    rng r;
    call c;
    model m;
    int e, ns, i, j, valid, checked = 0, forced = 0;
    double mode;
    fastnorm_status st;
    fastnorm_desc before;

    r.s = g_seed * 0xD1B54A32D192ED03ull + (uint64_t)index * 0x9E3779B97F4A7C15ull + 1;
    (void)next_u64(&r);
    memset(&c, 0, sizeof c);
    c.entry = e = pick_entry(&r);
    ns = nslots(e);
    mode = uniform(&r);
    if (mode < 0.85) {
        if (e == MERGE) gen_valid_merge(&r, &c);
        else gen_valid_desc(&r, e, &c.d);
        place_valid(&r, &c);
        gen_valid_scalars(&r, &c);
        if (mode >= 0.3) {
            int k, nm = 1 + (int)below(&r, 3);
            for (k = 0; k < nm; ++k) mutate(&r, &c);
        } else {
            note(&c, "valid");
        }
    } else {
        gen_random(&r, &c);
    }
    run_model(&c, 0, 0, &m);
    /* Never let the kernels run on buffers the arena does not hold. */
    while (m.definite == 0 && !m.backed) {
        int req[MAX_SLOTS], nreq = 0;
        for (i = 0; i < ns; ++i)
            if (SLOT(e, i).required) req[nreq++] = i;
        i = req[below(&r, nreq)];
        c.off[i] = -1;
        note(&c, "forced %s=NULL", ROLE_NAME[SLOT(e, i).role]);
        forced = 1;
        run_model(&c, 0, 0, &m);
    }
    g_forced += forced;
    valid = m.definite == 0;

    /* outputs: sentinel (the part inside the arena) */
    for (i = 0; i < ns; ++i) {
        int64_t len;
        if (!SLOT(e, i).output || c.off[i] < 0) continue;
        len = m.geom_ok ? m.bytes[i] : 64;
        if (len > ARENA - c.off[i]) len = ARENA - c.off[i];
        memset(g_arena + c.off[i], SENTINEL, (size_t)len);
    }
    if (e == MERGE) write_counts(&c); /* what run_model_merge assumed (prepare_split writes them again) */
    if (valid) checked = e >= BATCH_STATS ? prepare_split(&r, &c, &m) : prepare_valid(&r, &c, &m);
    if (!c.desc_null) *g_desc = c.d;
    before = *g_desc;
    memcpy(g_snapshot, g_arena, ARENA + GUARD);

    st = invoke(&c);
    ++g_calls;
    ++g_count[e][status_index(st)];
    if (__builtin_popcount(m.definite | m.possible) == 1) ++g_single;
    if (g_verbose) {
        char desc[2048];
        describe(&c, desc, sizeof desc);
        printf("call %ld: %s -> %s\n", index, desc, fastnorm_status_string(st));
    }
    if (memcmp(&before, g_desc, sizeof before) != 0)
        failure(index, &c, &m, st, "the descriptor was modified");

    if (!valid) {
        unsigned bit = BIT(status_index(st));
        if (st == FASTNORM_OK || !((m.definite | m.possible) & bit))
            failure(index, &c, &m, st, "wrong status for an invalid call");
        if (!unchanged(0, ARENA + GUARD)) {
            for (j = 0; j < ARENA + GUARD && g_arena[j] == g_snapshot[j]; ++j) continue;
            failure(index, &c, &m, st,
                    "an invalid call wrote to the buffers (first changed byte at arena offset %d)", j);
        }
        if (fastnorm_last_error()[0] == '\0')
            failure(index, &c, &m, st, "no message from fastnorm_last_error()");
        else if (st == FASTNORM_UNSUPPORTED && m.unsup_field && !strstr(fastnorm_last_error(), m.unsup_field))
            failure(index, &c, &m, st, "the message does not name %s", m.unsup_field);
        *previous_invalid = 1;
    } else {
        int64_t lo[MAX_SLOTS], hi[MAX_SLOTS], cursor = 0;
        int no = 0;
        ++g_valid;
        ++g_valid_dtype[m.dtype];
        if (*previous_invalid) ++g_after_invalid;
        *previous_invalid = 0;
        if (st != FASTNORM_OK) {
            failure(index, &c, &m, st, "a valid call failed");
        } else {
            /* nothing outside the outputs changed (inputs, gaps, guard bytes) */
            for (i = 0; i < ns; ++i)
                if (SLOT(e, i).output && c.off[i] >= 0) {
                    lo[no] = c.off[i];
                    hi[no++] = c.off[i] + m.bytes[i];
                }
            for (i = 0; i < no; ++i) /* sort by start */
                for (j = i + 1; j < no; ++j)
                    if (lo[j] < lo[i]) {
                        int64_t t = lo[i];
                        lo[i] = lo[j];
                        lo[j] = t;
                        t = hi[i];
                        hi[i] = hi[j];
                        hi[j] = t;
                    }
            for (i = 0; i < no; ++i) {
                if (!unchanged(cursor, lo[i]))
                    failure(index, &c, &m, st, "bytes before %lld changed", (long long)lo[i]);
                if (hi[i] > cursor) cursor = hi[i];
            }
            if (!unchanged(cursor, ARENA + GUARD))
                failure(index, &c, &m, st, "bytes after the outputs (from %lld) changed", (long long)cursor);
            if (checked) {
                check_values(index, &c, &m, st);
                ++g_checked;
                ++g_checked_entry[e];
                ++g_checked_dtype[m.dtype];
                g_checked_mixed += is16(m.dtype) && m.pdtype == FASTNORM_FLOAT32;
            } else {
                ++g_unchecked;
            }
        }
    }
    check_helpers(index, &r, &c);
}

static void print_counts(const char *what, long total, const long *count)
{
    int s;
    printf("fuzz: %s: %ld calls:", what, total);
    for (s = 0; s <= NSTATUS; ++s)
        if (count[s])
            printf(" %s=%ld", s < NSTATUS ? fastnorm_status_string((fastnorm_status)s) : "other", count[s]);
    printf("\n");
}

/*
 * The harness's own 16-bit conversions, before they judge the library: every bit pattern decodes,
 * is a fixed point of the rounding and encodes back (a NaN to the canonical quiet NaN with its
 * sign); the midpoint of every two neighbours rounds to the even one (above the largest finite
 * value: to infinity); float32 values (random bits, exponents around float16's range, ties among
 * them) round to bfloat16 as the library's rule does (add 0x7FFF plus the lowest kept bit, drop 16
 * bits: fastnorm/_kernels/storage.py) and, where the compiler has _Float16, to float16 as it does.
 */
static void check_conversions(void)
{
    long bad = 0, n = 0, i;
    int f16_compiler = 0;
    rng r = {20260505u};
    for (i = 0; i < 65536; ++i) {
        uint16_t u = (uint16_t)i, sign = u & 0x8000;
        double f = f16_value(u), g = bf16_value(u);
        if (isnan(f) ? f16_bits(f) != (sign | 0x7E00) : f16_bits(f) != u || round_f16(f) != f) ++bad;
        if (isnan(g) ? bf16_bits(g) != (sign | 0x7FC0) : bf16_bits(g) != u || round_bf16(g) != g) ++bad;
        if (u < 0x7C00) { /* finite positive float16: the midpoint to the next one up */
            double up = u == 0x7BFF ? 65536.0 : f16_value((uint16_t)(u + 1)), mid = (f + up) / 2.0;
            double want = u & 1 ? (u == 0x7BFF ? INFINITY : up) : f;
            if (round_f16(mid) != want || round_f16(-mid) != -want) ++bad;
        }
        if (u < 0x7F80) { /* finite positive bfloat16 */
            double up = u == 0x7F7F ? ldexp(1.0, 128) : bf16_value((uint16_t)(u + 1)), mid = (g + up) / 2.0;
            double want = u & 1 ? (u == 0x7F7F ? INFINITY : up) : g;
            if (round_bf16(mid) != want || round_bf16(-mid) != -want) ++bad;
        }
        n += 4;
    }
    for (i = 0; i < 400000; ++i) {
        uint32_t x = (uint32_t)next_u64(&r);
        float f;
        if (i % 2) x = (x & 0x807FFFFFu) | (uint32_t)(127 - 30 + below(&r, 48)) << 23; /* 2^-30 .. 2^17 */
        if (i % 4 == 1) x &= ~(uint32_t)0xFFF; /* a tie (or exact) in float16 one time in two */
        memcpy(&f, &x, 4);
        if (isnan(f)) continue;
        if (bf16_bits(round_bf16(f)) != (uint16_t)((x + 0x7FFFu + ((x >> 16) & 1u)) >> 16)) ++bad;
#if defined(__FLT16_MAX__)
        {
            _Float16 h = (_Float16)f;
            uint16_t hb;
            memcpy(&hb, &h, 2);
            if (f16_bits(round_f16(f)) != hb) ++bad;
            f16_compiler = 1;
        }
#endif
        n += 1 + f16_compiler;
    }
    printf("fuzz: 16-bit conversions: %ld checks%s, %ld wrong\n", n,
           f16_compiler ? " (float16 also against the compiler's _Float16)" : "", bad);
    if (bad) {
        ++g_fail;
        fprintf(stderr, "FAIL the harness's 16-bit conversions are wrong (%ld checks)\n", bad);
    }
}

int main(int argc, char **argv)
{
    static const char *ACTIVATION_NAME[NACTIVATION] = {"NONE", "RELU", "LEAKY_RELU", "SIGMOID",
                                                       "TANH", "SILU", "GELU",       "GELU_TANH"};
    static const char *DTYPE_NAME[] = {"-", "float32", "float64", "float16", "bfloat16"};
    long calls = DEFAULT_CALLS, first = 0, i;
    int e, s, previous_invalid = 0;
    fastnorm_status st;

    g_seed = DEFAULT_SEED;
    for (i = 1; i < argc; ++i) {
        if (strcmp(argv[i], "--seed") == 0 && i + 1 < argc) g_seed = strtoull(argv[++i], NULL, 0);
        else if (strcmp(argv[i], "--calls") == 0 && i + 1 < argc) calls = strtol(argv[++i], NULL, 0);
        else if (strcmp(argv[i], "--first") == 0 && i + 1 < argc) first = strtol(argv[++i], NULL, 0);
        else if (strcmp(argv[i], "--verbose") == 0) g_verbose = 1;
        else {
            fprintf(stderr, "usage: %s [--seed S] [--calls N] [--first K] [--verbose]\n", argv[0]);
            return 2;
        }
    }
    g_arena = xmalloc(ARENA + GUARD);
    g_snapshot = xmalloc(ARENA + GUARD);
    g_desc = malloc(sizeof *g_desc); /* exact size: ASan flags reads past the struct */
    if (g_desc == NULL) return 2;
    memset(g_desc, 0, sizeof *g_desc);
    {
        rng r = {g_seed};
        for (i = 0; i < ARENA + GUARD; ++i) g_arena[i] = (unsigned char)next_u64(&r);
    }
    printf("fuzz: seed=%llu calls=%ld first=%ld\n", (unsigned long long)g_seed, calls, first);
    fflush(stdout);
    check_conversions();
    if ((st = fastnorm_init()) != FASTNORM_OK) {
        fprintf(stderr, "fastnorm_init: %s: %s\n", fastnorm_status_string(st), fastnorm_last_error());
        return 1;
    }
    for (i = first; i < first + calls && g_fail < MAX_FAILURES; ++i) run_call(i, &previous_invalid);

    for (e = 0; e < NENTRY; ++e) {
        long total = 0;
        for (s = 0; s <= NSTATUS; ++s) total += g_count[e][s];
        print_counts(ENTRY[e].name, total, g_count[e]);
    }
    print_counts("num_stats/num_params", g_helpers, g_helper_count);
    printf("fuzz: checked per entry point:");
    for (e = 0; e < NENTRY; ++e) printf(" %s=%ld", ENTRY[e].name, g_checked_entry[e]);
    printf(" (merge_stats with NaN moments at a rank of count 0: %ld)\n", g_merge_nan);
    printf(
        "fuzz: valid=%ld (checked against the reference %ld, not checked: unusual inputs such as aliased "
        "across types or z at ReLU's kink %ld, right after an invalid call %ld) invalid=%ld (one acceptable "
        "status %ld, forced NULL %ld)\n",
        g_valid, g_checked, g_unchecked, g_after_invalid, g_calls - g_valid, g_single, g_forced);
    printf("fuzz: checked per activation:");
    for (s = 0; s < NACTIVATION; ++s) printf(" %s=%ld", ACTIVATION_NAME[s], g_checked_act[s]);
    printf(" (backward at (leaky) ReLU's kink: z == 0 exactly %ld, too close to 0 to check %ld)\n",
           g_zero_kink, g_kink);
    printf("fuzz: valid per dtype (checked against the reference):");
    for (s = FASTNORM_FLOAT32; s <= FASTNORM_BFLOAT16; ++s)
        printf(" %s=%ld (%ld)", DTYPE_NAME[s], g_valid_dtype[s], g_checked_dtype[s]);
    printf("; 16-bit data with float32 parameters checked %ld; 16-bit output elements checked %ld, "
           "exactly (the reference correctly rounded) %ld\n",
           g_checked_mixed, g_elems16, g_exact16);
    printf("fuzz: seed=%llu calls=%ld failures=%d\n", (unsigned long long)g_seed, g_calls, g_fail);
    free(g_arena);
    free(g_snapshot);
    free(g_desc);
    return g_fail ? 1 : 0;
}
