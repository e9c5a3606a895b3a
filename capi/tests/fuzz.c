/*
 * fuzz: random calls of the three compute entry points of the C ABI
 * (fastnorm_forward_training, fastnorm_forward_inference, fastnorm_backward)
 * with random descriptors (struct_size included), NULL / misaligned /
 * aliased / overlapping buffers, plus fastnorm_num_stats /
 * fastnorm_num_params on the same descriptors.
 *
 * For every call the harness derives the acceptable statuses from the rules of
 * fastnorm.h / docs/c-api.md alone (its own model, not the library's code):
 *   - "definite": one status per rule the call violates.  If the call violates
 *     no rule it must return FASTNORM_OK; otherwise it must return the status
 *     of one of the violated rules (the docs do not fix a precedence).
 *   - "possible": statuses the docs leave open (e.g. a rule that depends on a
 *     field that is itself invalid, or float32 tensors whose element count
 *     times 8 -- but not times 4 -- overflows int64: the library bounds every
 *     buffer's byte size conservatively).  Accepted, never required.
 * Invalid calls must leave the whole buffer arena (sentinel-filled outputs,
 * inputs, guard bytes) and the descriptor untouched and set a message.  Valid
 * calls (small tensors) must return FASTNORM_OK, write nothing outside their
 * outputs, and match a double-precision reference computed here.
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
#define MAX_ELEMS (ARENA / 4)
#define SENTINEL 0xA5
#define MAX_FAILURES 20
#define DEFAULT_SEED 20261124ull
#define DEFAULT_CALLS 120000L

enum { FWD = 0, INF = 1, BWD = 2, NENTRY = 3 };
enum { DATA = 0, PARAM = 1, STAT = 2 };
#define NSTATUS 9
#define BIT(s) (1u << (unsigned)(s))
#define INV BIT(FASTNORM_INVALID_ARGUMENT)
#define UNSUP BIT(FASTNORM_UNSUPPORTED)
#define NUL BIT(FASTNORM_NULL_POINTER)
#define OVF BIT(FASTNORM_SIZE_OVERFLOW)
#define OVL BIT(FASTNORM_OVERLAP)
#define VMM BIT(FASTNORM_VERSION_MISMATCH)

typedef struct slot_info {
    const char *name;
    int cls;
    int output;
    int required;
} slot_info;

/* Buffer arguments of each entry point, in the harness's own order (that of the 0.1
   API); invoke() passes them in the argument order of fastnorm.h. */
static const slot_info SLOTS[NENTRY][8] = {
    {{"x", DATA, 0, 1},
     {"weight", PARAM, 0, 0},
     {"bias", PARAM, 0, 0},
     {"y", DATA, 1, 1},
     {"mean", STAT, 1, 1},
     {"rstd", STAT, 1, 1}},
    {{"x", DATA, 0, 1},
     {"mean", STAT, 0, 1},
     {"rstd", STAT, 0, 1},
     {"weight", PARAM, 0, 0},
     {"bias", PARAM, 0, 0},
     {"y", DATA, 1, 1}},
    {{"dy", DATA, 0, 1},
     {"x", DATA, 0, 1},
     {"mean", STAT, 0, 1},
     {"rstd", STAT, 0, 1},
     {"weight", PARAM, 0, 0},
     {"dx", DATA, 1, 1},
     {"dweight", PARAM, 1, 0},
     {"dbias", PARAM, 1, 0}},
};
static const int NSLOTS[NENTRY] = {6, 6, 8};
static const char *ENTRY_NAME[NENTRY] = {"forward_training", "forward_inference", "backward"};

/* Documented exact aliases: (output slot, input slot). */
static int allowed_alias(int e, int o, int b)
{
    if (e == FWD) return o == 3 && b == 0;
    if (e == INF) return o == 5 && b == 0;
    return o == 5 && (b == 0 || b == 1);
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
    int64_t off[8]; /* offset of each buffer in the arena, -1 = NULL */
    char what[512]; /* how the call was made (for failure messages) */
} call;

