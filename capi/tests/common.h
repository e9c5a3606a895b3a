/* Helpers shared by the C test programs of the fastnorm C ABI (C99). */
#ifndef FASTNORM_TEST_COMMON_H
#define FASTNORM_TEST_COMMON_H

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fastnorm.h"

#if defined(__GNUC__)
#    define TEST_HELPER static __attribute__((unused))
#else
#    define TEST_HELPER static
#endif

TEST_HELPER int g_failures = 0;

#define CHECK(cond, ...)                                         \
    do {                                                         \
        if (!(cond)) {                                           \
            ++g_failures;                                        \
            fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__); \
            fprintf(stderr, __VA_ARGS__);                        \
            fprintf(stderr, "\n");                               \
        }                                                        \
    } while (0)

TEST_HELPER void *xmalloc(size_t bytes)
{
    /* +64 so that size-0 requests and misaligned-pointer tests stay in bounds */
    void *p = malloc(bytes + 64);
    if (p == NULL) {
        fprintf(stderr, "out of memory (%lu bytes)\n", (unsigned long)bytes);
        exit(2);
    }
    return p;
}

TEST_HELPER void *read_file(const char *path, size_t bytes)
{
    void *buf = xmalloc(bytes);
    FILE *f = fopen(path, "rb");
    if (f == NULL || fread(buf, 1, bytes, f) != bytes) {
        fprintf(stderr, "cannot read %lu bytes from %s\n", (unsigned long)bytes, path);
        exit(2);
    }
    fclose(f);
    return buf;
}

TEST_HELPER void write_file(const char *path, const void *buf, size_t bytes)
{
    FILE *f = fopen(path, "wb");
    if (f == NULL || fwrite(buf, 1, bytes, f) != bytes) {
        fprintf(stderr, "cannot write %s\n", path);
        exit(2);
    }
    fclose(f);
}

TEST_HELPER int64_t desc_elements(const fastnorm_desc *d)
{
    int64_t n = 1;
    int i;
    for (i = 0; i < d->rank; ++i) n *= d->dims[i];
    return n;
}

static size_t dtype_bytes(int32_t dtype)
{
    return dtype == FASTNORM_FLOAT64 ? 8 : (dtype == FASTNORM_FLOAT16 || dtype == FASTNORM_BFLOAT16) ? 2 : 4;
}

/* Bytes per element of the data, and of the parameters (param_dtype, 0 meaning dtype). */
TEST_HELPER size_t dtype_size(const fastnorm_desc *d) { return dtype_bytes(d->dtype); }
TEST_HELPER size_t param_size(const fastnorm_desc *d)
{
    return dtype_bytes(d->param_dtype == FASTNORM_DTYPE_DEFAULT ? d->dtype : d->param_dtype);
}

/* n pseudo-random values in [-1.5, 2.5) of the given dtype, the same for a given seed. */
TEST_HELPER void fill(void *buf, int64_t n, int dtype, unsigned seed)
{
    int64_t i;
    unsigned s = seed * 2654435761u + 1u;
    for (i = 0; i < n; ++i) {
        double v;
        s = s * 1664525u + 1013904223u;
        v = (double)(s >> 8) / (double)(1u << 24) * 4.0 - 1.5;
        if (dtype == FASTNORM_FLOAT64) ((double *)buf)[i] = v;
        else ((float *)buf)[i] = (float)v;
    }
}

#endif
