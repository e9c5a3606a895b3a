/*
 * fastnorm.h -- C ABI of fastnorm: BatchNorm, InstanceNorm, GroupNorm,
 * LayerNorm and RMSNorm forward / backward on the CPU, with a fused residual
 * add and activation, a pre-norm skip add, and BatchNorm split across
 * processes.  Version 0.6.
 *
 * The library (libfastnorm.so) embeds a CPython interpreter and calls the
 * very same Numba kernels as the Python package, compiled once as Numba
 * @cfunc's and loaded from Numba's on-disk cache.  After initialization every
 * call goes from C straight to native code: no Python frame runs and the GIL
 * is not taken.
 *
 * Build:   python -m fastnorm.capi build            (-> capi/build/libfastnorm.so)
 * Compile: cc $(python -m fastnorm.capi --cflags) prog.c $(python -m fastnorm.capi --libs)
 * Docs:    docs/c-api.md (also: the ABI policy, what may change between versions)
 *
 * General rules, valid for every function below
 * ---------------------------------------------
 * - Argument order of the compute calls (fastnorm_forward_training,
 *   fastnorm_forward_inference, fastnorm_backward): the descriptor first, then
 *   every buffer the call only reads, then every buffer it writes; within the
 *   inputs and within the outputs the order is always
 *       data tensors (dy before x), parameters (weight, bias), statistics (mean, rstd).
 *   So a buffer's position says whether it is read or written: e.g.
 *   forward_training(desc, x, weight, bias | y, mean, rstd) but
 *   forward_inference(desc, x, weight, bias, mean, rstd | y).
 * - Ownership: the library never allocates, frees or keeps any buffer passed
 *   to it, nor the descriptor.  Every pointer is owned by the caller and only
 *   needs to stay valid for the duration of the call.  No pointer is retained
 *   after return.  Strings returned by the library are owned by it (never
 *   free them).
 * - Buffers are dense, C-contiguous arrays aligned to their element size.
 *   Data buffers (x, y, dy, dx, weight, bias, dweight, dbias) hold
 *   desc->dtype elements; mean and rstd are always double.
 * - Status: every entry point returns a fastnorm_status.  On any status other
 *   than FASTNORM_OK nothing has been written to any output buffer (all
 *   validation happens before the first write).  Nothing aborts, exits or
 *   prints on bad input; fastnorm_last_error() describes the failure.
 * - Aliasing: only the exact aliases documented on each function are
 *   allowed (y == x, y == residual, dx == dy, dx == x, dresidual == dy).  Any other overlap between an output
 *   and another buffer is rejected with FASTNORM_OVERLAP.
 * - Thread safety: every function may be called concurrently from any number
 *   of threads, on different or identical inputs and descriptors (outputs
 *   must not be shared between concurrent calls).  Calls run on Numba's
 *   thread-safe threading layer (TBB when available, else OpenMP).
 * - Fork: a child forked after the runtime started may call every function
 *   and gets bitwise the parent's results.  Under GNU OpenMP (layer "omp"),
 *   whose parallel regions kill a forked child, the child's calls run
 *   single-threaded (see docs/c-api.md, Fork).
 * - Initialization: fastnorm_init() starts the runtime explicitly; otherwise
 *   the first call that needs it does (lazy, thread-safe, once per process).
 *   Each operation's kernel for a data dtype is loaded by its first call
 *   (thread-safe, once per process): one call of each operation a program
 *   uses, at start-up, takes all of that latency up front.
 *   Pure-C helpers (fastnorm_version, fastnorm_version_string,
 *   fastnorm_status_string, fastnorm_last_error, fastnorm_desc_init,
 *   fastnorm_num_stats, fastnorm_num_params) never start it.
 * - Growable descriptor: fastnorm_desc starts with struct_size, which
 *   fastnorm_desc_init sets to the size the caller passes (sizeof(fastnorm_desc)
 *   of the header the program was compiled with).  New fields are only ever
 *   appended; a library accepts the descriptor of its own header and of every
 *   older one (missing fields get their defaults), and rejects a larger one
 *   it does not know with FASTNORM_VERSION_MISMATCH.
 */
#ifndef FASTNORM_H
#define FASTNORM_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Symbol visibility of the public entry points. */
#if defined(_WIN32)
#    ifdef FASTNORM_BUILDING
#        define FASTNORM_API __declspec(dllexport)
#    else
#        define FASTNORM_API __declspec(dllimport)
#    endif
#elif defined(__GNUC__) && __GNUC__ >= 4
#    define FASTNORM_API __attribute__((visibility("default")))
#else
#    define FASTNORM_API
#endif

/* Version of this header; fastnorm_version() / fastnorm_version_string() give the library's. */
#define FASTNORM_VERSION_MAJOR 0
#define FASTNORM_VERSION_MINOR 6
#define FASTNORM_VERSION_PATCH 0
/* MAJOR * 10000 + MINOR * 100 + PATCH */
#define FASTNORM_VERSION \
    (FASTNORM_VERSION_MAJOR * 10000 + FASTNORM_VERSION_MINOR * 100 + FASTNORM_VERSION_PATCH)
#define FASTNORM_QUOTE_(x) #x
#define FASTNORM_QUOTE(x) FASTNORM_QUOTE_(x)
/* "MAJOR.MINOR.PATCH", e.g. "0.2.0" */
#define FASTNORM_VERSION_STRING            \
    FASTNORM_QUOTE(FASTNORM_VERSION_MAJOR) \
    "." FASTNORM_QUOTE(FASTNORM_VERSION_MINOR) "." FASTNORM_QUOTE(FASTNORM_VERSION_PATCH)