typedef struct model {
    unsigned definite, possible;
    int geom_ok, backed;
    int kind, layout;
    int64_t itemsize, size, nparams, nstats, N, C, S, G, K;
    int64_t bytes[8];
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

static int ranges_overlap(int64_t a, int64_t abytes, int64_t b, int64_t bbytes)
{
    uint64_t a0 = (uint64_t)a, b0 = (uint64_t)b;
    return a0 < b0 + (uint64_t)bbytes && b0 < a0 + (uint64_t)abytes;
}

/*
 * The rules of docs/c-api.md, checked independently.  desc_only: the rules of
 * fastnorm_num_stats / fastnorm_num_params (descriptor only, not training;
 * count_null: their count pointer is NULL).
 */
static void run_model(const call *c, int desc_only, int count_null, model *m)
{
    const fastnorm_desc *d = &c->d;
    int e = c->entry, ns = NSLOTS[e], i, o, b;
    int training = !desc_only && e != INF;
    int kind_ok, lnlike, layout_ok, rank_ok = 0, dims_ok = 0;
    unsigned def = 0, pos = 0;

    memset(m, 0, sizeof *m);
    if (desc_only) {
        if (count_null) def |= NUL;
    } else {
        for (i = 0; i < ns; ++i)
            if (SLOTS[e][i].required && c->off[i] < 0) def |= NUL;
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
    /* The library knows two descriptor sizes, 0.2's and 0.3's: others are invalid, larger ones a
       newer header's.  A 0.2 descriptor's epilogue fields are not read (they get their defaults). */
    if (d->struct_size != sizeof(fastnorm_desc) && d->struct_size != DESC_SIZE_0_2)
        def |= d->struct_size < sizeof(fastnorm_desc) ? INV : VMM;
    else if (d->struct_size == sizeof(fastnorm_desc)) {
        int act_ok = d->activation >= FASTNORM_ACTIVATION_NONE && d->activation <= FASTNORM_GELU_TANH;
        if (!act_ok || d->reserved != 0 || !isfinite(d->negative_slope)) def |= INV;
        /* fastnorm_backward refuses an activation (its backward is fastnorm_backward_fused) */
        if (act_ok && d->activation != FASTNORM_ACTIVATION_NONE && !desc_only && e == BWD) def |= INV;
    }
    kind_ok = d->kind >= FASTNORM_BATCH_NORM && d->kind <= FASTNORM_RMS_NORM;
    lnlike = d->kind == FASTNORM_LAYER_NORM || d->kind == FASTNORM_RMS_NORM;
    if (!kind_ok) def |= INV;
    switch (d->dtype) {
    case FASTNORM_FLOAT32: m->itemsize = 4; break;
    case FASTNORM_FLOAT64: m->itemsize = 8; break;
    case FASTNORM_FLOAT16:
    case FASTNORM_BFLOAT16: def |= UNSUP; break;
    default: def |= INV; break;
    }
    if (d->param_dtype != FASTNORM_DTYPE_DEFAULT && d->param_dtype != d->dtype) {
        int pd_known = d->param_dtype >= FASTNORM_FLOAT32 && d->param_dtype <= FASTNORM_BFLOAT16;
        if (!pd_known) def |= INV; /* unknown enum value */
        else if (d->dtype >= FASTNORM_FLOAT32 && d->dtype <= FASTNORM_BFLOAT16) def |= UNSUP; /* mixed */
        else pos |= UNSUP; /* "different" from an unknown dtype */
    }
    layout_ok = d->layout == FASTNORM_CHANNELS_FIRST || d->layout == FASTNORM_CHANNELS_LAST;
    if (!layout_ok) def |= INV;
    if (d->flags != 0) def |= UNSUP;
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
            over_item = over || (m->itemsize ? prod > INT64_MAX / m->itemsize : over8);
            if (kind_ok && rank_ok && m->itemsize) {
                if (over_item) def |= OVF;  /* a data buffer's byte size overflows */
                else if (over8) pos |= OVF; /* float32: only count * 8 overflows */
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
    if (!desc_only) {
        for (i = 0; i < ns; ++i) {
            if (c->off[i] < 0) continue;
            if (SLOTS[e][i].cls == STAT) {
                if (c->off[i] % 8 != 0) def |= INV;
            } else if (m->itemsize) {
                if (c->off[i] % m->itemsize != 0) def |= INV;
            } else if (c->off[i] % 8 != 0) {
                pos |= INV;
            }
        }
        if (m->geom_ok) {
            m->backed = 1;
            for (i = 0; i < ns; ++i) {
                int cls = SLOTS[e][i].cls;
                m->bytes[i] = cls == DATA ? m->size * m->itemsize
                    : cls == PARAM        ? m->nparams * m->itemsize
                                          : m->nstats * 8;
                if (c->off[i] >= 0 && m->bytes[i] > ARENA - c->off[i]) m->backed = 0;
            }
            for (o = 0; o < ns; ++o) {
                if (!SLOTS[e][o].output || c->off[o] < 0) continue;
                for (b = 0; b < ns; ++b) {
                    if (b == o || c->off[b] < 0) continue;
                    if (!ranges_overlap(c->off[o], m->bytes[o], c->off[b], m->bytes[b])) continue;
                    if (allowed_alias(e, o, b) && c->off[o] == c->off[b]) continue;
                    def |= OVL;
                }
            }
        } else {
            for (o = 0; o < ns; ++o) {
                if (!SLOTS[e][o].output || c->off[o] < 0) continue;
                for (b = 0; b < ns; ++b)
                    if (b != o && c->off[b] == c->off[o] && !allowed_alias(e, o, b)) pos |= OVL;
            }
        }
    }
    m->definite = def;
    m->possible = pos & ~def;
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

/* A small valid descriptor for entry point e. */
static void gen_valid_desc(rng *r, int e, fastnorm_desc *d)
{
    int kind = 1 + (int)below(r, 5), i;
    memset(d, 0, sizeof *d);
    d->struct_size = sizeof *d;
    d->kind = kind;
    d->dtype = 1 + (int)below(r, 2);
    d->param_dtype = chance(r, 0.5) ? 0 : d->dtype;
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
        if (e != INF && kind == FASTNORM_BATCH_NORM && d->dims[0] * s == 1) d->dims[0] = 2;
        if (e != INF && kind == FASTNORM_INSTANCE_NORM && s == 1) {
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
}

/* Place the buffers of a valid call: disjoint, aligned, inside the arena,
   some optional ones NULL, some documented exact aliases. */
static void place_valid(rng *r, call *c)
{
    int e = c->entry, ns = NSLOTS[e], i, j, alias[8], order[8], n = 0;
    int64_t cursor, last_end = 0;
    model m;
    for (i = 0; i < ns; ++i) {
        c->off[i] = 0;
        alias[i] = -1;
    }
    run_model(c, 0, 0, &m);
    for (i = 0; i < ns; ++i)
        if (!SLOTS[e][i].required && chance(r, 0.25)) c->off[i] = -1;
    if (e == FWD || e == INF) {
        int y = e == FWD ? 3 : 5, w = e == FWD ? 1 : 3;
        if (chance(r, 0.2)) alias[y] = 0, note(c, "y==x");
        if (c->off[w] >= 0 && c->off[w + 1] >= 0 && chance(r, 0.05))
            alias[w + 1] = w, note(c, "bias==weight");
    } else {
        double u = uniform(r);
        if (u < 0.15) alias[5] = 0, note(c, "dx==dy");
        else if (u < 0.3) alias[5] = 1, note(c, "dx==x");
        if (chance(r, 0.05)) alias[0] = 1, note(c, "dy==x");
    }
    if (e != FWD && chance(r, 0.05)) alias[e == INF ? 2 : 3] = e == INF ? 1 : 2, note(c, "rstd==mean");
    for (i = 0; i < ns; ++i)
        if (c->off[i] >= 0 && alias[i] < 0) order[n++] = i;
    for (i = n - 1; i > 0; --i) {
        int k = (int)below(r, i + 1), t = order[i];
        order[i] = order[k];
        order[k] = t;
    }
    cursor = 8 * below(r, 8);
    for (j = 0; j < n; ++j) {
        i = order[j];
        cursor = (cursor + 7) / 8 * 8;
        if (SLOTS[e][i].cls != STAT && m.itemsize == 4 && chance(r, 0.3)) cursor += 4; /* 4-aligned only */
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
    for (i = 0; i < ns; ++i)
        if (alias[i] >= 0) c->off[i] = c->off[alias[i]];
}

/* a + b with wrap-around (no signed overflow in the harness itself) */
static int64_t wrap_add(int64_t a, int64_t b) { return (int64_t)((uint64_t)a + (uint64_t)b); }

static int64_t clamp_off(int64_t v)
{
    if (v < 0) return 0;
    if (v > ARENA) return ARENA;
    return v;
}

static void mutate(rng *r, call *c)
{
    fastnorm_desc *d = &c->d;
    int e = c->entry, ns = NSLOTS[e], i, k;
    int rank_idx = d->rank >= 1 && d->rank <= FASTNORM_MAX_RANK ? d->rank : FASTNORM_MAX_RANK;
    switch (below(r, 21)) {
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
        if (below(r, 8) == 0) {
            c->desc_null = 1;
            note(c, "desc=NULL");
        } else {
            i = (int)below(r, ns);
            c->off[i] = -1;
            note(c, "%s=NULL", SLOTS[e][i].name);
        }
        break;
    case 14:
        i = (int)below(r, ns);
        if (c->off[i] >= 0) {
            c->off[i] = clamp_off(c->off[i] + 1 + below(r, 7));
            note(c, "%s misaligned", SLOTS[e][i].name);
        }
        break;
    case 15: { /* an output (or any buffer) at / near another one */
        int o = (int)below(r, ns), b = (int)below(r, ns);
        if (chance(r, 0.7)) {
            int outs[3], no = 0;
            for (k = 0; k < ns; ++k)
                if (SLOTS[e][k].output) outs[no++] = k;
            o = outs[below(r, no)];
        }
        if (o == b || c->off[b] < 0) break;
        c->off[o] = clamp_off(c->off[b] + (chance(r, 0.4) ? 0 : 4 * (below(r, 9) - 4)));
        note(c, "%s=%s%+lld", SLOTS[e][o].name, SLOTS[e][b].name, (long long)(c->off[o] - c->off[b]));
        break;
    }
    case 16: {
        int a = (int)below(r, ns), b = (int)below(r, ns);
        int64_t t = c->off[a];
        c->off[a] = c->off[b];
        c->off[b] = t;
        note(c, "swap(%s,%s)", SLOTS[e][a].name, SLOTS[e][b].name);
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
        note(c, "%s@%lld", SLOTS[e][i].name, (long long)c->off[i]);
        break;
    case 19:
        d->struct_size = PICK(r, STRUCT_SIZE_POOL);
        note(c, "struct_size=%lu", (unsigned long)d->struct_size);
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
    c->desc_null = below(r, 50) == 0;
    for (i = 0; i < NSLOTS[c->entry]; ++i) {
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

static double load(int64_t off, int64_t i, int64_t itemsize)
{
    if (itemsize == 4) {
        float f;
        memcpy(&f, g_arena + off + 4 * i, 4);
        return f;
    } else {
        double v;
        memcpy(&v, g_arena + off + 8 * i, 8);
        return v;
    }
}

static void store(int64_t off, int64_t i, int64_t itemsize, double v)
{
    if (itemsize == 4) {
        float f = (float)v;
        memcpy(g_arena + off + 4 * i, &f, 4);
    } else {
        memcpy(g_arena + off + 8 * i, &v, 8);
    }
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

static double x_[MAX_ELEMS], dy_[MAX_ELEMS], w_[MAX_ELEMS], b_[MAX_ELEMS], mean_[MAX_ELEMS], rstd_[MAX_ELEMS];
/* references and their error scales (sum of the magnitudes of the terms) */
static double ref_[3][MAX_ELEMS], mag_[3][MAX_ELEMS];
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

typedef struct checked_output {
    int slot;    /* slot index */
    int is_stat; /* doubles */
    int64_t n;
    int which; /* row of ref_ / mag_ */
} checked_output;

static int all_reasonable(const double *v, int64_t n)
{
    int64_t i;
    for (i = 0; i < n; ++i)
        if (!isfinite(v[i]) || fabs(v[i]) > 1e6) return 0;
    return 1;
}

/*
 * Valid call: fill the inputs with values (outputs: sentinel), compute the
 * reference from the arena contents the library will see.  Returns the
 * number of outputs to compare (0: inputs unusual, e.g. aliased across types,
 * status and untouched bytes are still checked).
 */
static int prepare_valid(rng *r, call *c, const model *m, checked_output *outs)
{
    int e = c->entry, ns = NSLOTS[e], i, nout = 0;
    int64_t k, s, p, isz = m->itemsize, n = m->size, np = m->nparams, nst = m->nstats;
    int64_t group = n / nst;
    int rms = m->kind == FASTNORM_RMS_NORM;
    double min_var, one = 1.0;
    const int64_t *o = c->off;

    for (k = 0; k < n; ++k) index_map(m, k, &stat_of[k], &param_of[k]);
    /* inputs, in argument order (aliased inputs share values) */
    for (i = 0; i < ns; ++i) {
        const char *name = SLOTS[e][i].name;
        if (SLOTS[e][i].output || o[i] < 0) continue;
        if (SLOTS[e][i].cls == DATA) {
            double amp = name[0] == 'd' ? 1.0 : 2.0;
            for (k = 0; k < n; ++k) store(o[i], k, isz, between(r, -amp, amp));
        } else if (SLOTS[e][i].cls == PARAM) {
            double amp = name[0] == 'w' ? 1.5 : 1.0;
            for (k = 0; k < np; ++k) store(o[i], k, isz, between(r, -amp, amp));
        } else if (e == INF) {
            int is_rstd = name[0] == 'r';
            for (k = 0; k < nst; ++k)
                store(o[i], k, 8, is_rstd ? between(r, 0.25, 4.0) : between(r, -1.0, 1.0));
        }
    }
    if (e != INF) { /* statistics of x; eps 0 with a zero variance would give inf */
        int xs = e == FWD ? 0 : 1;
        for (k = 0; k < n; ++k) x_[k] = load(o[xs], k, isz);
        reference_stats(m, c->d.eps, mean_, rstd_, &min_var);
        if (!(min_var + c->d.eps > 0.0)) {
            c->d.eps = 1e-5;
            note(c, "eps->1e-5");
            reference_stats(m, c->d.eps, mean_, rstd_, &min_var);
        }
        if (e == BWD) {
            for (s = 0; s < nst; ++s) store(o[2], s, 8, mean_[s]);
            for (s = 0; s < nst; ++s) store(o[3], s, 8, rstd_[s]);
        }
    }
    /* read back what the library will read */
    {
        int xs = e == BWD ? 1 : 0,
            ws = e == FWD ? 1
            : e == INF    ? 3
                          : 4,
            bs = e == FWD ? 2
            : e == INF    ? 4
                          : -1;
        for (k = 0; k < n; ++k) x_[k] = load(o[xs], k, isz);
        if (e == BWD)
            for (k = 0; k < n; ++k) dy_[k] = load(o[0], k, isz);
        for (k = 0; k < np; ++k) w_[k] = o[ws] >= 0 ? load(o[ws], k, isz) : one;
        for (k = 0; k < np; ++k) b_[k] = bs >= 0 && o[bs] >= 0 ? load(o[bs], k, isz) : 0.0;
        if (e != FWD) {
            int ms = e == INF ? 1 : 2;
            for (s = 0; s < nst; ++s) mean_[s] = load(o[ms], s, 8);
            for (s = 0; s < nst; ++s) rstd_[s] = load(o[ms + 1], s, 8);
        }
        if (!all_reasonable(x_, n) || !all_reasonable(w_, np) || !all_reasonable(b_, np)
            || !all_reasonable(mean_, nst) || !all_reasonable(rstd_, nst)
            || (e == BWD && !all_reasonable(dy_, n)))
            return 0;
        if (e == BWD && rms)
            for (s = 0; s < nst; ++s)
                if (mean_[s] != 0.0) return 0; /* the RMSNorm backward's use of mean is not documented */
    }
    if (e == FWD || e == INF) {
        for (k = 0; k < n; ++k) {
            double mu = rms ? 0.0 : mean_[stat_of[k]], sc = rstd_[stat_of[k]] * w_[param_of[k]];
            ref_[0][k] = (x_[k] - mu) * sc + b_[param_of[k]];
            mag_[0][k] = (fabs(x_[k]) + fabs(mu)) * fabs(sc) + fabs(b_[param_of[k]]);
        }
        outs[nout++] = (checked_output){e == FWD ? 3 : 5, 0, n, 0};
        if (e == FWD) {
            for (s = 0; s < nst; ++s) {
                ref_[1][s] = rms ? 0.0 : mean_[s];
                mag_[1][s] = rms ? 0.0 : 2.0; /* |x| <= 2 */
                ref_[2][s] = rstd_[s];
                mag_[2][s] = rstd_[s];
            }
            outs[nout++] = (checked_output){4, 1, nst, 1};
            outs[nout++] = (checked_output){5, 1, nst, 2};
        }
        return nout;
    }
    /* backward */
    {
        static double sg[MAX_ELEMS], sgx[MAX_ELEMS], ag[MAX_ELEMS], agx[MAX_ELEMS];
        for (s = 0; s < nst; ++s) sg[s] = sgx[s] = ag[s] = agx[s] = 0.0;
        for (p = 0; p < np; ++p) ref_[1][p] = ref_[2][p] = mag_[1][p] = mag_[2][p] = 0.0;
        for (k = 0; k < n; ++k) {
            int64_t st = stat_of[k], pk = param_of[k];
            double g = w_[pk] * dy_[k], xh = (x_[k] - mean_[st]) * rstd_[st];
            sg[st] += g;
            sgx[st] += g * xh;
            ag[st] += fabs(g);
            agx[st] += fabs(g * xh);
            ref_[1][pk] += dy_[k] * xh;
            mag_[1][pk] += fabs(dy_[k] * xh);
            ref_[2][pk] += dy_[k];
            mag_[2][pk] += fabs(dy_[k]);
        }
        for (k = 0; k < n; ++k) {
            int64_t st = stat_of[k], pk = param_of[k];
            double g = w_[pk] * dy_[k], xh = (x_[k] - mean_[st]) * rstd_[st], rs = rstd_[st];
            double mg = rms ? 0.0 : sg[st] / (double)group, mgx = sgx[st] / (double)group;
            ref_[0][k] = rs * (g - mg - xh * mgx);
            mag_[0][k] = fabs(rs)
                * (fabs(g) + (rms ? 0.0 : ag[st] / (double)group) + fabs(xh) * agx[st] / (double)group);
        }
        outs[nout++] = (checked_output){5, 0, n, 0};
        if (o[6] >= 0) outs[nout++] = (checked_output){6, 0, np, 1};
        if (o[7] >= 0) outs[nout++] = (checked_output){7, 0, np, 2};
    }
    return nout;
}

/* ------------------------------------------------------------------------ */
/* Running and checking                                                      */
/* ------------------------------------------------------------------------ */

static long g_count[NENTRY][NSTATUS + 1], g_helper_count[NSTATUS + 1];
static long g_calls, g_valid, g_checked, g_unchecked, g_after_invalid, g_single, g_forced, g_helpers;
static int g_fail, g_verbose;
static uint64_t g_seed;

static void describe(const call *c, char *buf, size_t size)
{
    const fastnorm_desc *d = &c->d;
    int i, n;
    size_t used;
    if (c->desc_null) {
        n = snprintf(buf, size, "%s(desc=NULL", ENTRY_NAME[c->entry]);
    } else {
        n = snprintf(
            buf, size,
            "%s(struct_size=%lu kind=%d dtype=%d param_dtype=%d layout=%d rank=%d normalized_ndim=%d "
            "num_groups=%lld eps=%.17g flags=0x%llx dims=[",
            ENTRY_NAME[c->entry], (unsigned long)d->struct_size, (int)d->kind, (int)d->dtype,
            (int)d->param_dtype, (int)d->layout, (int)d->rank, (int)d->normalized_ndim,
            (long long)d->num_groups, d->eps, (unsigned long long)d->flags);
        for (i = 0; i < FASTNORM_MAX_RANK && n > 0 && (size_t)n < size; ++i)
            n += snprintf(buf + n, size - (size_t)n, "%s%lld", i ? "," : "", (long long)d->dims[i]);
        if (n > 0 && (size_t)n < size) n += snprintf(buf + n, size - (size_t)n, "]");
    }
    for (i = 0; i < NSLOTS[c->entry] && n > 0 && (size_t)n < size; ++i) {
        if (c->off[i] < 0) n += snprintf(buf + n, size - (size_t)n, " %s=NULL", SLOTS[c->entry][i].name);
        else
            n += snprintf(buf + n, size - (size_t)n, " %s=@%lld", SLOTS[c->entry][i].name,
                          (long long)c->off[i]);
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

static fastnorm_status invoke(const call *c)
{
    void *p[8];
    const fastnorm_desc *dp = c->desc_null ? NULL : g_desc;
    int i;
    for (i = 0; i < 8; ++i)
        p[i] = i < NSLOTS[c->entry] && c->off[i] >= 0 ? (void *)(g_arena + c->off[i]) : NULL;
    if (c->entry == FWD)
        return fastnorm_forward_training(dp, p[0], p[1], p[2], p[3], (double *)p[4], (double *)p[5]);
    if (c->entry == INF)
        return fastnorm_forward_inference(dp, p[0], p[3], p[4], (const double *)p[1], (const double *)p[2],
                                          p[5]);
    return fastnorm_backward(dp, p[0], p[1], p[4], (const double *)p[2], (const double *)p[3], p[5], p[6],
                             p[7]);
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

static void run_call(long index, int *previous_invalid)
{
    rng r;
    call c;
    model m;
    checked_output outs[3];
    int nout = 0, e, i, j, valid, forced = 0;
    double mode;
    fastnorm_status st;
    fastnorm_desc before;

    r.s = g_seed * 0xD1B54A32D192ED03ull + (uint64_t)index * 0x9E3779B97F4A7C15ull + 1;
    (void)next_u64(&r);
    memset(&c, 0, sizeof c);
    c.entry = e = (int)below(&r, NENTRY);
    mode = uniform(&r);
    if (mode < 0.85) {
        gen_valid_desc(&r, e, &c.d);
        place_valid(&r, &c);
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
        int req[8], nreq = 0;
        for (i = 0; i < NSLOTS[e]; ++i)
            if (SLOTS[e][i].required) req[nreq++] = i;
        i = req[below(&r, nreq)];
        c.off[i] = -1;
        note(&c, "forced %s=NULL", SLOTS[e][i].name);
        forced = 1;
        run_model(&c, 0, 0, &m);
    }
    g_forced += forced;
    valid = m.definite == 0;

    /* outputs: sentinel (the part inside the arena) */
    for (i = 0; i < NSLOTS[e]; ++i) {
        int64_t len;
        if (!SLOTS[e][i].output || c.off[i] < 0) continue;
        len = m.geom_ok ? m.bytes[i] : 64;
        if (len > ARENA - c.off[i]) len = ARENA - c.off[i];
        memset(g_arena + c.off[i], SENTINEL, (size_t)len);
    }
    if (valid) nout = prepare_valid(&r, &c, &m, outs);
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
        *previous_invalid = 1;
    } else {
        int64_t lo[8], hi[8], cursor = 0;
        int no = 0;
        ++g_valid;
        if (*previous_invalid) ++g_after_invalid;
        *previous_invalid = 0;
        if (st != FASTNORM_OK) {
            failure(index, &c, &m, st, "a valid call failed");
        } else {
            /* nothing outside the outputs changed (inputs, gaps, guard bytes) */
            for (i = 0; i < NSLOTS[e]; ++i)
                if (SLOTS[e][i].output && c.off[i] >= 0) {
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
            for (i = 0; i < nout; ++i) {
                const checked_output *out = &outs[i];
                int64_t k, isz = out->is_stat ? 8 : m.itemsize;
                double rtol = out->is_stat ? 1e-9 : m.itemsize == 4 ? 1e-5 : 1e-10, smag = 0.0;
                for (k = 0; k < out->n; ++k)
                    if (mag_[out->which][k] > smag) smag = mag_[out->which][k];
                for (k = 0; k < out->n; ++k) {
                    double got = load(c.off[out->slot], k, isz), want = ref_[out->which][k];
                    /* + an absolute floor where results underflow (e.g. eps = 1e300) */
                    double tol = rtol * (mag_[out->which][k] + 1e-3 * smag) + (isz == 4 ? 1e-37 : 1e-300);
                    if (!(fabs(got - want) <= tol)) {
                        failure(index, &c, &m, st, "%s[%lld] = %.17g, reference %.17g (tolerance %.3g)",
                                SLOTS[e][out->slot].name, (long long)k, got, want, tol);
                        break;
                    }
                }
            }
            if (nout) ++g_checked;
            else ++g_unchecked;
        }
    }
    check_helpers(index, &r, &c);
}

int main(int argc, char **argv)
{
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
    if ((st = fastnorm_init()) != FASTNORM_OK) {
        fprintf(stderr, "fastnorm_init: %s: %s\n", fastnorm_status_string(st), fastnorm_last_error());
        return 1;
    }
    for (i = first; i < first + calls && g_fail < MAX_FAILURES; ++i) run_call(i, &previous_invalid);

    for (e = 0; e < NENTRY; ++e) {
        long total = 0;
        for (s = 0; s <= NSTATUS; ++s) total += g_count[e][s];
        printf("fuzz: %s: %ld calls:", ENTRY_NAME[e], total);
        for (s = 0; s <= NSTATUS; ++s)
            if (g_count[e][s])
                printf(" %s=%ld", s < NSTATUS ? fastnorm_status_string((fastnorm_status)s) : "other",
                       g_count[e][s]);
        printf("\n");
    }
    printf("fuzz: num_stats/num_params: %ld calls:", g_helpers);
    for (s = 0; s <= NSTATUS; ++s)
        if (g_helper_count[s])
            printf(" %s=%ld", s < NSTATUS ? fastnorm_status_string((fastnorm_status)s) : "other",
                   g_helper_count[s]);
    printf("\n");
    printf("fuzz: valid=%ld (checked against the reference %ld, inputs aliased across types %ld, "
           "right after an invalid call %ld) invalid=%ld (one acceptable status %ld, forced NULL %ld)\n",
           g_valid, g_checked, g_unchecked, g_after_invalid, g_calls - g_valid, g_single, g_forced);
    printf("fuzz: seed=%llu calls=%ld failures=%d\n", (unsigned long long)g_seed, g_calls, g_fail);
    free(g_arena);
    free(g_snapshot);
    free(g_desc);
    return g_fail ? 1 : 0;
}
