/*
 * abi_test.c: the C ABI of libtessera.so (include/tessera.h), exercised from C.
 *
 * Runs on the simulated device only: TESSERA_DRIVER=sim,
 * TESSERA_SIM=devices:2,capacity:64MiB,granularity:2MiB (ffi/tests/c_programs.rs sets both). The
 * simulated device's memory is host memory, so this program writes a distinct pattern into every
 * live allocation with the CPU and checks every pattern after every operation. Never run it with
 * TESSERA_DRIVER=cuda: device pointers are not host-addressable there.
 *
 * It stops at the first failure with a message naming the phase, the line and the library's last
 * error, and exits 1. Success prints "abi_test: OK" and exits 0.
 *
 * Build (one line): gcc -std=c11 -Wall -Wextra -Werror -pedantic -O2 -pthread -Iinclude
 *   tests/c/abi_test.c -Ltarget/debug -ltessera -Wl,-rpath,$PWD/target/debug -o abi_test
 */
#define _POSIX_C_SOURCE 200809L

#include <inttypes.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#if !defined(__STDC_NO_THREADS__)
#include <threads.h>
#endif

#include "tessera.h"

/* ---------------------------------------------------------------------------------------------
 * The machine the runner describes, and the header's promises checked at compile time.
 * ------------------------------------------------------------------------------------------- */

#define KIB ((size_t)1 << 10)
#define MIB ((size_t)1 << 20)
#define CAPACITY (64 * MIB) /* TESSERA_SIM capacity */
#define PAGE (2 * MIB)      /* TESSERA_SIM granularity = tessera's page */
#define NDEV 2

/* Every field of tessera_stats, in the order abi-spec.md fixes. */
#define STATS_FIELDS(X)                                                                          \
  X(size) X(allocated_bytes) X(peak_allocated_bytes) X(requested_bytes) X(peak_requested_bytes)  \
  X(reserved_bytes) X(peak_reserved_bytes) X(active_blocks) X(peak_active_blocks)                \
  X(cached_free_bytes) X(largest_free_bytes) X(stranded_bytes) X(segments) X(mapped_pages)       \
  X(pool_pages) X(allocations) X(frees) X(allocated_bytes_total) X(remaps) X(cache_releases)     \
  X(released_bytes) X(hook_calls) X(ooms) X(invalid_frees) X(driver_errors) X(limit_bytes)      \
  X(page_size)                                                                                   \
  /* added after the spec, at the end as the size protocol allows: */                            \
  X(alloc_retries) X(capture_underway) X(private_pools) X(private_pool_held_bytes)               \
  X(private_pool_allocated_bytes) X(thread_cached_bytes)

#define COUNT_FIELD(name) +1
enum { STATS_NFIELDS = 0 STATS_FIELDS(COUNT_FIELD) };
_Static_assert(sizeof(tessera_stats) == STATS_NFIELDS * sizeof(uint64_t),
               "tessera_stats has fields this test does not list (or padding): add new fields to "
               "the end of STATS_FIELDS");