/* Largest supported rank of the logical shape (fastnorm_desc.dims). */
#define FASTNORM_MAX_RANK 8

/* Status codes.  Values are pinned: they never change between versions; new
   ones are only appended (a caller should treat an unknown value as an error). */
typedef enum fastnorm_status {
    FASTNORM_OK = 0,               /* success */
    FASTNORM_INVALID_ARGUMENT = 1, /* bad value: struct_size, dims, rank, enum, eps, groups, alignment */
    FASTNORM_UNSUPPORTED = 2,      /* valid but not implemented (mixed dtypes, flags, an activation
                                      with 16-bit data) */
    FASTNORM_NOT_INITIALIZED = 3,  /* the embedded runtime could not be started */
    FASTNORM_INTERNAL_ERROR = 4,   /* the kernel raised (only: out of memory for its workspace;
                                      Numba then writes the exception to stderr), or the
                                      call's kernel could not be loaded (the reason is in
                                      fastnorm_last_error(); the next call tries again) */
    FASTNORM_NULL_POINTER = 5,     /* a required pointer is NULL */
    FASTNORM_SIZE_OVERFLOW = 6,    /* element count of dims times 8 bytes overflows int64 */
    FASTNORM_OVERLAP = 7,          /* an output overlaps another buffer (beyond allowed aliases) */
    FASTNORM_VERSION_MISMATCH = 8  /* desc->struct_size is larger than any descriptor this library
                                      knows: the program was compiled with a newer fastnorm.h
                                      (since 0.2) */
} fastnorm_status;

/* Which normalization.  0 is deliberately invalid (catches zeroed structs). */
typedef enum fastnorm_kind {
    FASTNORM_BATCH_NORM = 1,    /* per channel, across the batch and spatial dims */
    FASTNORM_INSTANCE_NORM = 2, /* per sample and channel */
    FASTNORM_GROUP_NORM = 3,    /* per sample and group of C / num_groups channels */
    FASTNORM_LAYER_NORM = 4,    /* over the trailing normalized_ndim dims */
    FASTNORM_RMS_NORM = 5       /* LayerNorm without centering */
} fastnorm_kind;

/* Element type of the data buffers.  mean / rstd are always double.  16-bit
   data (since 0.5) is computed in float32 and each output rounded once to
   nearest even; its parameters are float32 or the data dtype (param_dtype). */
typedef enum fastnorm_dtype {
    FASTNORM_DTYPE_DEFAULT = 0, /* only for param_dtype: same as dtype */
    FASTNORM_FLOAT32 = 1,
    FASTNORM_FLOAT64 = 2,
    FASTNORM_FLOAT16 = 3, /* IEEE 754 binary16 (since 0.5) */
    FASTNORM_BFLOAT16 = 4 /* bfloat16: the upper half of a float32 (since 0.5) */
} fastnorm_dtype;

/* Activation of the fused epilogue, desc->activation (since 0.3): torch's F.relu,
   F.leaky_relu, torch.sigmoid, torch.tanh, F.silu, F.gelu(approximate="none"),
   F.gelu(approximate="tanh").  Values are pinned. */
typedef enum fastnorm_activation {
    FASTNORM_ACTIVATION_NONE = 0, /* the default: y = z */
    FASTNORM_RELU = 1,            /* max(z, 0); derivative 0 at 0 */
    FASTNORM_LEAKY_RELU = 2,      /* z > 0 ? z : desc->negative_slope * z */
    FASTNORM_SIGMOID = 3,
    FASTNORM_TANH = 4,
    FASTNORM_SILU = 5,     /* z * sigmoid(z) */
    FASTNORM_GELU = 6,     /* z * Phi(z), erf form */
    FASTNORM_GELU_TANH = 7 /* tanh approximation */
} fastnorm_activation;

/* Memory layout of x (and y, dy, dx) for BatchNorm / InstanceNorm / GroupNorm. */
typedef enum fastnorm_layout {
    FASTNORM_CHANNELS_FIRST = 0, /* dims = (N, C, *spatial), e.g. NCHW */
    FASTNORM_CHANNELS_LAST = 1   /* dims = (N, *spatial, C), e.g. NHWC */
} fastnorm_layout;

/*
 * What to compute, on which shape.  Fill it with fastnorm_desc_init() (which
 * sets struct_size) and adjust fields; all fields are plain values (no
 * pointers), so a descriptor may be copied freely and shared between threads.
 * Enum-valued fields are stored as int32_t (a fixed size, whatever the
 * compiler's enum size).
 *
 * struct_size     size in bytes of the caller's struct, set by
 *                 fastnorm_desc_init (sizeof(fastnorm_desc) of the header the
 *                 program was compiled with).  The library accepts the size of
 *                 this header's struct and of every older header's (fields
 *                 appended later get their defaults); 0 or a smaller size is
 *                 FASTNORM_INVALID_ARGUMENT, a larger unknown one
 *                 FASTNORM_VERSION_MISMATCH.  Never change it by hand.
 * kind            fastnorm_kind.
 * dtype           fastnorm_dtype of x, y, dy, dx.
 * param_dtype     dtype of weight, bias, dweight, dbias (and skip_bias,
 *                 dskip_bias); FASTNORM_DTYPE_DEFAULT (0) means dtype.  With
 *                 16-bit data it may also be FASTNORM_FLOAT32 (since 0.5);
 *                 any other difference is FASTNORM_UNSUPPORTED.
 * layout          fastnorm_layout; BN/IN/GN only (LN/RMS require
 *                 FASTNORM_CHANNELS_FIRST: they normalize the trailing dims).
 * rank, dims      logical shape, every dim >= 1 (a tensor with a 0 dim is
 *                 rejected: skip the call, there is nothing to normalize).
 *                 BN/IN/GN: rank 2..5, (N, C, *spatial) or (N, *spatial, C).
 *                 LN/RMS: rank 1..FASTNORM_MAX_RANK, any leading dims.
 * num_groups      GroupNorm: G >= 1 dividing C.  Must be 0 for other kinds.
 * normalized_ndim LN/RMS: number of trailing dims normalized (1..rank).
 *                 Must be 0 for other kinds.
 * eps             added to the variance (RMSNorm: to the mean square);
 *                 finite and >= 0.  torch's RMSNorm default is FLT_EPSILON /
 *                 DBL_EPSILON of the dtype.
 * flags           reserved, must be 0 (other bits: FASTNORM_UNSUPPORTED).
 * activation      (0.3) fastnorm_activation of the fused epilogue
 *                 y = act(normalized * weight + bias + residual); default
 *                 FASTNORM_ACTIVATION_NONE.  Applied by every forward call;
 *                 its backward is fastnorm_backward_fused (fastnorm_backward
 *                 refuses a descriptor with an activation).
 * reserved        (0.3) must be 0.
 * negative_slope  (0.3) slope of FASTNORM_LEAKY_RELU for z <= 0, finite;
 *                 default 0.01 (torch's).  Ignored by the other activations.
 *
 * Derived sizes (see fastnorm_num_params / fastnorm_num_stats):
 *   parameters (weight, bias, dweight, dbias): C for BN/IN/GN, the product of
 *     the normalized dims for LN/RMS;
 *   statistics (mean, rstd): C for BN, N*C for IN, N*G for GN, the product of
 *     the leading (non-normalized) dims for LN/RMS (1 if there are none).
 *
 * ABI: fields are never removed, reordered or retyped; new fields are only
 * appended at the end (with a default that keeps the older behaviour).
 */
typedef struct fastnorm_desc {
    size_t struct_size; /* 0.2 */
    int32_t kind;
    int32_t dtype;
    int32_t param_dtype;
    int32_t layout;
    int32_t rank;
    int32_t normalized_ndim;
    int64_t num_groups;
    int64_t dims[FASTNORM_MAX_RANK];
    double eps;
    uint64_t flags;        /* last field of 0.2 */
    int32_t activation;    /* 0.3 */
    int32_t reserved;      /* 0.3 */
    double negative_slope; /* 0.3, last field of 0.3; later fields are appended below */
} fastnorm_desc;

/**
 * Version of the library as MAJOR * 10000 + MINOR * 100 + PATCH.
 * @returns the runtime version (compare with FASTNORM_VERSION).
 * Ownership: nothing.  Thread-safe; never starts the runtime.
 */
FASTNORM_API int fastnorm_version(void);

/**
 * Version of the library as "MAJOR.MINOR.PATCH" (e.g. "0.2.0").
 * @returns a static string owned by the library (never free it), valid for
 *          the lifetime of the process.
 * Thread-safe; never starts the runtime.
 */
FASTNORM_API const char *fastnorm_version_string(void);

/**
 * Name of a status code, e.g. "FASTNORM_INVALID_ARGUMENT".
 * @param status any value (unknown values give "FASTNORM_UNKNOWN_STATUS").
 * @returns a static string owned by the library (never free it), valid for
 *          the lifetime of the process.
 * Thread-safe; never starts the runtime.
 */
FASTNORM_API const char *fastnorm_status_string(fastnorm_status status);

/**
 * Human-readable reason of the last non-OK status returned on the calling
 * thread ("" if none yet).
 * @returns a thread-local buffer owned by the library (never free it), valid
 *          until the next fastnorm call on the same thread; copy it to keep it.
 * Thread-safe (each thread has its own message); never starts the runtime.
 */
FASTNORM_API const char *fastnorm_last_error(void);

/**
 * Fill *desc with defaults: struct_size, the given kind, dtype and shape,
 * channels-first, param_dtype 0, eps 1e-5, num_groups 0, normalized_ndim 1
 * for LN/RMS (else 0), flags 0, no activation, negative_slope 0.01.  Set num_groups yourself for GroupNorm.
 *
 *     fastnorm_desc desc;
 *     fastnorm_desc_init(&desc, sizeof desc, FASTNORM_LAYER_NORM, FASTNORM_FLOAT32, 2, dims);
 *
 * @param desc        output, owned by the caller; exactly struct_size bytes
 *                    are written (none on error).  Not retained.
 * @param struct_size sizeof(fastnorm_desc) as the caller's header declares
 *                    it; stored in desc->struct_size.  0 or smaller than the
 *                    0.2 descriptor: FASTNORM_INVALID_ARGUMENT; larger than
 *                    any descriptor this library knows:
 *                    FASTNORM_VERSION_MISMATCH.
 * @param kind        fastnorm_kind (FASTNORM_INVALID_ARGUMENT if unknown).
 * @param dtype       fastnorm_dtype of the data: FASTNORM_FLOAT32,
 *                    FASTNORM_FLOAT64, FASTNORM_FLOAT16 or FASTNORM_BFLOAT16
 *                    (since 0.5); anything else (including
 *                    FASTNORM_DTYPE_DEFAULT) FASTNORM_INVALID_ARGUMENT.
 * @param rank        number of dims, 1..FASTNORM_MAX_RANK.
 * @param dims        rank values copied into desc->dims (unused entries set to
 *                    0); read only during the call.  The dims themselves are
 *                    validated by the calls that use the descriptor.
 * @returns FASTNORM_OK, FASTNORM_NULL_POINTER (desc or dims NULL),
 *          FASTNORM_INVALID_ARGUMENT, FASTNORM_UNSUPPORTED or
 *          FASTNORM_VERSION_MISMATCH; *desc is untouched on error.
 * Thread-safe; never starts the runtime.
 */