/* The spec's 27 fields keep their places: field i at byte 8 * i. */
#define FIELD_AT(name, i)                                                                        \
  _Static_assert(offsetof(tessera_stats, name) == (i) * 8, #name " is not field " #i);
FIELD_AT(size, 0) FIELD_AT(allocated_bytes, 1) FIELD_AT(peak_allocated_bytes, 2)
FIELD_AT(requested_bytes, 3) FIELD_AT(peak_requested_bytes, 4) FIELD_AT(reserved_bytes, 5)
FIELD_AT(peak_reserved_bytes, 6) FIELD_AT(active_blocks, 7) FIELD_AT(peak_active_blocks, 8)
FIELD_AT(cached_free_bytes, 9) FIELD_AT(largest_free_bytes, 10) FIELD_AT(stranded_bytes, 11)
FIELD_AT(segments, 12) FIELD_AT(mapped_pages, 13) FIELD_AT(pool_pages, 14)
FIELD_AT(allocations, 15) FIELD_AT(frees, 16) FIELD_AT(allocated_bytes_total, 17)
FIELD_AT(remaps, 18) FIELD_AT(cache_releases, 19) FIELD_AT(released_bytes, 20)
FIELD_AT(hook_calls, 21) FIELD_AT(ooms, 22) FIELD_AT(invalid_frees, 23)
FIELD_AT(driver_errors, 24) FIELD_AT(limit_bytes, 25) FIELD_AT(page_size, 26)

_Static_assert(TESSERA_OK == 0 && TESSERA_ERROR_OUT_OF_MEMORY == 1 &&
                   TESSERA_ERROR_INVALID_SIZE == 2 && TESSERA_ERROR_INVALID_DEVICE == 3 &&
                   TESSERA_ERROR_UNKNOWN_POINTER == 4 && TESSERA_ERROR_DOUBLE_FREE == 5 &&
                   TESSERA_ERROR_CONFIG == 6 && TESSERA_ERROR_DRIVER == 7 &&
                   TESSERA_ERROR_UNSUPPORTED == 8 && TESSERA_ERROR_INVALID_ARGUMENT == 9 &&
                   TESSERA_ERROR_INTERNAL == 10,
               "error codes as abi-spec.md lists them");

typedef struct {
  const char *name;
  size_t offset;
} field_t;

#define FIELD_ENTRY(name) {#name, offsetof(tessera_stats, name)},
static const field_t FIELDS[] = {STATS_FIELDS(FIELD_ENTRY)};

static uint64_t field_value(const tessera_stats *s, size_t i) {
  uint64_t v;
  memcpy(&v, (const char *)s + FIELDS[i].offset, sizeof v);
  return v;
}

/* ---------------------------------------------------------------------------------------------
 * Failing: one message, then exit(1).
 * ------------------------------------------------------------------------------------------- */

static const char *phase = "start";
static unsigned long checks;

static void fail_at(const char *file, int line, const char *cond, const char *fmt, ...) {
  va_list ap;
  fflush(stdout);
  fprintf(stderr, "abi_test: FAIL in phase '%s' at %s:%d\n  check: %s\n  ", phase, file, line,
          cond);
  va_start(ap, fmt);
  vfprintf(stderr, fmt, ap);
  va_end(ap);
  fprintf(stderr, "\n  tessera_last_error_code() = %d, tessera_last_error() = \"%s\"\n",
          tessera_last_error_code(), tessera_last_error());
  exit(1);
}

/* CHECK(cond, "printf format", args...): the message says what was expected and what was seen. */
#define CHECK(cond, ...)                                                                         \
  do {                                                                                           \
    ++checks;                                                                                    \
    if (!(cond)) fail_at(__FILE__, __LINE__, #cond, __VA_ARGS__);                                \
  } while (0)

static const char *code_name(int code) {
  switch (code) {
  case TESSERA_OK: return "TESSERA_OK";
  case TESSERA_ERROR_OUT_OF_MEMORY: return "TESSERA_ERROR_OUT_OF_MEMORY";
  case TESSERA_ERROR_INVALID_SIZE: return "TESSERA_ERROR_INVALID_SIZE";
  case TESSERA_ERROR_INVALID_DEVICE: return "TESSERA_ERROR_INVALID_DEVICE";
  case TESSERA_ERROR_UNKNOWN_POINTER: return "TESSERA_ERROR_UNKNOWN_POINTER";
  case TESSERA_ERROR_DOUBLE_FREE: return "TESSERA_ERROR_DOUBLE_FREE";
  case TESSERA_ERROR_CONFIG: return "TESSERA_ERROR_CONFIG";
  case TESSERA_ERROR_DRIVER: return "TESSERA_ERROR_DRIVER";
  case TESSERA_ERROR_UNSUPPORTED: return "TESSERA_ERROR_UNSUPPORTED";
  case TESSERA_ERROR_INVALID_ARGUMENT: return "TESSERA_ERROR_INVALID_ARGUMENT";
  case TESSERA_ERROR_INTERNAL: return "TESSERA_ERROR_INTERNAL";
  default: return "(not a tessera error code)";
  }
}

/* The last error is `code`, with a non-empty message. */
#define EXPECT_ERROR(code, what)                                                                 \
  do {                                                                                           \
    int got_ = tessera_last_error_code();                                                        \
    CHECK(got_ == (code), "%s: expected last error %s, got %s (%d)", (what), code_name(code),    \
          code_name(got_), got_);                                                                \
    CHECK(tessera_last_error()[0] != '\0', "%s: error %s recorded with an empty message",        \
          (what), code_name(code));                                                              \
  } while (0)

/* No error was recorded since the last tessera_clear_last_error(). */
#define EXPECT_NO_ERROR(what)                                                                    \
  do {                                                                                           \
    int got_ = tessera_last_error_code();                                                        \
    CHECK(got_ == TESSERA_OK, "%s: expected no error, got %s (%d)", (what), code_name(got_),     \
          got_);                                                                                 \
    CHECK(tessera_last_error()[0] == '\0', "%s: no error code but a message", (what));           \
  } while (0)

static int starts_with(const char *s, const char *prefix) {
  return strncmp(s, prefix, strlen(prefix)) == 0;
}

/* ---------------------------------------------------------------------------------------------
 * Streams: distinct non-null handles (the simulated driver only compares them).
 * ------------------------------------------------------------------------------------------- */

#define STREAM_A ((cudaStream_t)(uintptr_t)0x10)
#define STREAM_B ((cudaStream_t)(uintptr_t)0x20)

/* ---------------------------------------------------------------------------------------------
 * Live allocations and their patterns.
 *
 * Every allocation gets a seed; word i (8 bytes at offset 8*i) holds mix(seed, i), and the tail
 * bytes of a size that is not a multiple of 8 hold the bytes of the next word. The whole
 * allocation is written at allocation and compared in full at free; after every other operation
 * one word per 512 B and the last byte of every live allocation are compared.
 * ------------------------------------------------------------------------------------------- */

typedef struct {
  unsigned char *ptr;
  size_t size; /* bytes asked for */
  int device;
  cudaStream_t stream;
  uint64_t seed;
} live_t;

#define MAX_LIVE 512
static live_t live[MAX_LIVE];
static size_t nlive;
static uint64_t next_seed = 1;
static unsigned long total_allocs, total_frees, pattern_words_checked;

static uint64_t mix(uint64_t seed, uint64_t i) {
  uint64_t z = seed * 0x9E3779B97F4A7C15ull + i * 0xD1B54A32D192ED03ull + 0x632BE59BD9B4E019ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

static void fill_pattern(unsigned char *p, size_t size, uint64_t seed) {
  size_t words = size / 8, i;
  for (i = 0; i < words; i++) {
    uint64_t w = mix(seed, i);
    memcpy(p + 8 * i, &w, 8);
  }
  if (size % 8) {
    uint64_t w = mix(seed, words);
    memcpy(p + 8 * words, &w, size % 8);
  }
}

static void check_word(const live_t *l, size_t i) {
  uint64_t want = mix(l->seed, i), got;
  size_t n = (8 * i + 8 <= l->size) ? 8 : l->size - 8 * i;
  got = want;
  memcpy(&got, l->ptr + 8 * i, n);
  ++pattern_words_checked;
  if (got != want) {
    fail_at(__FILE__, __LINE__, "pattern intact",
            "allocation %p (%zu B, device %d, stream %p, seed %" PRIu64
            ") lost its pattern at offset %zu: expected %016" PRIx64 ", found %016" PRIx64
            " (the memory was reused, unmapped or remapped under a live allocation)",
            (void *)l->ptr, l->size, l->device, (void *)l->stream, l->seed, 8 * i, want, got);
  }
}

static void check_pattern(const live_t *l, int full) {
  size_t words = (l->size + 7) / 8, i, step = full ? 1 : 64; /* 64 words = 512 B */
  for (i = 0; i < words; i += step) check_word(l, i);
  check_word(l, words - 1);
}

/* Checks every live pattern (sampled) and that the stats agree with what is live. */
static void check_stats_consistent(int dev);
static void check_all(void) {
  size_t i;
  int d;
  for (i = 0; i < nlive; i++) check_pattern(&live[i], 0);
  for (d = 0; d < NDEV; d++) check_stats_consistent(d);
}

static live_t *find_live(const void *p) {
  size_t i;
  for (i = 0; i < nlive; i++)
    if (live[i].ptr == p) return &live[i];
  return NULL;
}

static void forget(const void *p) {
  live_t *l = find_live(p);
  CHECK(l != NULL, "internal: %p is not tracked", p);
  *l = live[--nlive];
}

/* Starts tracking a fresh allocation: no overlap with any live one, aligned, pattern written. */
static void track(void *p, size_t size, int dev, cudaStream_t s) {
  size_t i;
  uintptr_t a = (uintptr_t)p;
  CHECK(nlive < MAX_LIVE, "internal: more than %d live allocations", MAX_LIVE);
  CHECK(a % 512 == 0, "tessera_malloc(%zu) returned %p, not 512-byte aligned", size, p);
  for (i = 0; i < nlive; i++) {
    uintptr_t b = (uintptr_t)live[i].ptr;
    CHECK(a + size <= b || b + live[i].size <= a,
          "tessera_malloc(%zu, device %d) returned %p, which overlaps the live allocation %p "
          "(%zu B, device %d)",
          size, dev, p, (void *)live[i].ptr, live[i].size, live[i].device);
  }
  live[nlive].ptr = p;
  live[nlive].size = size;
  live[nlive].device = dev;
  live[nlive].stream = s;
  live[nlive].seed = next_seed++;
  fill_pattern(p, size, live[nlive].seed);
  ++nlive;
  ++total_allocs;
}

/* ---------------------------------------------------------------------------------------------
 * Stats.
 * ------------------------------------------------------------------------------------------- */

static tessera_stats stats(int dev) {
  tessera_stats s;
  int rc;
  memset(&s, 0xEE, sizeof s);
  s.size = sizeof s;
  rc = tessera_get_stats(dev, &s);
  CHECK(rc == 0, "tessera_get_stats(%d) returned %d (%s)", dev, rc, code_name(rc));
  CHECK(s.size == sizeof s, "tessera_get_stats(%d) set size to %" PRIu64 ", expected %zu", dev,
        s.size, sizeof s);
  return s;
}

/* Fails naming every field that differs between a and b, except those in `ignore` (a
 * space-separated list of field names). */
static void expect_same_except(const tessera_stats *a, const tessera_stats *b,
                               const char *ignore, const char *what) {
  size_t i;
  char diffs[2048] = "";
  for (i = 0; i < STATS_NFIELDS; i++) {
    const char *name = FIELDS[i].name, *hit = strstr(ignore, name);
    size_t n = strlen(name);
    int ignored = 0;
    while (hit) {
      if ((hit == ignore || hit[-1] == ' ') && (hit[n] == ' ' || hit[n] == '\0')) {
        ignored = 1;
        break;
      }
      hit = strstr(hit + 1, name);
    }
    if (!ignored && field_value(a, i) != field_value(b, i)) {
      char one[160];
      snprintf(one, sizeof one, " %s %" PRIu64 " -> %" PRIu64 ";", name, field_value(a, i),
               field_value(b, i));
      if (strlen(diffs) + strlen(one) < sizeof diffs) strcat(diffs, one);
    }
  }
  CHECK(diffs[0] == '\0', "%s: stats changed where nothing should have:%s", what, diffs);
}

static uint64_t live_requested(int dev, uint64_t *count) {
  uint64_t sum = 0, n = 0;
  size_t i;
  for (i = 0; i < nlive; i++)
    if (live[i].device == dev) {
      sum += live[i].size;
      ++n;
    }
  *count = n;
  return sum;
}

/* The limit each device's stats must report (0: none). */
static uint64_t expected_limit[NDEV] = {TESSERA_NO_LIMIT, TESSERA_NO_LIMIT};

/* What must hold of any device's stats at any moment, given what this program holds live. */
static void check_stats_consistent(int dev) {
  tessera_stats s = stats(dev);
  uint64_t n, req = live_requested(dev, &n);
  CHECK(s.requested_bytes == req,
        "device %d: requested_bytes %" PRIu64 " but this program holds %" PRIu64
        " requested bytes live",
        dev, s.requested_bytes, req);
  CHECK(s.active_blocks == n, "device %d: active_blocks %" PRIu64 " but %" PRIu64 " are live", dev,
        s.active_blocks, n);
  /* Rounding: under 512 B per large block, under a quarter plus 512 B per small one. */
  CHECK(s.allocated_bytes >= s.requested_bytes &&
            s.allocated_bytes - s.requested_bytes <= 512 * n + s.requested_bytes / 4,
        "device %d: allocated_bytes %" PRIu64 " is not requested_bytes %" PRIu64
        " rounded up (%" PRIu64 " blocks)",
        dev, s.allocated_bytes, s.requested_bytes, n);
  CHECK(s.reserved_bytes >= s.allocated_bytes,
        "device %d: reserved_bytes %" PRIu64 " < allocated_bytes %" PRIu64, dev, s.reserved_bytes,
        s.allocated_bytes);
  CHECK(s.reserved_bytes <= CAPACITY, "device %d: reserved_bytes %" PRIu64 " > capacity", dev,
        s.reserved_bytes);
  CHECK(s.page_size == PAGE, "device %d: page_size %" PRIu64 ", expected %zu", dev, s.page_size,
        PAGE);
  CHECK(s.reserved_bytes % PAGE == 0, "device %d: reserved_bytes %" PRIu64 " is not whole pages",
        dev, s.reserved_bytes);
  CHECK(s.reserved_bytes == (s.mapped_pages + s.pool_pages) * PAGE,
        "device %d: reserved_bytes %" PRIu64 " but mapped_pages %" PRIu64 " + pool_pages %" PRIu64,
        dev, s.reserved_bytes, s.mapped_pages, s.pool_pages);
  CHECK(s.cached_free_bytes == s.reserved_bytes - s.allocated_bytes,
        "device %d: cached_free_bytes %" PRIu64 " != reserved %" PRIu64 " - allocated %" PRIu64,
        dev, s.cached_free_bytes, s.reserved_bytes, s.allocated_bytes);
  CHECK(s.peak_allocated_bytes >= s.allocated_bytes && s.peak_reserved_bytes >= s.reserved_bytes &&
            s.peak_active_blocks >= s.active_blocks &&
            s.peak_requested_bytes >= s.requested_bytes,
        "device %d: a peak below its current value (allocated %" PRIu64 "/%" PRIu64
        ", reserved %" PRIu64 "/%" PRIu64 ", active %" PRIu64 "/%" PRIu64 ")",
        dev, s.allocated_bytes, s.peak_allocated_bytes, s.reserved_bytes, s.peak_reserved_bytes,
        s.active_blocks, s.peak_active_blocks);
  CHECK(s.allocations - s.frees == s.active_blocks,
        "device %d: allocations %" PRIu64 " - frees %" PRIu64 " != active_blocks %" PRIu64, dev,
        s.allocations, s.frees, s.active_blocks);
  CHECK(s.allocated_bytes_total >= s.allocated_bytes,
        "device %d: allocated_bytes_total %" PRIu64 " < allocated_bytes %" PRIu64, dev,
        s.allocated_bytes_total, s.allocated_bytes);
  CHECK(s.largest_free_bytes <= s.cached_free_bytes && s.stranded_bytes <= s.cached_free_bytes,
        "device %d: largest_free_bytes %" PRIu64 " or stranded_bytes %" PRIu64
        " exceeds cached_free_bytes %" PRIu64,
        dev, s.largest_free_bytes, s.stranded_bytes, s.cached_free_bytes);
  CHECK(s.limit_bytes == expected_limit[dev],
        "device %d: limit_bytes %" PRIu64 ", expected %" PRIu64, dev, s.limit_bytes,
        expected_limit[dev]);
  if (s.limit_bytes != TESSERA_NO_LIMIT)
    CHECK(s.reserved_bytes <= s.limit_bytes || s.reserved_bytes == s.peak_reserved_bytes,
          "device %d: reserved %" PRIu64 " above the limit %" PRIu64, dev, s.reserved_bytes,
          s.limit_bytes);
}

/* ---------------------------------------------------------------------------------------------
 * Allocating and freeing through the ABI, checked.
 * ------------------------------------------------------------------------------------------- */

static void *alloc_ok(size_t size, int dev, cudaStream_t s) {
  void *p, *base;
  size_t bsize = 0;
  tessera_clear_last_error();
  p = tessera_malloc(size, dev, s);
  CHECK(p != NULL, "tessera_malloc(%zu, device %d, stream %p) failed", size, dev, (void *)s);
  EXPECT_NO_ERROR("a successful tessera_malloc");
  base = tessera_base_alloc(p, &bsize);
  CHECK(base == p && bsize >= size,
        "tessera_base_alloc(%p) of a fresh %zu B allocation gave %p, size %zu", p, size, base,
        bsize);
  track(p, size, dev, s);
  check_all();
  return p;
}

static void free_ok(void *p, int dev_arg) {
  live_t *l = find_live(p);
  CHECK(l != NULL, "internal: freeing untracked %p", p);
  check_pattern(l, 1);
  tessera_clear_last_error();
  tessera_free(p, l->size, dev_arg, l->stream);
  EXPECT_NO_ERROR("tessera_free of a live allocation");
  forget(p);
  ++total_frees;
  check_all();
}

static void free_all_on(int dev) {
  size_t i = 0;
  while (i < nlive) {
    if (dev < 0 || live[i].device == dev)
      free_ok(live[i].ptr, live[i].device); /* the slot is refilled from the end */
    else
      ++i;
  }
}

/* Calls tessera_free on a pointer that must be refused with `code`, capturing stderr: the library
 * must print exactly one line, "tessera: tessera_free(0x...): <the error message>". */
static void bad_free(void *p, int dev_arg, int code, const char *what) {
  char out[4096], want[4096];
  size_t n;
  int saved;
  FILE *tmp = tmpfile();
  CHECK(tmp != NULL, "internal: tmpfile() failed");
  fflush(stderr);
  saved = dup(2);
  CHECK(saved >= 0 && dup2(fileno(tmp), 2) >= 0, "internal: cannot redirect stderr");
  tessera_clear_last_error();
  tessera_free(p, 4096, dev_arg, STREAM_A);
  fflush(stderr);
  dup2(saved, 2);
  close(saved);
  rewind(tmp);
  n = fread(out, 1, sizeof out - 1, tmp);
  out[n] = '\0';
  fclose(tmp);
  EXPECT_ERROR(code, what);
  snprintf(want, sizeof want, "tessera: tessera_free(0x%" PRIxPTR "): %s\n", (uintptr_t)p,
           tessera_last_error());
  CHECK(strcmp(out, want) == 0,
        "%s: stderr should be exactly one line\n    \"%s\"\n  but was\n    \"%s\"", what, want,
        out);
  check_all();
}

/* ---------------------------------------------------------------------------------------------
 * OOM hooks.
 * ------------------------------------------------------------------------------------------- */

typedef struct {
  int calls;
  int device;
  size_t requested;
  int order;   /* the global call order at this hook's last call */
  void *victim; /* a live allocation the hook frees, or NULL */
  size_t victim_size;
} hook_state;

static int hook_order;

static size_t recording_hook(int device, size_t requested, void *user) {
  hook_state *h = user;
  h->calls++;
  h->device = device;
  h->requested = requested;
  h->order = ++hook_order;
  return 0;
}

/* Frees the victim from inside the OOM sequence, as an eviction hook in PyTorch would. */
static size_t freeing_hook(int device, size_t requested, void *user) {
  hook_state *h = user;
  size_t freed = 0;
  h->calls++;
  h->device = device;
  h->requested = requested;
  h->order = ++hook_order;
  if (h->victim) {
    live_t *l = find_live(h->victim);
    if (l) check_pattern(l, 1);
    tessera_clear_last_error();
    tessera_free(h->victim, h->victim_size, device, STREAM_A);
    if (tessera_last_error_code() == TESSERA_OK && l) {
      forget(h->victim);
      ++total_frees;
    }
    freed = h->victim_size;
    h->victim = NULL;
  }
  return freed;
}

/* ---------------------------------------------------------------------------------------------
 * The phases.
 * ------------------------------------------------------------------------------------------- */

static void phase_before_the_allocator(void) {
  const char *v;
  phase = "before the allocator exists";
  CHECK(tessera_last_error_code() == TESSERA_OK, "a fresh thread has an error");
  CHECK(strcmp(tessera_last_error(), "") == 0, "a fresh thread has an error message");
  v = tessera_version();
  CHECK(v != NULL && v[0] >= '0' && v[0] <= '9' && strchr(v, '.') != NULL,
        "tessera_version() = \"%s\" is not a version", v ? v : "(null)");

  CHECK(tessera_configure(NULL) == TESSERA_ERROR_INVALID_ARGUMENT, "tessera_configure(NULL)");
  EXPECT_ERROR(TESSERA_ERROR_INVALID_ARGUMENT, "tessera_configure(NULL)");
  CHECK(tessera_configure("no_such_key:1") == TESSERA_ERROR_CONFIG,
        "tessera_configure with an unknown key must be a CONFIG error");
  EXPECT_ERROR(TESSERA_ERROR_CONFIG, "tessera_configure(\"no_such_key:1\")");
  CHECK(strstr(tessera_last_error(), "no_such_key") != NULL,
        "the configuration error should name the bad key");
  CHECK(tessera_configure("page_size:3MiB") == TESSERA_ERROR_CONFIG,
        "page_size 3 MiB is not a power of two");

  /* Errors are sticky (errno's rule) until cleared. */
  tessera_clear_last_error();
  EXPECT_NO_ERROR("after tessera_clear_last_error");

  /* A good configuration, before the first allocation: every mutation is self-checked. */
  CHECK(tessera_configure("check_invariants:true") == 0,
        "tessera_configure before the allocator exists must succeed");
  EXPECT_NO_ERROR("tessera_configure(\"check_invariants:true\")");
}

static void phase_devices(void) {
  int d;
  phase = "devices and initial stats";
  tessera_clear_last_error();
  CHECK(tessera_device_count() == NDEV, "tessera_device_count() = %d, TESSERA_SIM says %d",
        tessera_device_count(), NDEV);
  tessera_init(NDEV);
  EXPECT_NO_ERROR("tessera_init(2) on 2 devices");
  tessera_init(NDEV + 1);
  EXPECT_ERROR(TESSERA_ERROR_INVALID_DEVICE, "tessera_init(3) on 2 devices");
  tessera_clear_last_error();

  for (d = 0; d < NDEV; d++) {
    tessera_stats s = stats(d);
    tessera_stats zero;
    memset(&zero, 0, sizeof zero);
    zero.size = sizeof zero;
    zero.page_size = PAGE;
    zero.limit_bytes = TESSERA_NO_LIMIT;
    expect_same_except(&zero, &s, "", "a device no one has used");
    CHECK(tessera_check_invariants(d) == 0, "check_invariants(%d) on a fresh device", d);
  }
}

/* The basic set: small and large sizes on both streams of both devices, with exact stats. */
static void *basic_3mib[NDEV], *basic_4k[NDEV], *basic_big[NDEV];

static void phase_basic(void) {
  int d;
  phase = "basic allocations and exact stats";
  for (d = 0; d < NDEV; d++) {
    tessera_stats s;
    size_t big = d == 0 ? 40 * MIB : 24 * MIB;
    /* size asked, size after rounding: 512 B steps, or the size class for small requests
     * (classes of 512 B up to 2 KiB, then 4 per doubling up to 1 MiB). */
    uint64_t asked = 0, rounded = 0;
    void *p;

    p = alloc_ok(512, d, STREAM_A); asked += 512; rounded += 512; (void)p;
    basic_4k[d] = alloc_ok(4096, d, STREAM_A); asked += 4096; rounded += 4096;
    p = alloc_ok(1 * MIB, d, STREAM_A); asked += MIB; rounded += MIB;
    basic_big[d] = alloc_ok(big, d, STREAM_A); asked += big; rounded += big;
    p = alloc_ok(1000, d, STREAM_B); asked += 1000; rounded += 1024;
    p = alloc_ok(64 * KIB, d, STREAM_B); asked += 64 * KIB; rounded += 64 * KIB;
    p = alloc_ok(MIB + 1, d, STREAM_B); asked += MIB + 1; rounded += MIB + 512;
    basic_3mib[d] = alloc_ok(3 * MIB, d, STREAM_B); asked += 3 * MIB; rounded += 3 * MIB;
    p = alloc_ok(8 * MIB + 512, d, STREAM_B); asked += 8 * MIB + 512; rounded += 8 * MIB + 512;

    if (d == 0) {
      /* The allocator exists now: configuring it is too late. */
      CHECK(tessera_configure("check_invariants:false") == TESSERA_ERROR_CONFIG,
            "tessera_configure after the first allocation must be a CONFIG error");
      EXPECT_ERROR(TESSERA_ERROR_CONFIG, "tessera_configure after the first allocation");
      tessera_clear_last_error();
    }

    s = stats(d);
    CHECK(s.allocated_bytes == rounded,
          "device %d: allocated_bytes %" PRIu64 ", expected %" PRIu64 " (sum of rounded sizes)", d,
          s.allocated_bytes, rounded);
    CHECK(s.requested_bytes == asked, "device %d: requested_bytes %" PRIu64 ", expected %" PRIu64,
          d, s.requested_bytes, asked);
    CHECK(s.active_blocks == 9 && s.peak_active_blocks == 9 && s.allocations == 9 && s.frees == 0,
          "device %d: active %" PRIu64 " peak %" PRIu64 " allocations %" PRIu64 " frees %" PRIu64
          ", expected 9 9 9 0",
          d, s.active_blocks, s.peak_active_blocks, s.allocations, s.frees);
    CHECK(s.peak_allocated_bytes == rounded && s.allocated_bytes_total == rounded,
          "device %d: peak_allocated %" PRIu64 ", allocated_bytes_total %" PRIu64
          ", both should be %" PRIu64,
          d, s.peak_allocated_bytes, s.allocated_bytes_total, rounded);
    CHECK(s.peak_reserved_bytes == s.reserved_bytes && s.reserved_bytes > 0,
          "device %d: peak_reserved %" PRIu64 " reserved %" PRIu64, d, s.peak_reserved_bytes,
          s.reserved_bytes);
    CHECK(s.remaps == 0 && s.ooms == 0 && s.hook_calls == 0 && s.invalid_frees == 0 &&
              s.cache_releases == 0 && s.released_bytes == 0 && s.driver_errors == 0 &&
              s.alloc_retries == 0,
          "device %d: remaps %" PRIu64 " ooms %" PRIu64 " hook_calls %" PRIu64
          " invalid_frees %" PRIu64 " cache_releases %" PRIu64 " driver_errors %" PRIu64
          ", all should be 0 on an uneventful start",
          d, s.remaps, s.ooms, s.hook_calls, s.invalid_frees, s.cache_releases, s.driver_errors);
  }
}

static void phase_base_alloc(void) {
  static char host_thing[64];
  void *p = basic_3mib[0], *q = basic_4k[0], *b;
  size_t sz;
  phase = "tessera_base_alloc";
  tessera_clear_last_error();
  sz = 0;
  b = tessera_base_alloc((char *)p + 12345, &sz);
  CHECK(b == p && sz == 3 * MIB, "base_alloc(3 MiB block + 12345) = %p size %zu, expected %p size %zu",
        b, sz, p, 3 * MIB);
  sz = 0;
  b = tessera_base_alloc((char *)p + 3 * MIB - 1, &sz);
  CHECK(b == p && sz == 3 * MIB, "base_alloc(last byte of the 3 MiB block) = %p size %zu", b, sz);
  b = tessera_base_alloc((char *)p + 3 * MIB, &sz);
  CHECK(b != p, "base_alloc(one past the end of %p) returned that block", p);
  tessera_clear_last_error();
  sz = 0;
  b = tessera_base_alloc((char *)q + 100, &sz);
  CHECK(b == q && sz == 4096, "base_alloc(4 KiB block + 100) = %p size %zu, expected %p size 4096",
        b, sz, q);
  b = tessera_base_alloc((char *)q + 100, NULL);
  CHECK(b == q, "base_alloc(interior, NULL size) = %p, expected %p", b, q);
  EXPECT_NO_ERROR("tessera_base_alloc of live memory");

  sz = 77;
  b = tessera_base_alloc(host_thing, &sz);
  CHECK(b == NULL, "base_alloc(a host array) = %p, expected NULL", b);
  EXPECT_ERROR(TESSERA_ERROR_UNKNOWN_POINTER, "base_alloc(a host array)");
  CHECK(sz == 77, "base_alloc of an unknown pointer wrote *size = %zu", sz);
  tessera_clear_last_error();
  check_all();
}

static void phase_free_and_empty_cache(void) {
  tessera_stats before, after, s;
  size_t released, again;
  phase = "free, peaks and empty_cache";
  before = stats(0);
  free_ok(basic_big[0], 0); /* 40 MiB */
  after = stats(0);
  CHECK(after.allocated_bytes == before.allocated_bytes - 40 * MIB,
        "allocated_bytes %" PRIu64 " -> %" PRIu64 " after freeing 40 MiB", before.allocated_bytes,
        after.allocated_bytes);
  CHECK(after.reserved_bytes == before.reserved_bytes,
        "a free must keep the memory cached: reserved %" PRIu64 " -> %" PRIu64,
        before.reserved_bytes, after.reserved_bytes);
  CHECK(after.peak_allocated_bytes == before.peak_allocated_bytes && after.frees == 1,
        "peak_allocated %" PRIu64 " -> %" PRIu64 ", frees %" PRIu64, before.peak_allocated_bytes,
        after.peak_allocated_bytes, after.frees);
  expect_same_except(&before, &after,
                     "allocated_bytes requested_bytes active_blocks frees cached_free_bytes "
                     "largest_free_bytes stranded_bytes segments",
                     "freeing one block");

  CHECK(tessera_reset_peak_stats(0) == 0, "tessera_reset_peak_stats(0)");
  s = stats(0);
  CHECK(s.peak_allocated_bytes == s.allocated_bytes && s.peak_reserved_bytes == s.reserved_bytes &&
            s.peak_active_blocks == s.active_blocks &&
            s.peak_requested_bytes == s.requested_bytes,
        "after reset_peak_stats the peaks are the current values (allocated %" PRIu64 "/%" PRIu64
        ")",
        s.allocated_bytes, s.peak_allocated_bytes);

  tessera_clear_last_error();
  released = tessera_empty_cache(0);
  EXPECT_NO_ERROR("tessera_empty_cache(0)");
  s = stats(0);
  CHECK(released >= 36 * MIB && released % PAGE == 0,
        "empty_cache(0) released %zu B after a 40 MiB block was freed (expected whole pages, at "
        "least 36 MiB)",
        released);
  CHECK(s.reserved_bytes == after.reserved_bytes - released,
        "reserved %" PRIu64 " -> %" PRIu64 " but empty_cache said it released %zu",
        after.reserved_bytes, s.reserved_bytes, released);
  CHECK(s.released_bytes == after.released_bytes + released &&
            s.cache_releases > after.cache_releases,
        "released_bytes %" PRIu64 " -> %" PRIu64 ", cache_releases %" PRIu64 " -> %" PRIu64,
        after.released_bytes, s.released_bytes, after.cache_releases, s.cache_releases);
  CHECK(s.allocated_bytes == after.allocated_bytes, "empty_cache changed allocated_bytes");
  again = tessera_empty_cache(0);
  CHECK(again == 0, "a second empty_cache(0) released %zu B more, with nothing freed in between",
        again);
  check_all();
}

static void phase_size_protocol(void) {
  const uint64_t canary = 0xC0FFEEC0FFEE1234ull;
  tessera_stats full = stats(0);
  int rc;
  phase = "the stats size protocol";
  {
    /* An older caller that knows two fields: size + allocated_bytes. */
    struct {
      uint64_t size;
      uint64_t allocated_bytes;
      uint64_t after[2];
    } old;
    old.size = 8 + 8;
    old.allocated_bytes = canary;
    old.after[0] = old.after[1] = canary;
    rc = tessera_get_stats(0, (tessera_stats *)(void *)&old);
    CHECK(rc == 0, "get_stats with size 16 returned %d", rc);
    CHECK(old.size == 16, "size 16 in, %" PRIu64 " out", old.size);
    CHECK(old.allocated_bytes == full.allocated_bytes,
          "the short struct's allocated_bytes is %" PRIu64 ", expected %" PRIu64,
          old.allocated_bytes, full.allocated_bytes);
    CHECK(old.after[0] == canary && old.after[1] == canary,
          "get_stats wrote past the caller's 16 bytes");
  }
  {
    uint64_t buf[3] = {8, canary, canary};
    rc = tessera_get_stats(0, (tessera_stats *)(void *)buf);
    CHECK(rc == 0 && buf[0] == 8 && buf[1] == canary && buf[2] == canary,
          "size 8: rc %d, size out %" PRIu64 ", wrote past it: %d", rc, buf[0],
          buf[1] != canary || buf[2] != canary);
  }
  {
    /* A size that ends inside a field: nothing is written past it. */
    unsigned char buf[32];
    uint64_t in = 20, out;
    size_t i;
    memset(buf, 0xAB, sizeof buf);
    memcpy(buf, &in, 8);
    rc = tessera_get_stats(0, (tessera_stats *)(void *)buf);
    memcpy(&out, buf, 8);
    CHECK(rc == 0 && out >= 8 && out <= 20, "size 20: rc %d, size out %" PRIu64, rc, out);
    for (i = (size_t)out; i < sizeof buf; i++)
      CHECK(buf[i] == 0xAB, "size 20: byte %zu (beyond the %" PRIu64 " written) changed", i, out);
  }
  {
    /* A newer caller with a bigger struct gets what the library knows, and size says so. */
    unsigned char buf[sizeof(tessera_stats) + 16];
    uint64_t in = sizeof buf, out;
    size_t i;
    memset(buf, 0xAB, sizeof buf);
    memcpy(buf, &in, 8);
    rc = tessera_get_stats(0, (tessera_stats *)(void *)buf);
    memcpy(&out, buf, 8);
    CHECK(rc == 0 && out == sizeof(tessera_stats),
          "size %zu: rc %d, size out %" PRIu64 ", expected %zu", sizeof buf, rc, out,
          sizeof(tessera_stats));
    for (i = sizeof(tessera_stats); i < sizeof buf; i++)
      CHECK(buf[i] == 0xAB, "bigger struct: byte %zu beyond the library's struct changed", i);
  }
  {
    uint64_t buf[2] = {7, canary};
    tessera_clear_last_error();
    rc = tessera_get_stats(0, (tessera_stats *)(void *)buf);
    CHECK(rc == TESSERA_ERROR_INVALID_ARGUMENT, "size 7 returned %d", rc);
    EXPECT_ERROR(TESSERA_ERROR_INVALID_ARGUMENT, "get_stats with size 7");
    CHECK(buf[0] == 7 && buf[1] == canary, "a refused get_stats wrote into the struct");
    buf[0] = 0;
    rc = tessera_get_stats(0, (tessera_stats *)(void *)buf);
    CHECK(rc == TESSERA_ERROR_INVALID_ARGUMENT, "size 0 returned %d", rc);
  }
  tessera_clear_last_error();
  rc = tessera_get_stats(0, NULL);
  CHECK(rc == TESSERA_ERROR_INVALID_ARGUMENT, "get_stats(0, NULL) returned %d", rc);
  EXPECT_ERROR(TESSERA_ERROR_INVALID_ARGUMENT, "get_stats(0, NULL)");
  tessera_clear_last_error();
}

static int snapshot_has(int dev, const char *needle) {
  size_t n = tessera_snapshot_json(dev, NULL, 0);
  char *buf = malloc(n + 1);
  int found;
  CHECK(buf != NULL, "internal: out of host memory");
  CHECK(tessera_snapshot_json(dev, buf, n + 1) == n, "snapshot length changed between calls");
  found = strstr(buf, needle) != NULL;
  free(buf);
  return found;
}

static void phase_record_stream(void) {
  static char host_thing[64];
  void *r;
  tessera_stats before, after;
  char needle[96];
  phase = "record_stream";
  r = alloc_ok(6 * MIB, 1, STREAM_A);
  tessera_clear_last_error();
  tessera_record_stream(r, STREAM_B);
  EXPECT_NO_ERROR("record_stream(live, other stream)");
  tessera_record_stream(r, STREAM_B); /* again: no harm */
  tessera_record_stream(r, STREAM_A); /* its own stream: nothing to wait for */
  EXPECT_NO_ERROR("record_stream(live, same stream twice / own stream)");
  tessera_record_stream(host_thing, STREAM_B);
  EXPECT_ERROR(TESSERA_ERROR_UNKNOWN_POINTER, "record_stream(a host array)");
  tessera_clear_last_error();
  tessera_record_stream(NULL, STREAM_B);
  CHECK(tessera_last_error_code() != TESSERA_OK, "record_stream(NULL) was accepted");
  tessera_clear_last_error();
  check_all();

  before = stats(1);
  free_ok(r, -1); /* device found by pointer */
  after = stats(1);
  CHECK(after.allocated_bytes == before.allocated_bytes - 6 * MIB && after.frees == before.frees + 1,
        "a free of a record_stream'ed block counts at once: allocated %" PRIu64 " -> %" PRIu64,
        before.allocated_bytes, after.allocated_bytes);
  /* Freed while another stream may still use it: parked until that stream's work is done. */
  snprintf(needle, sizeof needle, "\"address\":%" PRIuPTR ",", (uintptr_t)r);
  CHECK(snapshot_has(1, needle), "the snapshot of device 1 lost the block at %p", r);
  CHECK(snapshot_has(1, "\"pending_free\""),
        "after freeing a block recorded on another stream, the snapshot shows no pending_free "
        "block: record_stream had no effect");
  bad_free(r, -1, TESSERA_ERROR_DOUBLE_FREE, "double free of a block waiting for its streams");
  /* empty_cache waits for the streams, then releases: nothing stays pending. */
  tessera_empty_cache(1);
  CHECK(!snapshot_has(1, "\"pending_free\""), "empty_cache left a pending_free block");
  check_all();
}

static void phase_oom_and_hooks(void) {
  void *held, *filler, *p;
  tessera_stats before, after;
  hook_state rec, frees;
  int id_rec, id_free, rc;
  const char *msg;
  phase = "OOM, then OOM hooks";

  /* Device 1 from scratch: nothing live, nothing reserved. */
  free_all_on(1);
  tessera_empty_cache(1);
  CHECK(stats(1).reserved_bytes == 0, "device 1 keeps %" PRIu64 " B reserved with nothing live",
        stats(1).reserved_bytes);

  held = alloc_ok(32 * MIB, 1, STREAM_A);
  filler = alloc_ok(24 * MIB, 1, STREAM_B);
  (void)filler;

  /* 56 MiB live on 64 MiB, nothing cached: 16 MiB cannot be had, and nothing can be freed. */
  before = stats(1);
  tessera_clear_last_error();
  p = tessera_malloc(16 * MIB, 1, STREAM_A);
  CHECK(p == NULL, "16 MiB on a device with 8 MiB free succeeded (%p)", p);
  EXPECT_ERROR(TESSERA_ERROR_OUT_OF_MEMORY, "16 MiB with 8 MiB free");
  msg = tessera_last_error();
  CHECK(starts_with(msg, "CUDA out of memory."), "the OOM message must start with "
        "\"CUDA out of memory.\"; it is \"%s\"", msg);
  after = stats(1);
  CHECK(after.ooms == before.ooms + 1, "ooms %" PRIu64 " -> %" PRIu64, before.ooms, after.ooms);
  /* The failed attempt may map the free 8 MiB before it fails, then gives it back: reserved is
   * unchanged, the releases are counted, and the peak saw the attempt. */
  expect_same_except(&before, &after,
                     "ooms cache_releases released_bytes peak_reserved_bytes alloc_retries",
                     "a failed allocation with nothing to release");
  CHECK(after.alloc_retries == before.alloc_retries + 1,
        "alloc_retries %" PRIu64 " -> %" PRIu64 ": the failed request released the cache and "
        "retried once",
        before.alloc_retries, after.alloc_retries);
  check_all();

  /* Larger than the device: OOM too (not an invalid size), with the same prefix. */
  tessera_clear_last_error();
  p = tessera_malloc(1024 * MIB, 1, STREAM_A);
  CHECK(p == NULL, "1 GiB on a 64 MiB device succeeded");
  EXPECT_ERROR(TESSERA_ERROR_OUT_OF_MEMORY, "1 GiB on a 64 MiB device");
  CHECK(starts_with(tessera_last_error(), "CUDA out of memory."), "message: \"%s\"",
        tessera_last_error());
  tessera_clear_last_error();

  /* Two hooks, in registration order: one only records, one frees `held`. */
  memset(&rec, 0, sizeof rec);
  memset(&frees, 0, sizeof frees);
  frees.victim = held;
  frees.victim_size = 32 * MIB;
  id_rec = tessera_add_oom_hook(recording_hook, &rec);
  id_free = tessera_add_oom_hook(freeing_hook, &frees);
  CHECK(id_rec >= 0 && id_free >= 0 && id_rec != id_free, "hook ids %d and %d", id_rec, id_free);
  EXPECT_NO_ERROR("tessera_add_oom_hook");

  before = stats(1);
  p = tessera_malloc(16 * MIB, 1, STREAM_A);
  CHECK(p != NULL, "with a hook that frees 32 MiB, the 16 MiB request still failed");
  EXPECT_NO_ERROR("an allocation that a hook rescued");
  CHECK(rec.calls == 1 && frees.calls == 1, "hooks called %d and %d times, expected once each",
        rec.calls, frees.calls);
  CHECK(rec.order == 1 && frees.order == 2, "hooks must run in registration order");
  CHECK(frees.device == 1 && frees.requested == 16 * MIB,
        "the hook got device %d, requested %zu; expected 1, %zu", frees.device, frees.requested,
        16 * MIB);
  CHECK(find_live(held) == NULL, "the hook did not manage to free the held block");
  track(p, 16 * MIB, 1, STREAM_A);
  after = stats(1);
  CHECK(after.hook_calls == before.hook_calls + 2,
        "hook_calls %" PRIu64 " -> %" PRIu64 ", expected +2 (two hooks, one OOM sequence)",
        before.hook_calls, after.hook_calls);
  CHECK(after.ooms == before.ooms, "a rescued allocation counted as an OOM");
  CHECK(after.allocated_bytes == 40 * MIB, "allocated %" PRIu64 ", expected 24 + 16 MiB",
        after.allocated_bytes);
  check_all();

  /* A hook that cannot help: the request fails, and both hooks were asked. */
  rec.calls = frees.calls = 0;
  hook_order = 0;
  tessera_clear_last_error();
  p = tessera_malloc(32 * MIB, 1, STREAM_A);
  CHECK(p == NULL, "32 MiB with 24 MiB free succeeded");
  EXPECT_ERROR(TESSERA_ERROR_OUT_OF_MEMORY, "32 MiB with 24 MiB free and helpless hooks");
  CHECK(rec.calls == 1 && frees.calls == 1, "hooks called %d and %d times", rec.calls,
        frees.calls);
  tessera_clear_last_error();

  CHECK(tessera_remove_oom_hook(id_rec) == 0, "removing hook %d", id_rec);
  CHECK(tessera_remove_oom_hook(id_free) == 0, "removing hook %d", id_free);
  rc = tessera_remove_oom_hook(id_free);
  CHECK(rc == TESSERA_ERROR_INVALID_ARGUMENT, "removing hook %d twice returned %d", id_free, rc);
  EXPECT_ERROR(TESSERA_ERROR_INVALID_ARGUMENT, "removing a removed hook");
  CHECK(tessera_remove_oom_hook(12345) == TESSERA_ERROR_INVALID_ARGUMENT, "remove_oom_hook(12345)");
  CHECK(tessera_remove_oom_hook(-1) == TESSERA_ERROR_INVALID_ARGUMENT, "remove_oom_hook(-1)");
  tessera_clear_last_error();
  CHECK(tessera_add_oom_hook(NULL, NULL) == -1, "add_oom_hook(NULL) must return -1");
  EXPECT_ERROR(TESSERA_ERROR_INVALID_ARGUMENT, "add_oom_hook(NULL)");

  /* Removed hooks are not called. */
  rec.calls = frees.calls = 0;
  tessera_clear_last_error();
  CHECK(tessera_malloc(32 * MIB, 1, STREAM_A) == NULL, "32 MiB with 24 MiB free succeeded");
  CHECK(rec.calls == 0 && frees.calls == 0, "removed hooks were called (%d, %d)", rec.calls,
        frees.calls);
  tessera_clear_last_error();
  check_all();
}

static void phase_remap(void) {
  void *blocks[32], *big1, *big2;
  tessera_stats s, before;
  uint64_t remaps_before;
  int i;
  phase = "remapping";

  free_all_on(1);
  tessera_empty_cache(1);
  s = stats(1);
  CHECK(s.reserved_bytes == 0 && s.mapped_pages == 0,
        "device 1 still holds %" PRIu64 " B / %" PRIu64 " pages with nothing live",
        s.reserved_bytes, s.mapped_pages);

  /* Fill the 64 MiB device with 32 blocks of 2 MiB, on alternating streams. */
  for (i = 0; i < 32; i++) blocks[i] = alloc_ok(2 * MIB, 1, i % 2 ? STREAM_B : STREAM_A);
  s = stats(1);
  CHECK(s.reserved_bytes == CAPACITY && s.allocated_bytes == CAPACITY,
        "32 x 2 MiB: reserved %" PRIu64 " allocated %" PRIu64 ", expected the whole 64 MiB",
        s.reserved_bytes, s.allocated_bytes);

  /* Free every other one (the stream-A ones): 32 MiB free, no two free pages adjacent. */
  for (i = 0; i < 32; i += 2) free_ok(blocks[i], 1);
  s = stats(1);
  CHECK(s.allocated_bytes == 32 * MIB && s.reserved_bytes == CAPACITY,
        "after freeing every other block: allocated %" PRIu64 " reserved %" PRIu64,
        s.allocated_bytes, s.reserved_bytes);
  CHECK(s.largest_free_bytes == 32 * MIB,
        "largest_free_bytes %" PRIu64 ": all 16 free pages can be gathered, so 32 MiB",
        s.largest_free_bytes);
  remaps_before = s.remaps;
  before = s;

  /* 16 MiB contiguous exists nowhere: only remapping free pages can serve it. */
  big1 = alloc_ok(16 * MIB, 1, STREAM_B);
  s = stats(1);
  CHECK(s.remaps > remaps_before,
        "a 16 MiB block on a device with only 2 MiB holes was served without a remap "
        "(remaps %" PRIu64 " -> %" PRIu64 ")",
        remaps_before, s.remaps);
  CHECK(s.remaps - remaps_before <= 8, "16 MiB needs at most 8 remapped pages, %" PRIu64 " were",
        s.remaps - remaps_before);
  CHECK(s.reserved_bytes == CAPACITY, "reserved %" PRIu64 " after remapping", s.reserved_bytes);
  CHECK(s.ooms == before.ooms && s.hook_calls == before.hook_calls,
        "the remapped request went through the OOM path (ooms %" PRIu64 " -> %" PRIu64 ")",
        before.ooms, s.ooms);

  /* The other 8 free pages: the device is full again, and every survivor kept its data. */
  big2 = alloc_ok(16 * MIB, 1, STREAM_A);
  s = stats(1);
  CHECK(s.allocated_bytes == CAPACITY && s.remaps > remaps_before,
        "allocated %" PRIu64 " after gathering all free pages", s.allocated_bytes);
  printf("abi_test: remap phase: %" PRIu64 " remaps\n", s.remaps);

  free_ok(big1, 1);
  free_ok(big2, -1);
  for (i = 1; i < 32; i += 2) free_ok(blocks[i], -1);
}

static void phase_limits(void) {
  void *p;
  tessera_stats s;
  phase = "limits: set_limit and set_memory_fraction";
  free_all_on(1);
  tessera_empty_cache(1);
  CHECK(stats(1).reserved_bytes == 0, "device 1 holds memory with nothing live");

  /* A byte limit: 16 MiB. 12 MiB fits, 8 MiB more does not; removing the limit lets it. */
  CHECK(tessera_set_limit(1, 16 * MIB) == 0, "set_limit(1, 16 MiB)");
  expected_limit[1] = 16 * MIB;
  check_all();
  p = alloc_ok(12 * MIB, 1, STREAM_A);
  tessera_clear_last_error();
  CHECK(tessera_malloc(8 * MIB, 1, STREAM_A) == NULL, "8 MiB more under a 16 MiB limit succeeded");
  EXPECT_ERROR(TESSERA_ERROR_OUT_OF_MEMORY, "past the 16 MiB limit");
  CHECK(strstr(tessera_last_error(), "limit") != NULL,
        "an OOM at the limit should mention the limit: \"%s\"", tessera_last_error());
  CHECK(stats(1).reserved_bytes <= 16 * MIB, "reserved past the 16 MiB limit");
  CHECK(tessera_set_limit(1, TESSERA_NO_LIMIT) == 0, "set_limit(1, TESSERA_NO_LIMIT) removes the limit");
  expected_limit[1] = TESSERA_NO_LIMIT;
  alloc_ok(8 * MIB, 1, STREAM_A);
  free_all_on(1);
  (void)p;

  /* A fraction: 0.5 of 64 MiB. */
  tessera_empty_cache(1);
  tessera_clear_last_error();
  tessera_set_memory_fraction(0.5, 1);
  EXPECT_NO_ERROR("set_memory_fraction(0.5, 1)");
  expected_limit[1] = 32 * MIB;
  s = stats(1);
  CHECK(s.limit_bytes == 32 * MIB, "fraction 0.5 of 64 MiB: limit_bytes %" PRIu64, s.limit_bytes);
  alloc_ok(24 * MIB, 1, STREAM_B);
  CHECK(tessera_malloc(16 * MIB, 1, STREAM_B) == NULL, "past a 0.5 fraction");
  EXPECT_ERROR(TESSERA_ERROR_OUT_OF_MEMORY, "past a 0.5 fraction");
  tessera_clear_last_error();
  /* A byte limit and a fraction: the smaller applies. */
  CHECK(tessera_set_limit(1, 8 * MIB) == 0 && stats(1).limit_bytes == 8 * MIB,
        "limit 8 MiB under fraction 0.5: limit_bytes %" PRIu64, stats(1).limit_bytes);
  CHECK(tessera_set_limit(1, TESSERA_NO_LIMIT) == 0, "set_limit(1, TESSERA_NO_LIMIT)");
  tessera_set_memory_fraction(1.0, 1);
  expected_limit[1] = CAPACITY; /* a fraction stays; 1.0 is the whole device */
  alloc_ok(16 * MIB, 1, STREAM_B);
  free_all_on(1);

  /* Fraction 0 is accepted, as PyTorch accepts it, and then nothing new can be reserved. */
  tessera_empty_cache(1);
  tessera_clear_last_error();
  tessera_set_memory_fraction(0.0, 1);
  EXPECT_NO_ERROR("set_memory_fraction(0.0, 1)");
  CHECK(tessera_malloc(2 * MIB, 1, STREAM_A) == NULL,
        "an allocation under memory fraction 0 succeeded");
  EXPECT_ERROR(TESSERA_ERROR_OUT_OF_MEMORY, "under memory fraction 0");
  tessera_clear_last_error();
  tessera_set_memory_fraction(1.0, 1);
  EXPECT_NO_ERROR("set_memory_fraction(1.0, 1)");
  check_all();
}

static void phase_bad_input(void) {
  static char host_thing[4096];
  tessera_stats s0, s1, t0, t1;
  void *p3 = basic_3mib[0], *p4k = basic_4k[0], *x, *y, *p;
  int rc;
  phase = "bad input";

  s0 = stats(0);
  s1 = stats(1);
  tessera_clear_last_error();
  tessera_free(NULL, 0, 0, STREAM_A);
  tessera_free(NULL, 123, -1, NULL);
  EXPECT_NO_ERROR("tessera_free(NULL)");
  t0 = stats(0);
  t1 = stats(1);
  expect_same_except(&s0, &t0, "", "tessera_free(NULL), device 0");
  expect_same_except(&s1, &t1, "", "tessera_free(NULL), device 1");

  /* Unknown pointer, on a named device: counted there. */
  bad_free(host_thing, 0, TESSERA_ERROR_UNKNOWN_POINTER, "free(a host array, device 0)");
  t0 = stats(0);
  CHECK(t0.invalid_frees == s0.invalid_frees + 1, "invalid_frees %" PRIu64 " -> %" PRIu64,
        s0.invalid_frees, t0.invalid_frees);
  expect_same_except(&s0, &t0, "invalid_frees", "free of an unknown pointer");
  s0 = t0;

  /* Unknown pointer, device unknown: an error, counted nowhere. */
  bad_free(host_thing + 64, -1, TESSERA_ERROR_UNKNOWN_POINTER, "free(a host array, device -1)");
  t0 = stats(0);
  t1 = stats(1);
  expect_same_except(&s0, &t0, "", "free(unknown, device -1), device 0");
  expect_same_except(&s1, &t1, "", "free(unknown, device -1), device 1");

  /* Interior pointers, large and small, device named or found: refused, counted, still live. */
  bad_free((char *)p3 + 4096, 0, TESSERA_ERROR_UNKNOWN_POINTER, "free(inside a 3 MiB block)");
  bad_free((char *)p4k + 512, -1, TESSERA_ERROR_UNKNOWN_POINTER, "free(inside a 4 KiB block)");
  t0 = stats(0);
  CHECK(t0.invalid_frees == s0.invalid_frees + 2, "interior frees: invalid_frees %" PRIu64
        " -> %" PRIu64 ", expected +2", s0.invalid_frees, t0.invalid_frees);
  expect_same_except(&s0, &t0, "invalid_frees", "interior frees");
  CHECK(tessera_base_alloc(p3, NULL) == p3 && tessera_base_alloc(p4k, NULL) == p4k,
        "an interior free damaged the allocation it pointed into");
  s0 = t0;

  /* A device-0 pointer freed as device 1: refused on device 1, the allocation stays. */
  bad_free(p3, 1, TESSERA_ERROR_UNKNOWN_POINTER, "free(device-0 block, device 1)");
  t0 = stats(0);
  t1 = stats(1);
  expect_same_except(&s0, &t0, "", "free on the wrong device, device 0");
  CHECK(t1.invalid_frees == s1.invalid_frees + 1, "wrong-device free not counted on device 1");
  s1 = t1;

  /* Double frees, large and small. */
  x = alloc_ok(5 * MIB, 0, STREAM_A);
  y = alloc_ok(2048, 0, STREAM_B);
  free_ok(x, 0);
  free_ok(y, 0);
  s0 = stats(0);
  bad_free(x, 0, TESSERA_ERROR_DOUBLE_FREE, "double free of a 5 MiB block");
  bad_free(y, 0, TESSERA_ERROR_DOUBLE_FREE, "double free of a 2 KiB block");
  bad_free(x, -1, TESSERA_ERROR_DOUBLE_FREE, "double free of a 5 MiB block, device -1");
  t0 = stats(0);
  CHECK(t0.invalid_frees == s0.invalid_frees + 3, "double frees: invalid_frees %" PRIu64
        " -> %" PRIu64 ", expected +3", s0.invalid_frees, t0.invalid_frees);
  expect_same_except(&s0, &t0, "invalid_frees", "double frees");
  s0 = t0;

  /* malloc(0): NULL and no error. */
  tessera_clear_last_error();
  p = tessera_malloc(0, 0, STREAM_A);
  CHECK(p == NULL, "tessera_malloc(0) = %p", p);
  EXPECT_NO_ERROR("tessera_malloc(0)");

  /* Absurd sizes and devices. */
  p = tessera_malloc(SIZE_MAX, 0, STREAM_A);
  CHECK(p == NULL, "tessera_malloc(SIZE_MAX) = %p", p);
  EXPECT_ERROR(TESSERA_ERROR_INVALID_SIZE, "tessera_malloc(SIZE_MAX)");
  p = tessera_malloc(4096, -1, STREAM_A);
  CHECK(p == NULL, "tessera_malloc on device -1 = %p", p);
  EXPECT_ERROR(TESSERA_ERROR_INVALID_DEVICE, "tessera_malloc(device -1)");
  tessera_clear_last_error();
  p = tessera_malloc(4096, 99, STREAM_A);
  CHECK(p == NULL, "tessera_malloc on device 99 = %p", p);
  EXPECT_ERROR(TESSERA_ERROR_INVALID_DEVICE, "tessera_malloc(device 99)");
  CHECK(strstr(tessera_last_error(), "99") != NULL, "the message should name device 99: \"%s\"",
        tessera_last_error());
  p = tessera_malloc(4096, NDEV, STREAM_A);
  CHECK(p == NULL, "tessera_malloc on device %d (= count) = %p", NDEV, p);
  EXPECT_ERROR(TESSERA_ERROR_INVALID_DEVICE, "tessera_malloc(device 2 of 2)");
  t0 = stats(0);
  t1 = stats(1);
  expect_same_except(&s0, &t0, "", "refused mallocs, device 0");
  expect_same_except(&s1, &t1, "", "refused mallocs, device 1");

  /* Every entry point that takes a device refuses a bad one. */
  {
    tessera_stats s;
    s.size = sizeof s;
    tessera_clear_last_error();
    rc = tessera_get_stats(99, &s);
    CHECK(rc == TESSERA_ERROR_INVALID_DEVICE, "get_stats(99) returned %d", rc);
    rc = tessera_get_stats(-1, &s);
    CHECK(rc == TESSERA_ERROR_INVALID_DEVICE, "get_stats(-1) returned %d", rc);
  }
  tessera_clear_last_error();
  CHECK(tessera_empty_cache(99) == 0, "empty_cache(99) returned non-zero");
  EXPECT_ERROR(TESSERA_ERROR_INVALID_DEVICE, "empty_cache(99)");
  tessera_clear_last_error();
  CHECK(tessera_empty_cache(-2) == 0, "empty_cache(-2) returned non-zero");
  EXPECT_ERROR(TESSERA_ERROR_INVALID_DEVICE, "empty_cache(-2)");
  CHECK(tessera_reset_peak_stats(99) == TESSERA_ERROR_INVALID_DEVICE, "reset_peak_stats(99)");
  CHECK(tessera_check_invariants(99) == TESSERA_ERROR_INVALID_DEVICE, "check_invariants(99)");
  CHECK(tessera_set_limit(99, 8 * MIB) == TESSERA_ERROR_INVALID_DEVICE, "set_limit(99)");
  tessera_clear_last_error();
  CHECK(tessera_snapshot_json(99, NULL, 0) == 0, "snapshot_json(99) returned non-zero");
  EXPECT_ERROR(TESSERA_ERROR_INVALID_DEVICE, "snapshot_json(99)");
  tessera_clear_last_error();
  tessera_set_memory_fraction(0.5, 99);
  EXPECT_ERROR(TESSERA_ERROR_INVALID_DEVICE, "set_memory_fraction(0.5, 99)");

  /* Bad fractions change nothing ([0, 1] is valid, as in PyTorch). */
  tessera_clear_last_error();
  tessera_set_memory_fraction(-0.5, 0);
  EXPECT_ERROR(TESSERA_ERROR_INVALID_ARGUMENT, "set_memory_fraction(-0.5)");
  tessera_clear_last_error();
  tessera_set_memory_fraction(1.5, 0);
  EXPECT_ERROR(TESSERA_ERROR_INVALID_ARGUMENT, "set_memory_fraction(1.5)");
  tessera_clear_last_error();
  tessera_set_memory_fraction(NAN, 0);
  EXPECT_ERROR(TESSERA_ERROR_INVALID_ARGUMENT, "set_memory_fraction(NaN)");
  CHECK(stats(0).limit_bytes == TESSERA_NO_LIMIT, "a refused memory fraction set a limit");

  tessera_clear_last_error();
  tessera_record_stream(host_thing, STREAM_A);
  EXPECT_ERROR(TESSERA_ERROR_UNKNOWN_POINTER, "record_stream(host array)");
  tessera_clear_last_error();
  CHECK(tessera_snapshot_json(0, NULL, 10) == 0, "snapshot_json(NULL buffer, len 10)");
  EXPECT_ERROR(TESSERA_ERROR_INVALID_ARGUMENT, "snapshot_json(NULL buffer, len 10)");

  /* errno's rule: success keeps the last error; the message pointer stays valid. */
  {
    const char *m = tessera_last_error();
    char copy[512];
    snprintf(copy, sizeof copy, "%s", m);
    x = alloc_ok(4096, 0, STREAM_A);
    /* alloc_ok cleared the error; make one again and check a success keeps it. */
    tessera_clear_last_error();
    CHECK(tessera_malloc(4096, 99, STREAM_A) == NULL, "device 99");
    m = tessera_last_error();
    snprintf(copy, sizeof copy, "%s", m);
    y = tessera_malloc(8192, 0, STREAM_B);
    CHECK(y != NULL, "a plain allocation failed");
    track(y, 8192, 0, STREAM_B);
    CHECK(tessera_last_error_code() == TESSERA_ERROR_INVALID_DEVICE,
          "a successful malloc cleared the last error (code now %d)", tessera_last_error_code());
    CHECK(strcmp(m, copy) == 0, "the last error's message changed under a successful call");
    tessera_clear_last_error();
    EXPECT_NO_ERROR("after tessera_clear_last_error");
    free_ok(x, 0);
    free_ok(y, 0);
  }
  check_all();
}

/* ---------------------------------------------------------------------------------------------
 * Bad input at every entry point that takes a pointer, a size or a device, systematically: each
 * refusal must give the documented failure value, record the right code with a message that names
 * the offending value, and change nothing (every device's stats identical, every live pattern
 * intact). The documented no-ops (size 0, free(NULL), the ignored size/stream of a free) must
 * record no error and change nothing either.
 * ------------------------------------------------------------------------------------------- */

/* Device indices no entry point may accept (-1 means "every device" only for empty_cache and
 * "find it by pointer" only for free, which have their own cases). */
static const int BAD_DEVICES[] = {-1, NDEV, 99, INT_MIN, INT_MAX};
#define NBAD_DEVICES (sizeof BAD_DEVICES / sizeof BAD_DEVICES[0])

typedef struct {
  const char *entry;
  unsigned long tried;
} bad_count_t;

static bad_count_t bad_counts[] = {
    {"tessera_malloc", 0},       {"tessera_free", 0},           {"tessera_record_stream", 0},
    {"tessera_empty_cache", 0},  {"tessera_set_limit", 0},      {"tessera_set_memory_fraction", 0},
    {"tessera_get_stats", 0},    {"tessera_snapshot_json", 0},  {"tessera_reset_peak_stats", 0},
    {"tessera_check_invariants", 0}, {"tessera_base_alloc", 0}, {"tessera_init", 0},
    {"tessera_add_oom_hook", 0}, {"tessera_remove_oom_hook", 0}, {"tessera_configure", 0},
};
#define NBAD_COUNTS (sizeof bad_counts / sizeof bad_counts[0])

static void count_bad(const char *entry) {
  size_t i;
  for (i = 0; i < NBAD_COUNTS; i++)
    if (strcmp(bad_counts[i].entry, entry) == 0) {
      bad_counts[i].tried++;
      return;
    }
  CHECK(0, "internal: no counter for %s", entry);
}

static tessera_stats bad_before[NDEV];
static char bad_what[256];

/* Before a bad call: every device's stats, no last error, and the description of the call. */
static void bad_begin(const char *fmt, ...) {
  va_list ap;
  int d;
  va_start(ap, fmt);
  vsnprintf(bad_what, sizeof bad_what, fmt, ap);
  va_end(ap);
  for (d = 0; d < NDEV; d++) bad_before[d] = stats(d);
  tessera_clear_last_error();
}

/* Every device's stats are as in bad_begin except the fields named in `ignore`; every live
 * allocation keeps its pattern. */
static void bad_nothing_changed(const char *ignore) {
  int d;
  for (d = 0; d < NDEV; d++) {
    tessera_stats now = stats(d);
    char what[320];
    snprintf(what, sizeof what, "%s (device %d)", bad_what, d);
    expect_same_except(&bad_before[d], &now, ignore, what);
  }
  check_all();
}

/* After a refused call to `entry`: the last error is `code`, its message contains `needle` (when
 * not NULL), and nothing changed but the fields in `ignore`. */
static void bad_end(const char *entry, int code, const char *needle, const char *ignore) {
  EXPECT_ERROR(code, bad_what);
  if (needle)
    CHECK(strstr(tessera_last_error(), needle) != NULL,
          "%s: the error message should name \"%s\": \"%s\"", bad_what, needle,
          tessera_last_error());
  bad_nothing_changed(ignore);
  tessera_clear_last_error();
  count_bad(entry);
}

/* After a documented no-op of `entry`: no error recorded, nothing changed. */
static void bad_end_no_error(const char *entry) {
  EXPECT_NO_ERROR(bad_what);
  bad_nothing_changed("");
  count_bad(entry);
}

static const char *device_needle(int dev) {
  static char buf[48];
  snprintf(buf, sizeof buf, "invalid device %d", dev);
  return buf;
}

static const char *pointer_needle(const char *prefix, const void *p) {
  static char buf[64];
  snprintf(buf, sizeof buf, "%s 0x%" PRIxPTR, prefix, (uintptr_t)p);
  return buf;
}

/* tessera_free of a pointer the allocator must refuse on a named device (or -1): bad_free checks
 * the code, the one stderr line and the patterns; here also the stats, counted on `counted_on`. */
static void bad_free_counted(void *p, int dev_arg, int code, int counted_on, const char *fmt,
                             ...) {
  va_list ap;
  int d;
  char what[256];
  va_start(ap, fmt);
  vsnprintf(what, sizeof what, fmt, ap);
  va_end(ap);
  bad_begin("%s", what);
  bad_free(p, dev_arg, code, what);
  CHECK(strstr(tessera_last_error(), code == TESSERA_ERROR_DOUBLE_FREE
                                         ? pointer_needle("double free of", p)
                                         : pointer_needle("unknown pointer", p)) != NULL,
        "%s: the message does not name the pointer: \"%s\"", what, tessera_last_error());
  for (d = 0; d < NDEV; d++) {
    tessera_stats now = stats(d);
    uint64_t want = bad_before[d].invalid_frees + (d == counted_on ? 1 : 0);
    CHECK(now.invalid_frees == want,
          "%s: device %d invalid_frees %" PRIu64 " -> %" PRIu64 ", expected %" PRIu64, what, d,
          bad_before[d].invalid_frees, now.invalid_frees, want);
  }
  bad_nothing_changed("invalid_frees");
  tessera_clear_last_error();
  count_bad("tessera_free");
}

static void phase_bad_input_matrix(void) {
  static char host_thing[4096];
  void *const unknown[] = {host_thing, host_thing + 100, (void *)(uintptr_t)1,
                           (void *)(uintptr_t)UINTPTR_MAX, (void *)(uintptr_t)(UINTPTR_MAX - 511)};
  const size_t nunknown = sizeof unknown / sizeof unknown[0];
  void *big0, *small0, *big1, *small1, *gone, *p, *b;
  size_t i, sz, r;
  int rc, d;
  phase = "bad input at every entry point";

  /* Live allocations on both devices, whose patterns every case checks. */
  big0 = alloc_ok(3 * MIB + 512, 0, STREAM_A);
  small0 = alloc_ok(1000, 0, STREAM_B);
  big1 = alloc_ok(5 * MIB, 1, STREAM_B);
  small1 = alloc_ok(4096, 1, STREAM_A);
  gone = alloc_ok(2 * MIB, 1, STREAM_A);
  free_ok(gone, 1); /* a pointer freed once: every later use of it is bad */

  /* --- tessera_malloc: sizes no device can serve, bad devices, size 0 --------------------- */
  {
    const size_t bad_sizes[] = {SIZE_MAX, SIZE_MAX - 511, ((size_t)1 << 56) + 1};
    for (i = 0; i < sizeof bad_sizes / sizeof bad_sizes[0]; i++) {
      char needle[64];
      bad_begin("tessera_malloc(%zu, device 0)", bad_sizes[i]);
      p = tessera_malloc(bad_sizes[i], 0, STREAM_A);
      CHECK(p == NULL, "%s returned %p", bad_what, p);
      snprintf(needle, sizeof needle, "invalid size %zu", bad_sizes[i]);
      bad_end("tessera_malloc", TESSERA_ERROR_INVALID_SIZE, needle, "");
    }
    /* The largest request tessera takes, far beyond the device: an OOM, counted as one. */
    bad_begin("tessera_malloc(64 PiB, device 1)");
    p = tessera_malloc((size_t)1 << 56, 1, STREAM_A);
    CHECK(p == NULL, "%s returned %p", bad_what, p);
    CHECK(stats(1).ooms == bad_before[1].ooms + 1, "%s: not counted in ooms", bad_what);
    bad_end("tessera_malloc", TESSERA_ERROR_OUT_OF_MEMORY, "CUDA out of memory.", "ooms");
  }
  for (i = 0; i < NBAD_DEVICES; i++) {
    bad_begin("tessera_malloc(4096, device %d)", BAD_DEVICES[i]);
    p = tessera_malloc(4096, BAD_DEVICES[i], STREAM_A);
    CHECK(p == NULL, "%s returned %p", bad_what, p);
    bad_end("tessera_malloc", TESSERA_ERROR_INVALID_DEVICE, device_needle(BAD_DEVICES[i]), "");
  }
  bad_begin("tessera_malloc(SIZE_MAX, device 99)");
  p = tessera_malloc(SIZE_MAX, 99, STREAM_A);
  CHECK(p == NULL, "%s returned %p", bad_what, p);
  bad_end("tessera_malloc", TESSERA_ERROR_INVALID_DEVICE, device_needle(99), "");
  /* Size 0: NULL and no error, whatever the device (the documented contract). */
  {
    const int devs[] = {0, -1, 99};
    for (i = 0; i < 3; i++) {
      bad_begin("tessera_malloc(0, device %d)", devs[i]);
      p = tessera_malloc(0, devs[i], STREAM_A);
      CHECK(p == NULL, "%s returned %p", bad_what, p);
      bad_end_no_error("tessera_malloc");
    }
  }

  /* --- tessera_free: NULL, unknown, interior, double, wrong and bad devices ---------------- */
  {
    const int devs[] = {0, -1, 99, INT_MIN};
    for (i = 0; i < 4; i++) {
      bad_begin("tessera_free(NULL, device %d)", devs[i]);
      tessera_free(NULL, 4096, devs[i], STREAM_A);
      bad_end_no_error("tessera_free");
    }
  }
  for (i = 0; i < nunknown; i++) {
    bad_free_counted(unknown[i], 0, TESSERA_ERROR_UNKNOWN_POINTER, 0,
                     "free(unknown %p, device 0)", unknown[i]);
    bad_free_counted(unknown[i], 1, TESSERA_ERROR_UNKNOWN_POINTER, 1,
                     "free(unknown %p, device 1)", unknown[i]);
    bad_free_counted(unknown[i], -1, TESSERA_ERROR_UNKNOWN_POINTER, -1,
                     "free(unknown %p, device -1)", unknown[i]);
  }
  {
    /* Interior pointers: the first byte after the start, the next rounding unit, the last byte. */
    const struct {
      unsigned char *base;
      size_t size;
      int dev;
    } blocks[] = {{big0, 3 * MIB + 512, 0}, {small0, 1000, 0}, {big1, 5 * MIB, 1},
                  {small1, 4096, 1}};
    for (i = 0; i < 4; i++) {
      const size_t offs[] = {1, 512, blocks[i].size - 1};
      size_t k;
      for (k = 0; k < 3; k++) {
        void *q = blocks[i].base + offs[k];
        bad_free_counted(q, blocks[i].dev, TESSERA_ERROR_UNKNOWN_POINTER, blocks[i].dev,
                         "free(%p + %zu, device %d)", (void *)blocks[i].base, offs[k],
                         blocks[i].dev);
        /* Found by pointer: the block's device counts it. */
        bad_free_counted(q, -1, TESSERA_ERROR_UNKNOWN_POINTER, blocks[i].dev,
                         "free(%p + %zu, device -1)", (void *)blocks[i].base, offs[k]);
        CHECK(tessera_base_alloc(blocks[i].base, NULL) == blocks[i].base,
              "an interior free damaged %p", (void *)blocks[i].base);
      }
    }
  }
  /* A live pointer freed as another device's: refused there, the block stays. */
  bad_free_counted(big0, 1, TESSERA_ERROR_UNKNOWN_POINTER, 1, "free(device-0 block, device 1)");
  bad_free_counted(small1, 0, TESSERA_ERROR_UNKNOWN_POINTER, 0, "free(device-1 block, device 0)");
  /* Double frees of a block freed before: on its device, found by pointer. */
  bad_free_counted(gone, 1, TESSERA_ERROR_DOUBLE_FREE, 1, "double free(%p, device 1)", gone);
  bad_free_counted(gone, -1, TESSERA_ERROR_DOUBLE_FREE, 1, "double free(%p, device -1)", gone);
  /* Any negative device means "find it by pointer": INT_MIN too. */
  bad_free_counted(gone, INT_MIN, TESSERA_ERROR_DOUBLE_FREE, 1, "double free(%p, device INT_MIN)",
                   gone);
  /* Devices at or past the count, with a live pointer and with a freed one: refused, the block
   * stays live. */
  {
    const int devs[] = {NDEV, 99, INT_MAX};
    for (i = 0; i < 3; i++) {
      bad_begin("tessera_free(live %p, device %d)", big0, devs[i]);
      tessera_free(big0, 3 * MIB + 512, devs[i], STREAM_A);
      bad_end("tessera_free", TESSERA_ERROR_INVALID_DEVICE, device_needle(devs[i]), "");
      CHECK(tessera_base_alloc(big0, NULL) == big0, "a bad-device free released %p", big0);
      bad_begin("tessera_free(freed %p, device %d)", gone, devs[i]);
      tessera_free(gone, 2 * MIB, devs[i], STREAM_A);
      bad_end("tessera_free", TESSERA_ERROR_INVALID_DEVICE, device_needle(devs[i]), "");
    }
  }
  /* The size and stream of a free are ignored (tessera knows both): absurd ones still free. */
  {
    void *q = alloc_ok(8192, 0, STREAM_A);
    tessera_stats s0 = stats(0), t0;
    check_pattern(find_live(q), 1);
    tessera_clear_last_error();
    tessera_free(q, SIZE_MAX, 0, (cudaStream_t)(uintptr_t)0xDEAD);
    EXPECT_NO_ERROR("tessera_free(live, size SIZE_MAX, a stream never used)");
    forget(q);
    ++total_frees;
    t0 = stats(0);
    CHECK(t0.frees == s0.frees + 1 && t0.allocated_bytes == s0.allocated_bytes - 8192 &&
              t0.invalid_frees == s0.invalid_frees,
          "free with size SIZE_MAX: frees %" PRIu64 " -> %" PRIu64 ", allocated %" PRIu64
          " -> %" PRIu64,
          s0.frees, t0.frees, s0.allocated_bytes, t0.allocated_bytes);
    check_all();
    count_bad("tessera_free");
  }

  /* --- tessera_record_stream: NULL, unknown and freed pointers ------------------------------ */
  bad_begin("tessera_record_stream(NULL)");
  tessera_record_stream(NULL, STREAM_B);
  bad_end("tessera_record_stream", TESSERA_ERROR_UNKNOWN_POINTER, "unknown pointer 0x0", "");
  for (i = 0; i < nunknown; i++) {
    bad_begin("tessera_record_stream(unknown %p)", unknown[i]);
    tessera_record_stream(unknown[i], STREAM_B);
    bad_end("tessera_record_stream", TESSERA_ERROR_UNKNOWN_POINTER,
            pointer_needle("unknown pointer", unknown[i]), "");
  }
  bad_begin("tessera_record_stream(freed %p)", gone);
  tessera_record_stream(gone, STREAM_B);
  bad_end("tessera_record_stream", TESSERA_ERROR_UNKNOWN_POINTER,
          pointer_needle("unknown pointer", gone), "");

  /* --- entry points that take only a device ------------------------------------------------ */
  for (i = 0; i < NBAD_DEVICES; i++) {
    const int dev = BAD_DEVICES[i];
    const char *needle = device_needle(dev);
    char needle_copy[48];
    snprintf(needle_copy, sizeof needle_copy, "%s", needle);

    if (dev != -1) { /* -1 empties every device */
      bad_begin("tessera_empty_cache(%d)", dev);
      r = tessera_empty_cache(dev);
      CHECK(r == 0, "%s returned %zu", bad_what, r);
      bad_end("tessera_empty_cache", TESSERA_ERROR_INVALID_DEVICE, needle_copy, "");
    }

    bad_begin("tessera_set_limit(%d, 8 MiB)", dev);
    rc = tessera_set_limit(dev, 8 * MIB);
    CHECK(rc == TESSERA_ERROR_INVALID_DEVICE, "%s returned %d", bad_what, rc);
    bad_end("tessera_set_limit", TESSERA_ERROR_INVALID_DEVICE, needle_copy, "");
    bad_begin("tessera_set_limit(%d, 0)", dev);
    rc = tessera_set_limit(dev, 0);
    CHECK(rc == TESSERA_ERROR_INVALID_DEVICE, "%s returned %d", bad_what, rc);
    bad_end("tessera_set_limit", TESSERA_ERROR_INVALID_DEVICE, needle_copy, "");

    bad_begin("tessera_set_memory_fraction(0.5, %d)", dev);
    tessera_set_memory_fraction(0.5, dev);
    bad_end("tessera_set_memory_fraction", TESSERA_ERROR_INVALID_DEVICE, needle_copy, "");

    {
      /* A refused get_stats writes nothing, not even size. */
      unsigned char buf[sizeof(tessera_stats)];
      uint64_t in = sizeof buf;
      size_t k;
      memset(buf, 0xAB, sizeof buf);
      memcpy(buf, &in, 8);
      bad_begin("tessera_get_stats(%d)", dev);
      rc = tessera_get_stats(dev, (tessera_stats *)(void *)buf);
      CHECK(rc == TESSERA_ERROR_INVALID_DEVICE, "%s returned %d", bad_what, rc);
      for (k = 8; k < sizeof buf; k++)
        CHECK(buf[k] == 0xAB, "%s wrote byte %zu of the struct", bad_what, k);
      CHECK(memcmp(buf, &in, 8) == 0, "%s changed size", bad_what);
      bad_end("tessera_get_stats", TESSERA_ERROR_INVALID_DEVICE, needle_copy, "");
      bad_begin("tessera_get_stats(%d, NULL)", dev);
      rc = tessera_get_stats(dev, NULL);
      CHECK(rc == TESSERA_ERROR_INVALID_DEVICE, "%s returned %d", bad_what, rc);
      bad_end("tessera_get_stats", TESSERA_ERROR_INVALID_DEVICE, needle_copy, "");
    }

    {
      char buf[64];
      size_t k;
      memset(buf, 'X', sizeof buf);
      bad_begin("tessera_snapshot_json(%d, buf, 64)", dev);
      r = tessera_snapshot_json(dev, buf, sizeof buf);
      CHECK(r == 0, "%s returned %zu", bad_what, r);
      for (k = 0; k < sizeof buf; k++)
        CHECK(buf[k] == 'X', "%s wrote byte %zu of the buffer", bad_what, k);
      bad_end("tessera_snapshot_json", TESSERA_ERROR_INVALID_DEVICE, needle_copy, "");
    }

    bad_begin("tessera_reset_peak_stats(%d)", dev);
    rc = tessera_reset_peak_stats(dev);
    CHECK(rc == TESSERA_ERROR_INVALID_DEVICE, "%s returned %d", bad_what, rc);
    bad_end("tessera_reset_peak_stats", TESSERA_ERROR_INVALID_DEVICE, needle_copy, "");

    bad_begin("tessera_check_invariants(%d)", dev);
    rc = tessera_check_invariants(dev);
    CHECK(rc == TESSERA_ERROR_INVALID_DEVICE, "%s returned %d", bad_what, rc);
    bad_end("tessera_check_invariants", TESSERA_ERROR_INVALID_DEVICE, needle_copy, "");
  }
  /* empty_cache's own bad negatives (-1 is "every device"). */
  {
    const int devs[] = {-2, -100};
    for (i = 0; i < 2; i++) {
      bad_begin("tessera_empty_cache(%d)", devs[i]);
      r = tessera_empty_cache(devs[i]);
      CHECK(r == 0, "%s returned %zu", bad_what, r);
      bad_end("tessera_empty_cache", TESSERA_ERROR_INVALID_DEVICE, device_needle(devs[i]), "");
    }
  }

  /* --- tessera_set_memory_fraction: fractions outside [0, 1] ------------------------------- */
  {
    const double bad_fractions[] = {-0.5, 1.5, 1.0000001, -1e-300, INFINITY, -INFINITY, NAN};
    for (i = 0; i < sizeof bad_fractions / sizeof bad_fractions[0]; i++) {
      bad_begin("tessera_set_memory_fraction(%g, 0)", bad_fractions[i]);
      tessera_set_memory_fraction(bad_fractions[i], 0);
      bad_end("tessera_set_memory_fraction", TESSERA_ERROR_INVALID_ARGUMENT, "memory fraction",
              "");
    }
    /* Both bad: the fraction is named first. */
    bad_begin("tessera_set_memory_fraction(1.5, 99)");
    tessera_set_memory_fraction(1.5, 99);
    bad_end("tessera_set_memory_fraction", TESSERA_ERROR_INVALID_ARGUMENT, "1.5", "");
  }

  /* --- tessera_get_stats: sizes too small for the size field itself ------------------------ */
  {
    const uint64_t sizes[] = {0, 1, 7};
    for (i = 0; i < 3; i++) {
      uint64_t buf[2];
      buf[0] = sizes[i];
      buf[1] = 0xC0FFEEull;
      bad_begin("tessera_get_stats(0, size %" PRIu64 ")", sizes[i]);
      rc = tessera_get_stats(0, (tessera_stats *)(void *)buf);
      CHECK(rc == TESSERA_ERROR_INVALID_ARGUMENT && buf[0] == sizes[i] && buf[1] == 0xC0FFEEull,
            "%s: rc %d, size out %" PRIu64, bad_what, rc, buf[0]);
      bad_end("tessera_get_stats", TESSERA_ERROR_INVALID_ARGUMENT, NULL, "");
    }
    bad_begin("tessera_get_stats(0, NULL)");
    rc = tessera_get_stats(0, NULL);
    CHECK(rc == TESSERA_ERROR_INVALID_ARGUMENT, "%s returned %d", bad_what, rc);
    bad_end("tessera_get_stats", TESSERA_ERROR_INVALID_ARGUMENT, NULL, "");
  }

  /* --- tessera_snapshot_json: a NULL buffer with a length -------------------------------- */
  {
    const size_t lens[] = {1, 10, SIZE_MAX};
    for (i = 0; i < 3; i++) {
      bad_begin("tessera_snapshot_json(0, NULL, %zu)", lens[i]);
      r = tessera_snapshot_json(0, NULL, lens[i]);
      CHECK(r == 0, "%s returned %zu", bad_what, r);
      bad_end("tessera_snapshot_json", TESSERA_ERROR_INVALID_ARGUMENT, "NULL", "");
    }
  }

  /* --- tessera_base_alloc: NULL, unknown and freed pointers; *size untouched ---------------- */
  {
    void *const ptrs[] = {NULL, host_thing, (void *)(uintptr_t)UINTPTR_MAX, gone};
    for (i = 0; i < 4; i++) {
      bad_begin("tessera_base_alloc(%p)", ptrs[i]);
      sz = 77;
      b = tessera_base_alloc(ptrs[i], &sz);
      CHECK(b == NULL && sz == 77, "%s = %p, *size %zu", bad_what, b, sz);
      bad_end("tessera_base_alloc", TESSERA_ERROR_UNKNOWN_POINTER,
              pointer_needle("unknown pointer", ptrs[i]), "");
      bad_begin("tessera_base_alloc(%p, NULL)", ptrs[i]);
      b = tessera_base_alloc(ptrs[i], NULL);
      CHECK(b == NULL, "%s = %p", bad_what, b);
      bad_end("tessera_base_alloc", TESSERA_ERROR_UNKNOWN_POINTER, NULL, "");
    }
  }

  /* --- tessera_init, hooks, configure --------------------------------------------------------- */
  {
    const int counts[] = {-1, NDEV + 1, INT_MIN, INT_MAX};
    for (i = 0; i < 4; i++) {
      char needle[48];
      snprintf(needle, sizeof needle, "tessera_init(%d)", counts[i]);
      bad_begin("tessera_init(%d)", counts[i]);
      tessera_init(counts[i]);
      bad_end("tessera_init", TESSERA_ERROR_INVALID_DEVICE, needle, "");
    }
  }
  bad_begin("tessera_add_oom_hook(NULL, user)");
  rc = tessera_add_oom_hook(NULL, host_thing);
  CHECK(rc == -1, "%s returned %d", bad_what, rc);
  bad_end("tessera_add_oom_hook", TESSERA_ERROR_INVALID_ARGUMENT, "NULL hook", "");
  {
    const int ids[] = {-1, INT_MIN, INT_MAX, 12345};
    for (i = 0; i < 4; i++) {
      char needle[48];
      snprintf(needle, sizeof needle, "tessera_remove_oom_hook(%d)", ids[i]);
      bad_begin("tessera_remove_oom_hook(%d)", ids[i]);
      rc = tessera_remove_oom_hook(ids[i]);
      CHECK(rc == TESSERA_ERROR_INVALID_ARGUMENT, "%s returned %d", bad_what, rc);
      bad_end("tessera_remove_oom_hook", TESSERA_ERROR_INVALID_ARGUMENT, needle, "");
    }
  }
  {
    /* After the allocator exists every configuration is refused; NULL and non-UTF-8 say so. */
    bad_begin("tessera_configure(NULL)");
    rc = tessera_configure(NULL);
    CHECK(rc == TESSERA_ERROR_INVALID_ARGUMENT, "%s returned %d", bad_what, rc);
    bad_end("tessera_configure", TESSERA_ERROR_INVALID_ARGUMENT, "NULL", "");
    bad_begin("tessera_configure(non-UTF-8)");
    rc = tessera_configure("limit:\xff\xfe");
    CHECK(rc == TESSERA_ERROR_CONFIG, "%s returned %d", bad_what, rc);
    bad_end("tessera_configure", TESSERA_ERROR_CONFIG, "UTF-8", "");
    bad_begin("tessera_configure(\"limit:1MiB\") after the first allocation");
    rc = tessera_configure("limit:1MiB");
    CHECK(rc == TESSERA_ERROR_CONFIG, "%s returned %d", bad_what, rc);
    bad_end("tessera_configure", TESSERA_ERROR_CONFIG, "already in use", "");
    bad_begin("tessera_configure(\"limit:-1\") after the first allocation");
    rc = tessera_configure("limit:-1");
    CHECK(rc == TESSERA_ERROR_CONFIG, "%s returned %d", bad_what, rc);
    bad_end("tessera_configure", TESSERA_ERROR_CONFIG, "'limit'", "");
  }

  /* Every live block survived all of it, whole. */
  for (i = 0; i < nlive; i++) check_pattern(&live[i], 1);
  free_ok(big0, 0);
  free_ok(small0, -1);
  free_ok(big1, 1);
  free_ok(small1, -1);
  for (d = 0; d < NDEV; d++)
    CHECK(tessera_check_invariants(d) == 0, "check_invariants(%d) after the bad input", d);

  {
    unsigned long total = 0;
    printf("abi_test: bad input refused, nothing changed:");
    for (i = 0; i < NBAD_COUNTS; i++) {
      printf(" %s %lu%s", bad_counts[i].entry + strlen("tessera_"), bad_counts[i].tried,
             i + 1 < NBAD_COUNTS ? "," : "");
      CHECK(bad_counts[i].tried > 0, "no bad input was tried on %s", bad_counts[i].entry);
      total += bad_counts[i].tried;
    }
    printf(" (%lu cases)\n", total);
  }
}

static void phase_snapshot(void) {
  size_t n, r, i;
  char tiny[16], *buf, needle[96];
  tessera_stats s;
  phase = "tessera_snapshot_json";
  tessera_clear_last_error();
  n = tessera_snapshot_json(0, NULL, 0);
  EXPECT_NO_ERROR("snapshot_json(0, NULL, 0)");
  CHECK(n > 100, "snapshot length %zu is implausibly small", n);

  memset(tiny, 'X', sizeof tiny);
  r = tessera_snapshot_json(0, tiny, 8);
  CHECK(r == n, "a truncated snapshot returned %zu, the full length is %zu (snprintf's rule)", r,
        n);
  CHECK(tiny[7] == '\0' && strlen(tiny) == 7 && tiny[0] == '{',
        "an 8-byte buffer must get 7 bytes of JSON and a NUL: \"%.16s\"", tiny);
  for (i = 8; i < sizeof tiny; i++)
    CHECK(tiny[i] == 'X', "snapshot_json(len 8) wrote byte %zu", i);
  memset(tiny, 'X', sizeof tiny);
  r = tessera_snapshot_json(0, tiny, 1);
  CHECK(r == n && tiny[0] == '\0' && tiny[1] == 'X', "len 1: returned %zu, buffer \"%.4s\"", r,
        tiny);

  buf = malloc(n + 64);
  CHECK(buf != NULL, "internal: out of host memory");
  memset(buf, 'X', n + 64);
  r = tessera_snapshot_json(0, buf, n + 64);
  CHECK(r == n && buf[n] == '\0' && strlen(buf) == n && buf[n + 1] == 'X',
        "full snapshot: returned %zu (expected %zu), NUL at the end: %d", r, n, buf[n] == '\0');
  CHECK(buf[0] == '{' && buf[n - 1] == '}', "the snapshot is not a JSON object: %.40s...", buf);
  CHECK(strncmp(buf, "{\"device\":0", 11) == 0, "the snapshot starts \"%.40s\"", buf);
  CHECK(strstr(buf, "\"page_size\":2097152") && strstr(buf, "\"segments\":[") &&
            strstr(buf, "\"stats\":{") && strstr(buf, "\"blocks\":["),
        "the snapshot lacks page_size/segments/stats/blocks: %.200s", buf);
  s = stats(0);
  snprintf(needle, sizeof needle, "\"allocated_bytes\":%" PRIu64 ",", s.allocated_bytes);
  CHECK(strstr(buf, needle) != NULL, "the snapshot's stats lack %s", needle);
  for (i = 0; i < nlive; i++) {
    if (live[i].device != 0) continue;
    snprintf(needle, sizeof needle, "\"address\":%" PRIuPTR ",", (uintptr_t)live[i].ptr);
    CHECK(strstr(buf, needle) != NULL, "the snapshot of device 0 lacks the live block %p (%zu B)",
          (void *)live[i].ptr, live[i].size);
  }
  /* Exactly the JSON's length: one byte short of the NUL loses the last character. */
  memset(buf, 'X', n + 64);
  r = tessera_snapshot_json(0, buf, n);
  CHECK(r == n && buf[n - 1] == '\0' && strlen(buf) == n - 1, "len n: returned %zu", r);
  free(buf);
  EXPECT_NO_ERROR("snapshot_json");
  check_all();
}

#if !defined(__STDC_NO_THREADS__)
/* Each thread allocates, patterns, checks and frees its own blocks on its own stream. */
typedef struct {
  int index;
  int failed;
  char why[256];
  int saw_main_error;
} worker_t;

static int worker(void *arg) {
  worker_t *w = arg;
  enum { SLOTS = 12, ROUNDS = 400 };
  unsigned char *ptr[SLOTS] = {0};
  size_t size[SLOTS] = {0};
  uint64_t seed[SLOTS] = {0}, rng = 0x1234567 + (uint64_t)w->index;
  cudaStream_t s = (cudaStream_t)(uintptr_t)(0x100 + 0x10 * w->index);
  int dev = w->index % NDEV, k;
  w->saw_main_error = tessera_last_error_code() != TESSERA_OK;
  for (k = 0; k < ROUNDS && !w->failed; k++) {
    int slot;
    rng = mix(rng, (uint64_t)k);
    slot = (int)(rng % SLOTS);
    if (ptr[slot]) {
      size_t words = (size[slot] + 7) / 8, i;
      for (i = 0; i < words; i += 64) {
        uint64_t got, want = mix(seed[slot], i);
        size_t n = 8 * i + 8 <= size[slot] ? 8 : size[slot] - 8 * i;
        got = want;
        memcpy(&got, ptr[slot] + 8 * i, n);
        if (got != want) {
          w->failed = 1;
          snprintf(w->why, sizeof w->why, "thread %d: block %p lost its pattern at %zu", w->index,
                   (void *)ptr[slot], 8 * i);
          break;
        }
      }
      tessera_free(ptr[slot], size[slot], -1, s);
      if (tessera_last_error_code() != TESSERA_OK) {
        w->failed = 1;
        snprintf(w->why, sizeof w->why, "thread %d: free failed: %s", w->index,
                 tessera_last_error());
      }
      ptr[slot] = NULL;
    } else {
      /* 1 B .. 1.25 MiB: small and large, on a device other threads share. */
      size[slot] = 1 + (size_t)((rng >> 20) % (5 * MIB / 4));
      ptr[slot] = tessera_malloc(size[slot], dev, s);
      if (!ptr[slot]) {
        w->failed = 1;
        snprintf(w->why, sizeof w->why, "thread %d: malloc(%zu) failed: %s", w->index, size[slot],
                 tessera_last_error());
        break;
      }
      seed[slot] = rng | 1;
      fill_pattern(ptr[slot], size[slot], seed[slot]);
    }
  }
  for (k = 0; k < SLOTS; k++)
    if (ptr[k]) tessera_free(ptr[k], size[k], dev, s);
  /* An error on this thread stays on this thread. */
  tessera_clear_last_error();
  tessera_malloc(1, 99, s);
  if (tessera_last_error_code() != TESSERA_ERROR_INVALID_DEVICE && !w->failed) {
    w->failed = 1;
    snprintf(w->why, sizeof w->why, "thread %d: device 99 gave code %d", w->index,
             tessera_last_error_code());
  }
  return 0;
}

static void phase_threads(void) {
  enum { NTHREADS = 4 };
  thrd_t t[NTHREADS];
  worker_t w[NTHREADS];
  int i, started = 0;
  tessera_stats before[NDEV];
  phase = "threads";
  for (i = 0; i < NDEV; i++) before[i] = stats(i);
  tessera_clear_last_error();
  CHECK(tessera_malloc(1, -1, STREAM_A) == NULL, "device -1");
  /* The main thread has an INVALID_DEVICE error now; the workers must not see it. */
  memset(w, 0, sizeof w);
  for (i = 0; i < NTHREADS; i++) {
    w[i].index = i;
    if (thrd_create(&t[i], worker, &w[i]) == thrd_success) started++;
    else break;
  }
  CHECK(started == NTHREADS, "internal: only %d threads started", started);
  for (i = 0; i < NTHREADS; i++) thrd_join(t[i], NULL);
  for (i = 0; i < NTHREADS; i++) {
    CHECK(!w[i].failed, "%s", w[i].why);
    CHECK(!w[i].saw_main_error, "thread %d saw the main thread's last error", i);
  }
  CHECK(tessera_last_error_code() == TESSERA_ERROR_INVALID_DEVICE,
        "the main thread's last error changed while other threads failed (now %d)",
        tessera_last_error_code());
  tessera_clear_last_error();
  for (i = 0; i < NDEV; i++) {
    tessera_stats s = stats(i);
    CHECK(s.frees - before[i].frees == s.allocations - before[i].allocations,
          "device %d: the threads' allocations and frees do not balance", i);
    CHECK(tessera_check_invariants(i) == 0, "invariants after the threads on device %d", i);
  }
  check_all();
}
#endif

static void phase_end(void) {
  int d;
  size_t released;
  phase = "the end: invariants, free everything, empty the caches";
  for (d = 0; d < NDEV; d++) {
    tessera_clear_last_error();
    CHECK(tessera_check_invariants(d) == 0, "check_invariants(%d) failed", d);
  }
  free_all_on(-1);
  CHECK(nlive == 0, "internal: %zu allocations still tracked", nlive);
  tessera_clear_last_error();
  released = tessera_empty_cache(-1);
  EXPECT_NO_ERROR("empty_cache(-1)");
  CHECK(released > 0, "empty_cache(-1) released nothing with everything freed");
  for (d = 0; d < NDEV; d++) {
    tessera_stats s = stats(d);
    CHECK(s.reserved_bytes == 0 && s.mapped_pages == 0 && s.pool_pages == 0,
          "device %d keeps %" PRIu64 " B reserved (%" PRIu64 " mapped, %" PRIu64
          " pooled pages) after free-all and empty_cache(-1)",
          d, s.reserved_bytes, s.mapped_pages, s.pool_pages);
    CHECK(s.allocated_bytes == 0 && s.requested_bytes == 0 && s.active_blocks == 0,
          "device %d: allocated %" PRIu64 " requested %" PRIu64 " active %" PRIu64
          " with nothing live",
          d, s.allocated_bytes, s.requested_bytes, s.active_blocks);
    CHECK(s.allocations == s.frees, "device %d: %" PRIu64 " allocations, %" PRIu64 " frees", d,
          s.allocations, s.frees);
    CHECK(tessera_check_invariants(d) == 0, "check_invariants(%d) after emptying", d);
  }
  /* Reset is PyTorch's empty_cache: harmless on empty caches. */
  tessera_reset();
  EXPECT_NO_ERROR("tessera_reset()");
}

int main(void) {
  const char *driver = getenv("TESSERA_DRIVER");
  if (!driver || strcmp(driver, "sim") != 0) {
    fprintf(stderr, "abi_test: FAIL: run me with TESSERA_DRIVER=sim and "
                    "TESSERA_SIM=devices:2,capacity:64MiB,granularity:2MiB (this program writes "
                    "device memory from the CPU, which only the simulated device allows)\n");
    return 1;
  }
  setvbuf(stdout, NULL, _IOLBF, 0);
  phase_before_the_allocator();
  phase_devices();
  phase_basic();
  phase_base_alloc();
  phase_free_and_empty_cache();
  phase_size_protocol();
  phase_record_stream();
  phase_oom_and_hooks();
  phase_remap();
  phase_limits();
  phase_bad_input();
  phase_bad_input_matrix();
  phase_snapshot();
#if !defined(__STDC_NO_THREADS__)
  phase_threads();
#else
  printf("abi_test: no C11 threads here: the thread phase was skipped\n");
#endif
  phase_end();
  printf("abi_test: OK (%lu checks, %lu allocations, %lu frees, %lu pattern words compared)\n",
         checks, total_allocs, total_frees, pattern_words_checked);
  return 0;
}