FASTNORM_API fastnorm_status fastnorm_desc_init(fastnorm_desc *desc, size_t struct_size, fastnorm_kind kind,
                                                fastnorm_dtype dtype, int32_t rank, const int64_t *dims);

/**
 * Number of elements of each of weight, bias, dweight, dbias.
 * @param desc  a descriptor (caller-owned, read only, not retained),
 *              validated as by the compute calls.
 * @param count output (caller-owned); written only on FASTNORM_OK.
 * @returns FASTNORM_OK, FASTNORM_NULL_POINTER (count NULL) or the validation
 *          status of desc.
 * Thread-safe; never starts the runtime.
 */
FASTNORM_API fastnorm_status fastnorm_num_params(const fastnorm_desc *desc, int64_t *count);

/**
 * Number of elements of each of mean and rstd (doubles).
 * @param desc  a descriptor (caller-owned, read only, not retained),
 *              validated as by the compute calls.
 * @param count output (caller-owned); written only on FASTNORM_OK.
 * @returns FASTNORM_OK, FASTNORM_NULL_POINTER (count NULL) or the validation
 *          status of desc.
 * Thread-safe; never starts the runtime.
 */
FASTNORM_API fastnorm_status fastnorm_num_stats(const fastnorm_desc *desc, int64_t *count);

/**
 * Start the runtime now: the embedded Python interpreter (if the process has
 * none), Numba and its thread pool.  The compiled kernels are loaded from
 * Numba's cache by the first call of each operation and data dtype (the very
 * first run compiles them: run `python -m fastnorm.capi --warm` once to do
 * that ahead of time).  Calling it again is a cheap no-op.
 *
 * Environment read at this point: FASTNORM_PYTHONHOME (overrides the Python
 * home baked in at build time), NUMBA_NUM_THREADS (size of the thread pool),
 * NUMBA_THREADING_LAYER, NUMBA_CACHE_DIR.  The process's own PYTHONHOME /
 * PYTHONPATH are not needed.
 *
 * Ownership: the runtime (interpreter, compiled kernels, thread pool) is
 * owned by the library and lives until the process exits; there is no
 * shutdown function.
 * @returns FASTNORM_OK, or FASTNORM_NOT_INITIALIZED if the runtime cannot
 *          start (reason in fastnorm_last_error(); the failure is sticky: later
 *          calls return FASTNORM_NOT_INITIALIZED too).
 * Thread-safe: concurrent callers wait for the one initialization.
 */
FASTNORM_API fastnorm_status fastnorm_init(void);

/**
 * Set how many threads each subsequent call (from any thread) may use.
 * @param num_threads 1..max_threads (the pool size, see
 *                    fastnorm_runtime_info), or 0 for all of them (the
 *                    default).
 * @returns FASTNORM_OK, FASTNORM_INVALID_ARGUMENT (out of range) or
 *          FASTNORM_NOT_INITIALIZED.  Starts the runtime if needed.
 * Ownership: nothing.  Thread-safe (process-wide setting; calls already
 * running are unaffected).  Results do not depend on the number of threads
 * (bitwise).
 */
FASTNORM_API fastnorm_status fastnorm_set_num_threads(int num_threads);

/**
 * Current setting of fastnorm_set_num_threads (resolved: never 0).
 * @param num_threads output (caller-owned), written only on FASTNORM_OK.
 * @returns FASTNORM_OK, FASTNORM_NULL_POINTER or FASTNORM_NOT_INITIALIZED.
 * Starts the runtime if needed.  Thread-safe.
 */
FASTNORM_API fastnorm_status fastnorm_get_num_threads(int *num_threads);

/**
 * Size of the thread pool (NUMBA_NUM_THREADS at initialization, by default
 * the number of CPU cores), and the name of the threading layer in use
 * ("tbb", "omp", or "workqueue" if forced with NUMBA_THREADING_LAYER).
 * @param max_threads output (caller-owned), may be NULL.
 * @param layer       output: receives a pointer to a string owned by the
 *                    library (never free it), valid for the lifetime of the
 *                    process; may be NULL.
 * @returns FASTNORM_OK or FASTNORM_NOT_INITIALIZED.  Starts the runtime.
 * Thread-safe.
 */
FASTNORM_API fastnorm_status fastnorm_runtime_info(int *max_threads, const char **layer);

/**
 * Training forward pass: statistics of x, then
 * y = act((x - mean) * (rstd * weight) + bias)  (biased variance; RMSNorm: mean 0,
 * rstd = 1 / sqrt(mean(x^2) + eps); act is desc->activation, the identity by
 * default).
 *
 * Inputs:
 * @param desc   descriptor (read only).
 * @param x      product(dims) elements of desc->dtype, laid out as
 *               desc->dims in desc->layout order.
 * @param weight fastnorm_num_params elements, or NULL (weight 1).
 * @param bias   fastnorm_num_params elements, or NULL (bias 0).
 * Outputs:
 * @param y      same size as x.  May be x itself (in place).
 * @param mean   fastnorm_num_stats doubles (0 for RMSNorm).
 * @param rstd   fastnorm_num_stats doubles, 1 / sqrt(var + eps).
 * @returns FASTNORM_OK; FASTNORM_NULL_POINTER (desc, x, y, mean or rstd NULL);
 *          FASTNORM_INVALID_ARGUMENT (bad descriptor, misaligned buffer, or a
 *          training batch with one value per channel: BatchNorm with N*S == 1,
 *          InstanceNorm with S == 1, as torch); FASTNORM_VERSION_MISMATCH;
 *          FASTNORM_UNSUPPORTED; FASTNORM_SIZE_OVERFLOW; FASTNORM_OVERLAP;
 *          FASTNORM_NOT_INITIALIZED; FASTNORM_INTERNAL_ERROR.  Nothing is
 *          written unless FASTNORM_OK (except after FASTNORM_INTERNAL_ERROR,
 *          where outputs are undefined).
 * Ownership: every buffer and the descriptor belong to the caller; the
 * library reads / writes them during the call only and keeps no pointer.
 * Starts the runtime if needed.  Thread-safe.  Deterministic: bitwise
 * identical results for any number of threads, and identical to
 * fastnorm.forward() in Python.
 */
FASTNORM_API fastnorm_status fastnorm_forward_training(const fastnorm_desc *desc, const void *x,
                                                       const void *weight, const void *bias, void *y,
                                                       double *mean, double *rstd);

/**
 * Inference forward pass with given statistics:
 * y = act((x - mean) * (rstd * weight) + bias).  For BatchNorm with running
 * statistics pass mean = running_mean and rstd = 1 / sqrt(running_var + eps)
 * (desc->eps is not used by this call).  For RMSNorm mean is ignored (it may
 * not be NULL; pass rstd).
 *
 * Inputs:
 * @param desc   descriptor (read only).
 * @param x      see fastnorm_forward_training.
 * @param weight fastnorm_num_params elements, or NULL.
 * @param bias   fastnorm_num_params elements, or NULL.
 * @param mean   fastnorm_num_stats doubles.
 * @param rstd   fastnorm_num_stats doubles.
 * Output:
 * @param y      same size as x.  May be x itself (in place).
 * @returns as fastnorm_forward_training (no one-value-per-channel check).
 * Ownership: as fastnorm_forward_training (nothing retained).  Starts the
 * runtime if needed.  Thread-safe.  Deterministic.
 */
FASTNORM_API fastnorm_status fastnorm_forward_inference(const fastnorm_desc *desc, const void *x,
                                                        const void *weight, const void *bias,
                                                        const double *mean, const double *rstd, void *y);

/**
 * Backward pass.  With g = weight * dy and xhat = (x - mean) * rstd over the
 * m elements of a group: dx = rstd * (g - mean(g) - xhat * mean(g * xhat))
 * (no mean(g) term for RMSNorm); dweight = sum(dy * xhat), dbias = sum(dy)
 * over everything but the channel (the position, for LN/RMS).
 *
 * Inputs:
 * @param desc    descriptor of the forward pass (read only).
 * @param dy      gradient of the loss w.r.t. y, same size as x.
 * @param x       the forward input.
 * @param weight  the forward weight, or NULL if none.
 * @param mean    the mean written by fastnorm_forward_training.
 * @param rstd    the rstd written by fastnorm_forward_training.
 * Outputs:
 * @param dx      same size as x.  May be dy or x itself (in place).
 * @param dweight fastnorm_num_params elements, or NULL to skip it
 *                (allowed with weight == NULL: the gradient at weight = 1).
 * @param dbias   fastnorm_num_params elements, or NULL to skip it.
 * @returns as fastnorm_forward_training; FASTNORM_NULL_POINTER if desc, dy,
 *          x, mean, rstd or dx is NULL; the one-value-per-channel check
 *          applies (statistics of a training batch); FASTNORM_INVALID_ARGUMENT
 *          if desc->activation is set (call fastnorm_backward_fused, which
 *          takes the bias and residual the activation's input needs).
 * Ownership: as fastnorm_forward_training (nothing retained).  Starts the
 * runtime if needed.  Thread-safe.  Deterministic, identical to
 * fastnorm.backward() in Python.
 */
FASTNORM_API fastnorm_status fastnorm_backward(const fastnorm_desc *desc, const void *dy, const void *x,
                                               const void *weight, const double *mean, const double *rstd,
                                               void *dx, void *dweight, void *dbias);

/**
 * Training forward pass with the fused epilogue (since 0.3):
 * z = (x - mean) * (rstd * weight) + bias + residual, y = act(z), act being
 * desc->activation.  A ResNet block tail relu(bn(conv) + identity) is one call.
 *
 * Inputs:
 * @param desc     descriptor (read only).
 * @param x        see fastnorm_forward_training.
 * @param residual same size and layout as x, or NULL (no residual).
 * @param weight   fastnorm_num_params elements, or NULL (weight 1).
 * @param bias     fastnorm_num_params elements, or NULL (bias 0).
 * Outputs:
 * @param y        same size as x.  May be x or residual itself (in place).
 * @param mean     fastnorm_num_stats doubles.
 * @param rstd     fastnorm_num_stats doubles.
 * @returns as fastnorm_forward_training (FASTNORM_INVALID_ARGUMENT also for a
 *          desc->activation outside fastnorm_activation, a non-zero
 *          desc->reserved or a non-finite desc->negative_slope).
 * Ownership: as fastnorm_forward_training (nothing retained).  Starts the
 * runtime if needed.  Thread-safe.  Deterministic, identical to
 * fastnorm.forward(..., residual=...) in Python.
 */
FASTNORM_API fastnorm_status fastnorm_forward_training_fused(const fastnorm_desc *desc, const void *x,
                                                             const void *residual, const void *weight,
                                                             const void *bias, void *y, double *mean,
                                                             double *rstd);

/**
 * Inference forward pass with the fused epilogue (since 0.3): as
 * fastnorm_forward_inference, then plus residual and desc->activation.
 *
 * Inputs: desc, x, weight, bias, mean, rstd as fastnorm_forward_inference;
 * @param residual same size and layout as x, or NULL.
 * Output:
 * @param y        same size as x.  May be x or residual itself (in place).
 * @returns as fastnorm_forward_training_fused.
 * Ownership, threads: as fastnorm_forward_inference.
 */
FASTNORM_API fastnorm_status fastnorm_forward_inference_fused(const fastnorm_desc *desc, const void *x,
                                                              const void *residual, const void *weight,
                                                              const void *bias, const double *mean,
                                                              const double *rstd, void *y);

/**
 * Backward pass through the fused epilogue (since 0.3).  dz = dy * act'(z),
 * with z recomputed from x, mean, rstd, weight, bias and residual (no saved
 * pre-activation tensor; ReLU's derivative at 0 is 0 and leaky ReLU's the
 * slope, as torch); then the norm's backward of fastnorm_backward with dz in
 * place of dy.  Without an activation dz = dy.
 *
 * Inputs:
 * @param desc     descriptor of the forward pass (read only).
 * @param dy       gradient of the loss w.r.t. y, same size as x.
 * @param x        the forward input.
 * @param residual the forward residual, or NULL if none.
 * @param weight   the forward weight, or NULL if none.
 * @param bias     the forward bias, or NULL if none (read only with an
 *                 activation: it is part of z).
 * @param mean     the mean written by fastnorm_forward_training_fused.
 * @param rstd     the rstd written by fastnorm_forward_training_fused.
 * Outputs:
 * @param dx        same size as x.  May be dy or x itself (in place).
 * @param dresidual dz, the gradient w.r.t. the residual (and w.r.t. z), same
 *                  size as x, or NULL to skip it.  May be dy itself.
 * @param dweight   fastnorm_num_params elements, or NULL to skip it.
 * @param dbias     fastnorm_num_params elements, or NULL to skip it.
 * @returns as fastnorm_backward.
 * Ownership: as fastnorm_backward; with an activation and no dresidual (or
 * dresidual == dy) the library allocates a workspace of the size of x for
 * the call.  Starts the runtime if needed.  Thread-safe.  Deterministic,
 * identical to fastnorm.backward(..., bias=..., residual=...) in Python.
 */
FASTNORM_API fastnorm_status fastnorm_backward_fused(const fastnorm_desc *desc, const void *dy, const void *x,
                                                     const void *residual, const void *weight,
                                                     const void *bias, const double *mean, const double *rstd,
                                                     void *dx, void *dresidual, void *dweight, void *dbias);

/**
 * Training forward pass after a pre-norm skip add (since 0.4): h = x + skip
 * (+ skip_bias), then the norm of h (y, mean, rstd as fastnorm_forward_training_fused
 * without a residual).  A pre-LN transformer's "h = x + attn; y = layer_norm(h)"
 * is one call, and h is kept for the next residual, as ONNX Runtime's
 * SkipLayerNormalization / SkipSimplifiedLayerNormalization.  LayerNorm and
 * RMSNorm descriptors only (desc->activation applies to y).
 *
 * Inputs:
 * @param desc      descriptor (read only); desc->kind FASTNORM_LAYER_NORM or
 *                  FASTNORM_RMS_NORM.
 * @param x, skip   the summands, fastnorm_num_params * fastnorm_num_stats
 *                  elements each (the size of the tensor).
 * @param skip_bias fastnorm_num_params elements added to every row, or NULL.
 * @param weight    fastnorm_num_params elements, or NULL (weight 1).
 * @param bias      fastnorm_num_params elements, or NULL (bias 0).
 * Outputs:
 * @param h         x + skip + skip_bias (rounded to the data dtype, summed
 *                  left to right): the norm's input, and fastnorm_skip_backward's.
 *                  May be x or skip itself (in place).
 * @param y         the normalized h.  May be x or skip itself, never h.
 * @param mean      fastnorm_num_stats doubles (of h).
 * @param rstd      fastnorm_num_stats doubles (of h).
 * @returns as fastnorm_forward_training_fused; FASTNORM_NULL_POINTER if desc,
 *          x, skip, h, y, mean or rstd is NULL; FASTNORM_INVALID_ARGUMENT for
 *          a descriptor of another kind; FASTNORM_OVERLAP for y == h or any
 *          other overlap than those above.
 * Ownership: as fastnorm_forward_training (nothing retained).  Starts the
 * runtime if needed.  Thread-safe.  Deterministic, identical to
 * fastnorm.forward(..., skip=..., skip_bias=...) in Python.
 */
FASTNORM_API fastnorm_status fastnorm_skip_forward_training(const fastnorm_desc *desc, const void *x,
                                                            const void *skip, const void *skip_bias,
                                                            const void *weight, const void *bias, void *h,
                                                            void *y, double *mean, double *rstd);

/**
 * Backward pass after a pre-norm skip add (since 0.4): the norm's backward of
 * fastnorm_backward_fused with h as its input (no residual).  The gradient
 * w.r.t. h is dx, which is also the gradient w.r.t. x and w.r.t. skip; the
 * skip bias's is its sum over the rows.
 *
 * Inputs:
 * @param desc     descriptor of the forward pass (read only).
 * @param dy       gradient of the loss w.r.t. y, same size as h.
 * @param h        the h written by fastnorm_skip_forward_training.
 * @param weight   the forward weight, or NULL if none.
 * @param bias     the forward bias, or NULL if none (read only with an
 *                 activation).
 * @param mean     the mean written by fastnorm_skip_forward_training.
 * @param rstd     the rstd written by fastnorm_skip_forward_training.
 * Outputs:
 * @param dx         dL/dh = dL/dx = dL/dskip, same size as h.  May be dy or h
 *                   itself (in place).
 * @param dweight    fastnorm_num_params elements, or NULL to skip it.
 * @param dbias      fastnorm_num_params elements, or NULL to skip it.
 * @param dskip_bias fastnorm_num_params elements (the column sums of dx, in
 *                   float64 over fixed row chunks), or NULL to skip it.
 * @returns as fastnorm_backward_fused; FASTNORM_NULL_POINTER names h when it
 *          is NULL; FASTNORM_INVALID_ARGUMENT for a descriptor of another kind.
 * Ownership: as fastnorm_backward_fused.  Starts the runtime if needed.
 * Thread-safe.  Deterministic, identical to fastnorm.backward(...) after
 * fastnorm.forward(..., skip=...) in Python.
 */
FASTNORM_API fastnorm_status fastnorm_skip_backward(const fastnorm_desc *desc, const void *dy, const void *h,
                                                    const void *weight, const void *bias, const double *mean,
                                                    const double *rstd, void *dx, void *dweight, void *dbias,
                                                    void *dskip_bias);

/*
 * BatchNorm split across processes (since 0.6)
 * --------------------------------------------
 * A synchronized BatchNorm normalizes each process's part of a batch with the
 * statistics of the whole (global) batch.  Each pass is a local reduction, an
 * exchange of a few doubles per channel over the caller's own communicator,
 * and a local elementwise pass (docs/distributed.md):
 *
 *   forward:  fastnorm_batch_stats (local count, mean, m2) -> gather every
 *             rank's -> fastnorm_merge_stats (rank order) -> rstd = 1 /
 *             sqrt(var + eps) -> fastnorm_forward_inference ->
 *             fastnorm_update_running_stats (global count);
 *   backward: fastnorm_backward_reduce (local sum(dy), sum(dy * xhat)) ->
 *             gather -> sum in rank order -> fastnorm_backward_apply (dx with
 *             the global count); the global sums are dbias and dweight.
 *
 * Gather, never reduce: every rank merges the same numbers in the same order
 * and gets the same bits.  The descriptor is a FASTNORM_BATCH_NORM one for
 * this rank's samples, without an activation; float32 and float64 data
 * (16-bit data: FASTNORM_UNSUPPORTED).  A rank with no samples skips the
 * local calls: it contributes count 0 (its mean and m2 are not read) and
 * sums 0.  None of these calls checks for one value per channel: the caller
 * checks the global count (> 1 in training).
 */

/**
 * Local moments of this rank's samples (since 0.6).
 *
 * Inputs:
 * @param desc  a FASTNORM_BATCH_NORM descriptor of this rank's x (read only).
 * @param x     this rank's samples.
 * Outputs:
 * @param count elements per channel, N * prod(spatial) (one int64).
 * @param mean  C doubles: the mean of each channel.
 * @param m2    C doubles: the sum of squared deviations from it.
 * @returns FASTNORM_OK; FASTNORM_NULL_POINTER; FASTNORM_INVALID_ARGUMENT (a
 *          descriptor of another kind or with an activation, misaligned
 *          buffers); FASTNORM_UNSUPPORTED (16-bit data); FASTNORM_OVERLAP;
 *          the descriptor's statuses; FASTNORM_NOT_INITIALIZED;
 *          FASTNORM_INTERNAL_ERROR.  Nothing is written unless FASTNORM_OK.
 * Ownership: nothing retained.  Starts the runtime if needed.  Thread-safe.
 * Deterministic, identical to fastnorm.batch_stats() in Python.
 */
FASTNORM_API fastnorm_status fastnorm_batch_stats(const fastnorm_desc *desc, const void *x, int64_t *count,
                                                  double *mean, double *m2);

/**
 * Merge the ranks' moments in rank order (since 0.6): Chan et al.'s pairwise
 * update, rank 0's moments with rank 1's, the result with rank 2's, ...
 *
 * Inputs:
 * @param num_ranks R >= 1.
 * @param channels  C >= 1.
 * @param counts    R int64 counts (>= 0; a rank with 0 is skipped).
 * @param means     R * C doubles, rank-major (rank r's means at r * C).
 * @param m2s       R * C doubles, rank-major.
 * Outputs:
 * @param count     the global count (one int64).
 * @param mean      C doubles: the global mean.
 * @param var       C doubles: the global biased variance, m2 / count.
 * @returns FASTNORM_OK; FASTNORM_NULL_POINTER; FASTNORM_INVALID_ARGUMENT
 *          (R or C < 1, a negative count, every count 0, misaligned
 *          buffers); FASTNORM_SIZE_OVERFLOW; FASTNORM_OVERLAP;
 *          FASTNORM_NOT_INITIALIZED; FASTNORM_INTERNAL_ERROR.  Nothing is
 *          written unless FASTNORM_OK.
 * Ownership: nothing retained.  Starts the runtime if needed.  Thread-safe.
 * Deterministic, identical to fastnorm.merge_stats() in Python.
 */
FASTNORM_API fastnorm_status fastnorm_merge_stats(int64_t num_ranks, int64_t channels, const int64_t *counts,
                                                  const double *means, const double *m2s, int64_t *count,
                                                  double *mean, double *var);

/**
 * Local backward sums of this rank's samples (since 0.6).
 *
 * Inputs:
 * @param desc        descriptor of this rank's x (as fastnorm_batch_stats).
 * @param dy          gradient at the norm's output, same size as x.
 * @param x           this rank's forward input.
 * @param mean, rstd  C doubles each: the global statistics of the forward.
 * Outputs:
 * @param sum_dy      C doubles: sum(dy) over this rank's elements.
 * @param sum_dy_xhat C doubles: sum(dy * xhat), xhat = (x - mean) * rstd.
 * @returns as fastnorm_batch_stats.
 * Ownership, threads: as fastnorm_batch_stats.  Deterministic, identical to
 * fastnorm.batch_norm_backward_reduce() in Python.
 */
FASTNORM_API fastnorm_status fastnorm_backward_reduce(const fastnorm_desc *desc, const void *dy,
                                                      const void *x, const double *mean, const double *rstd,
                                                      double *sum_dy, double *sum_dy_xhat);

/**
 * dx of this rank's samples from the global sums (since 0.6):
 * dx = rstd * w * (dy - sum_dy / m - xhat * sum_dy_xhat / m), m = count.
 *
 * Inputs:
 * @param desc        descriptor of this rank's x (as fastnorm_batch_stats).
 * @param dy, x       as fastnorm_backward_reduce.
 * @param weight      C elements of the parameter dtype, or NULL (weight 1).
 * @param mean, rstd  the global statistics.
 * @param sum_dy, sum_dy_xhat C doubles each: the sums over every rank.
 * @param count       the global count (>= this rank's N * prod(spatial)).
 * Output:
 * @param dx          same size as x.  May be dy or x itself (in place).
 * @returns as fastnorm_batch_stats; FASTNORM_INVALID_ARGUMENT for a count
 *          below this rank's.
 * Ownership, threads: as fastnorm_batch_stats.  Deterministic, identical to
 * fastnorm.batch_norm_backward_apply() in Python.
 */
FASTNORM_API fastnorm_status fastnorm_backward_apply(const fastnorm_desc *desc, const void *dy, const void *x,
                                                     const void *weight, const double *mean,
                                                     const double *rstd, const double *sum_dy,
                                                     const double *sum_dy_xhat, int64_t count, void *dx);

/**
 * Update running statistics in place (since 0.6):
 * running = (1 - momentum) * running + momentum * batch, in float64, with
 * the unbiased variance var * count / (count - 1), each rounded once to the
 * parameter dtype (16-bit: to float32, then to the 16-bit dtype, as every
 * 16-bit store of the library and torch's c10::Half from a double).  For torch's cumulative average pass momentum = 1 /
 * num_batches_tracked.  Also the running-statistics update of a
 * one-process training pass (mean from fastnorm_forward_training, var =
 * 1 / rstd^2 - eps).
 *
 * Inputs:
 * @param desc     a FASTNORM_BATCH_NORM descriptor: C, and the parameter
 *                 dtype of the running statistics (any data dtype).
 * @param mean     C doubles: the batch mean.
 * @param var      C doubles: the batch's biased variance.
 * @param count    elements per channel of the batch, > 1.
 * @param momentum in [0, 1].
 * Outputs (read and written):
 * @param running_mean C elements of the parameter dtype.
 * @param running_var  C elements of the parameter dtype.
 * @returns FASTNORM_OK; FASTNORM_NULL_POINTER; FASTNORM_INVALID_ARGUMENT
 *          (another kind, count < 2, momentum outside [0, 1], misaligned
 *          buffers); FASTNORM_OVERLAP; the descriptor's statuses;
 *          FASTNORM_NOT_INITIALIZED; FASTNORM_INTERNAL_ERROR.  Nothing is
 *          written unless FASTNORM_OK.
 * Ownership: nothing retained.  Starts the runtime if needed.  Thread-safe.
 * Identical to fastnorm.update_running_stats() in Python.
 */
FASTNORM_API fastnorm_status fastnorm_update_running_stats(const fastnorm_desc *desc, const double *mean,
                                                           const double *var, int64_t count, double momentum,
                                                           void *running_mean, void *running_var);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* FASTNORM_H */
