/*
 * teardown_test.c: tessera's C ABI called while the process and its threads are torn down.
 *
 * Real programs call an allocator late: PyTorch frees tensors from static destructors and exit
 * handlers, thread pools free from thread-exit hooks. None of those calls may crash, abort or
 * corrupt anything, even where Rust's own thread-locals are already gone. This program calls
 * tessera_malloc, tessera_free (of a live pointer and of an unknown one), tessera_get_stats (good
 * and bad device), tessera_last_error(_code) and tessera_empty_cache from
 *
 *   (a) an atexit handler registered before the first tessera call, so that it runs after
 *       tessera's own exit handler (which flushes TESSERA_TRACE) and after glibc has run the main
 *       thread's thread_local destructors;
 *   (b) pthread TLS-key destructors at thread exit, which glibc runs after the thread's
 *       thread_local destructors (Rust's included): once on a thread that used tessera before
 *       (its last-error slot is destroyed by then) and once on a thread that never did (the slot
 *       is first touched during teardown);
 *   (c) a destructor function (__attribute__((destructor))), which runs from _dl_fini after every
 *       atexit handler, while libtessera.so (a dependency, finalized after this program) is
 *       still loaded.
 *
 * Every call must return its documented value, and every failing one must record its error code
 * and message (tessera's last-error slot is a thread-local without a destructor, usable at every
 * stage of teardown); the stats must show exactly what was done. On glibc the program also checks
 * that each stage really runs after the thread-local destructors of its thread: it registers one
 * itself, the way Rust's std and C++ register theirs (__cxa_thread_atexit_impl), and checks that
 * it ran.
 *
 * Runs on the simulated device only (it writes device memory from the CPU): TESSERA_DRIVER=sim,
 * TESSERA_SIM with at least one device of 16 MiB or more, and TESSERA_TRACE naming a file to
 * create. The last stage prints "teardown_test: OK" and the process exits 0; any failure prints
 * "teardown_test: FAIL ..." and the process exits 1. ffi/tests/c_programs.rs also parses the trace
 * file afterwards: it must stay well-formed.
 *
 * Build: gcc -std=c11 -Wall -Wextra -Werror -pedantic -O2 -pthread -Iinclude
 *   tests/c/teardown_test.c -Ltarget/debug -ltessera -Wl,-rpath,$PWD/target/debug -o teardown_test
 */
#define _POSIX_C_SOURCE 200809L

#include <inttypes.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "tessera.h"

#define MIB ((size_t)1 << 20)
#define STREAM ((cudaStream_t)(uintptr_t)0x10)

/* ---------------------------------------------------------------------------------------------
 * Failing: count and say, never exit from inside a teardown stage (the later stages still run);
 * the last stage turns the count into the exit status.
 * ------------------------------------------------------------------------------------------- */

static const char *stage = "main";
static int failures;
static unsigned long checks;

static void fail_at(int line, const char *cond, const char *fmt, ...) {
  va_list ap;
  ++failures;
  fflush(stdout);
  fprintf(stderr, "teardown_test: FAIL in stage '%s' at line %d\n  check: %s\n  ", stage, line,
          cond);
  va_start(ap, fmt);
  vfprintf(stderr, fmt, ap);
  va_end(ap);
  fprintf(stderr, "\n");
  fflush(stderr);
}

#define CHECK(cond, ...)                                                                         \
  do {                                                                                           \
    ++checks;                                                                                    \
    if (!(cond)) fail_at(__LINE__, #cond, __VA_ARGS__);                                          \
  } while (0)

/* ---------------------------------------------------------------------------------------------
 * Patterns: every block this program holds carries one, checked before it is freed.
 * ------------------------------------------------------------------------------------------- */

static uint64_t mix(uint64_t seed, uint64_t i) {
  uint64_t z = seed * 0x9E3779B97F4A7C15ull + i * 0xD1B54A32D192ED03ull + 0x632BE59BD9B4E019ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

static void fill(void *p, size_t size, uint64_t seed) {
  size_t i;
  for (i = 0; i + 8 <= size; i += 8) {
    uint64_t w = mix(seed, i);
    memcpy((char *)p + i, &w, 8);
  }
}

static int intact(const void *p, size_t size, uint64_t seed) {
  size_t i;
  for (i = 0; i + 8 <= size; i += 8) {
    uint64_t w;
    memcpy(&w, (const char *)p + i, 8);
    if (w != mix(seed, i)) return 0;
  }
  return 1;
}

/* ---------------------------------------------------------------------------------------------
 * What the trace file must hold, and what device 0 must show.
 * ------------------------------------------------------------------------------------------- */

static const char *trace_path;
/* Successful allocations and frees so far: each one is a trace line once flushed. */
static unsigned long traced_allocs, traced_frees;

/* Counts the "a," and "f," lines of the trace file; checks that every line is whole. */
static void count_trace_lines(unsigned long *allocs, unsigned long *frees) {
  char line[512];
  FILE *f = fopen(trace_path, "r");
  *allocs = *frees = 0;
  CHECK(f != NULL, "cannot open the trace file %s", trace_path);
  if (!f) return;
  while (fgets(line, sizeof line, f)) {
    size_t n = strlen(line);
    CHECK(n > 0 && line[n - 1] == '\n', "a trace line is cut short: \"%s\"", line);
    if (strncmp(line, "a,", 2) == 0) ++*allocs;
    else if (strncmp(line, "f,", 2) == 0) ++*frees;
    else CHECK(line[0] == '#', "an unexpected trace line: \"%s\"", line);
  }
  fclose(f);
}

static tessera_stats stats0(void) {
  tessera_stats s;
  int rc;
  memset(&s, 0, sizeof s);
  s.size = sizeof s;
  rc = tessera_get_stats(0, &s);
  CHECK(rc == TESSERA_OK, "tessera_get_stats(0) returned %d", rc);
  return s;
}

/* ---------------------------------------------------------------------------------------------
 * The calls every teardown stage makes.
 *
 * `victim` is a live block (with its pattern) made before teardown, which the stage frees.
 * Returns nothing: failures are counted.
 * ------------------------------------------------------------------------------------------- */

typedef struct {
  void *ptr;
  size_t size;
  uint64_t seed;
} block_t;

static char host_thing[256]; /* never handed out by tessera */

/* The last error after a failing call: `code`, with a message that contains `needle`. */
static unsigned long errors_checked;
static void expect_error(int code, const char *needle, const char *what) {
  int got = tessera_last_error_code();
  const char *msg = tessera_last_error();
  ++errors_checked;
  CHECK(msg != NULL, "%s: tessera_last_error() returned NULL", what);
  if (!msg) return;
  CHECK(got == code, "%s: last error code %d, expected %d (message \"%s\")", what, got, code, msg);
  CHECK(strstr(msg, needle) != NULL, "%s: the message \"%s\" lacks \"%s\"", what, msg, needle);
  tessera_clear_last_error();
  CHECK(tessera_last_error_code() == TESSERA_OK && tessera_last_error()[0] == '\0',
        "%s: tessera_clear_last_error() did not clear it", what);
}

static void teardown_calls(block_t *victim) {
  tessera_stats before, after, bad;
  void *p;
  size_t released;
  int rc;
  char needle[64];

  if (!victim->ptr) {
    CHECK(0, "no live block to free: main did not make it");
    return;
  }
  before = stats0();

  /* tessera_malloc: a working allocation, and a refused one. */
  tessera_clear_last_error();
  p = tessera_malloc(64 * 1024, 0, STREAM);
  CHECK(p != NULL, "tessera_malloc(64 KiB) during teardown failed: code %d \"%s\"",
        tessera_last_error_code(), tessera_last_error());
  if (p) {
    fill(p, 64 * 1024, 0xABCDEF);
    ++traced_allocs;
  }
  CHECK(tessera_malloc(4096, 99, STREAM) == NULL, "tessera_malloc on device 99 succeeded");
  expect_error(TESSERA_ERROR_INVALID_DEVICE, "invalid device 99", "tessera_malloc(device 99)");

  /* tessera_free of the live victim, and of this block. */
  CHECK(intact(victim->ptr, victim->size, victim->seed),
        "the block %p lost its pattern before teardown freed it", victim->ptr);
  tessera_clear_last_error();
  tessera_free(victim->ptr, victim->size, 0, STREAM);
  CHECK(tessera_last_error_code() == TESSERA_OK, "freeing a live block failed: %d \"%s\"",
        tessera_last_error_code(), tessera_last_error());
  ++traced_frees;
  if (p) {
    CHECK(intact(p, 64 * 1024, 0xABCDEF), "the teardown block %p lost its pattern", p);
    tessera_free(p, 64 * 1024, -1, STREAM);
    ++traced_frees;
  }

  /* tessera_free of an unknown pointer: refused (stderr line), counted, nothing else. */
  tessera_clear_last_error();
  tessera_free(host_thing, sizeof host_thing, 0, STREAM);
  snprintf(needle, sizeof needle, "unknown pointer 0x%" PRIxPTR, (uintptr_t)host_thing);
  expect_error(TESSERA_ERROR_UNKNOWN_POINTER, needle, "tessera_free(unknown)");

  after = stats0();
  CHECK(after.allocations == before.allocations + (p != NULL) &&
            after.frees == before.frees + 1 + (p != NULL),
        "allocations %" PRIu64 " -> %" PRIu64 ", frees %" PRIu64 " -> %" PRIu64, before.allocations,
        after.allocations, before.frees, after.frees);
  CHECK(after.allocated_bytes == before.allocated_bytes - victim->size,
        "allocated_bytes %" PRIu64 " -> %" PRIu64 " after freeing the %zu B victim",
        before.allocated_bytes, after.allocated_bytes, victim->size);
  CHECK(after.invalid_frees == before.invalid_frees + 1,
        "the unknown free was not counted: invalid_frees %" PRIu64 " -> %" PRIu64,
        before.invalid_frees, after.invalid_frees);

  /* tessera_get_stats on a bad device: the code comes back as the return value regardless. */
  memset(&bad, 0, sizeof bad);
  bad.size = sizeof bad;
  rc = tessera_get_stats(99, &bad);
  CHECK(rc == TESSERA_ERROR_INVALID_DEVICE, "tessera_get_stats(99) returned %d", rc);
  expect_error(TESSERA_ERROR_INVALID_DEVICE, "invalid device 99", "tessera_get_stats(99)");

  /* tessera_empty_cache: every device (there is one), then a bad one. */
  before = stats0();
  tessera_clear_last_error();
  released = tessera_empty_cache(-1);
  CHECK(tessera_last_error_code() == TESSERA_OK, "tessera_empty_cache(-1) failed: \"%s\"",
        tessera_last_error());
  after = stats0();
  CHECK(after.reserved_bytes + released == before.reserved_bytes &&
            after.allocated_bytes == before.allocated_bytes,
        "empty_cache(-1) said %zu B released, but reserved went %" PRIu64 " -> %" PRIu64
        " (allocated %" PRIu64 " -> %" PRIu64 ")",
        released, before.reserved_bytes, after.reserved_bytes, before.allocated_bytes,
        after.allocated_bytes);
  tessera_clear_last_error();
  CHECK(tessera_empty_cache(99) == 0, "tessera_empty_cache(99) returned non-zero");
  expect_error(TESSERA_ERROR_INVALID_DEVICE, "invalid device 99", "tessera_empty_cache(99)");

  rc = tessera_check_invariants(0);
  CHECK(rc == TESSERA_OK, "tessera_check_invariants(0) during teardown returned %d", rc);

  printf("teardown_test: stage '%s': done, %d failure(s) so far\n", stage, failures);
  victim->ptr = NULL;
}

/* ---------------------------------------------------------------------------------------------
 * Watching a thread's thread_local destructors run (glibc): one registered the way Rust's std
 * registers those of its thread_local! values, which all run before TLS-key destructors and, on
 * the main thread, before exit handlers.
 * ------------------------------------------------------------------------------------------- */

#ifdef __GLIBC__
extern void *__dso_handle;
extern int __cxa_thread_atexit_impl(void (*func)(void *), void *obj, void *dso_symbol);
static void mark_done(void *flag) { *(volatile int *)flag = 1; }
static void watch_tls_destructors(int *flag) {
  CHECK(__cxa_thread_atexit_impl(mark_done, flag, &__dso_handle) == 0,
        "__cxa_thread_atexit_impl failed");
}
#define CHECK_TLS_DESTRUCTORS_RAN(flag)                                                          \
  CHECK(flag, "this stage runs before its thread's thread_local destructors, so it does not "    \
              "test calls after them")
#else
static void watch_tls_destructors(int *flag) { *flag = 1; }
#define CHECK_TLS_DESTRUCTORS_RAN(flag) ((void)(flag))
#endif

/* ---------------------------------------------------------------------------------------------
 * (b) pthread TLS-key destructors.
 * ------------------------------------------------------------------------------------------- */

static pthread_key_t key;
static block_t victims[4]; /* 0: (a), 1: (b) used thread, 2: (b) fresh thread, 3: (c) */

typedef struct {
  const char *name;
  block_t *victim;
  int used_tessera; /* the thread called tessera before exiting */
  int tls_destructors_ran;
  int done;
} thread_job;

static void key_destructor(void *arg) {
  thread_job *job = arg;
  const char *outer = stage;
  stage = job->name;
  CHECK_TLS_DESTRUCTORS_RAN(job->tls_destructors_ran);
  if (job->used_tessera)
    /* The error the thread left before exiting is still there: the slot outlives teardown. */
    expect_error(TESSERA_ERROR_INVALID_DEVICE, "invalid device 99",
                 "the error the thread left before it exited");
  else
    CHECK(tessera_last_error_code() == TESSERA_OK && tessera_last_error()[0] == '\0',
          "a thread that never called tessera has a last error: %d \"%s\"",
          tessera_last_error_code(), tessera_last_error());
  teardown_calls(job->victim);
  job->done = 1;
  stage = outer;
}

static void *thread_main(void *arg) {
  thread_job *job = arg;
  watch_tls_destructors(&job->tls_destructors_ran);
  if (job->used_tessera) {
    void *p = tessera_malloc(4096, 0, STREAM);
    CHECK(p != NULL, "tessera_malloc in a thread failed");
    if (p) {
      ++traced_allocs;
      tessera_free(p, 4096, 0, STREAM);
      ++traced_frees;
    }
    /* Leave an error in this thread's slot: the destructor checks that it is still there. */
    CHECK(tessera_malloc(1, 99, STREAM) == NULL, "device 99 accepted");
    CHECK(tessera_last_error_code() == TESSERA_ERROR_INVALID_DEVICE,
          "the thread's error was not recorded: %d", tessera_last_error_code());
  }
  CHECK(pthread_setspecific(key, job) == 0, "pthread_setspecific failed");
  return NULL;
}

static void run_thread(thread_job *job) {
  pthread_t t;
  int rc = pthread_create(&t, NULL, thread_main, job);
  CHECK(rc == 0, "pthread_create failed: %d", rc);
  if (rc == 0) CHECK(pthread_join(t, NULL) == 0, "pthread_join failed");
  CHECK(job->done, "the TLS-key destructor of thread '%s' did not run", job->name);
}

/* ---------------------------------------------------------------------------------------------
 * (a) the atexit handler, (c) the destructor.
 * ------------------------------------------------------------------------------------------- */

static int atexit_ran, main_tls_destructors_ran;
static unsigned long allocs_before_exit, frees_before_exit;

static void at_exit(void) {
  unsigned long allocs, frees;
  stage = "(a) atexit handler, after tessera's trace flush";
  atexit_ran = 1;
  CHECK_TLS_DESTRUCTORS_RAN(main_tls_destructors_ran);
  /* The error main left before it returned is still there. */
  expect_error(TESSERA_ERROR_INVALID_DEVICE, "invalid device 99",
               "the error main left before it returned");
  allocs_before_exit = traced_allocs;
  frees_before_exit = traced_frees;
  /* tessera's exit handler, registered at the first tessera call (after this one), has run: it
   * flushed every event so far. main checked that they were still buffered before it returned. */
  count_trace_lines(&allocs, &frees);
  CHECK(allocs == traced_allocs && frees == traced_frees,
        "the trace holds %lu allocations and %lu frees, expected %lu and %lu: tessera's exit "
        "handler did not flush it before this handler ran",
        allocs, frees, traced_allocs, traced_frees);
  teardown_calls(&victims[0]);
}

__attribute__((destructor)) static void at_unload(void) {
  tessera_stats s;
  unsigned long allocs, frees;
  stage = "(c) destructor function";
  if (!trace_path) return; /* main refused to run */
  CHECK(atexit_ran, "the destructor ran before the atexit handler");
  teardown_calls(&victims[3]);
  s = stats0();
  CHECK(s.active_blocks == 0 && s.allocated_bytes == 0,
        "%" PRIu64 " blocks (%" PRIu64 " B) still live after every block was freed",
        s.active_blocks, s.allocated_bytes);
  CHECK(tessera_check_invariants(0) == TESSERA_OK, "invariants broken at the very end");
  /* After its exit-time flush tessera writes each line at once: the events of the exit stages
   * are in the file too. */
  count_trace_lines(&allocs, &frees);
  CHECK(allocs == traced_allocs && frees == traced_frees,
        "the trace holds %lu allocations and %lu frees at the very end, expected %lu and %lu: "
        "events after tessera's exit-time flush were lost",
        allocs, frees, traced_allocs, traced_frees);
  if (failures) {
    fprintf(stderr, "teardown_test: %d failure(s)\n", failures);
    fflush(stdout);
    fflush(stderr);
    _exit(1);
  }
  printf("teardown_test: OK (%lu checks, %lu error codes and messages; atexit handler, 2 TLS-key "
         "destructors, destructor function; the trace holds the %lu allocations and %lu frees "
         "made before exit, and %lu and %lu in all)\n",
         checks, errors_checked, allocs_before_exit, frees_before_exit, traced_allocs,
         traced_frees);
  fflush(stdout);
}

int main(void) {
  const char *driver = getenv("TESSERA_DRIVER");
  unsigned long allocs, frees;
  size_t i;
  thread_job used = {"(b) TLS-key destructor, thread that used tessera", &victims[1], 1, 0, 0};
  thread_job fresh = {"(b) TLS-key destructor, thread that never used tessera", &victims[2], 0, 0, 0};

  setvbuf(stdout, NULL, _IOLBF, 0);
  if (!driver || strcmp(driver, "sim") != 0 || !getenv("TESSERA_TRACE")) {
    fprintf(stderr, "teardown_test: FAIL: run me with TESSERA_DRIVER=sim (I write device memory "
                    "from the CPU) and TESSERA_TRACE=<a file to create>\n");
    return 1;
  }
  trace_path = getenv("TESSERA_TRACE");
  watch_tls_destructors(&main_tls_destructors_ran);
  /* Before any tessera call: tessera registers its own exit handler at its first call, so it
   * runs before this one (atexit handlers run in reverse order). */
  if (atexit(at_exit) != 0) {
    fprintf(stderr, "teardown_test: FAIL: atexit failed\n");
    return 1;
  }
  if (pthread_key_create(&key, key_destructor) != 0) {
    fprintf(stderr, "teardown_test: FAIL: pthread_key_create failed\n");
    return 1;
  }

  /* The blocks each stage frees, plus some traffic for the trace. */
  for (i = 0; i < 4; i++) {
    victims[i].size = (i + 1) * MIB + 512 * i;
    victims[i].seed = 1000 + i;
    victims[i].ptr = tessera_malloc(victims[i].size, 0, STREAM);
    CHECK(victims[i].ptr != NULL, "tessera_malloc(%zu) failed: \"%s\"", victims[i].size,
          tessera_last_error());
    if (!victims[i].ptr) return 1;
    fill(victims[i].ptr, victims[i].size, victims[i].seed);
    ++traced_allocs;
  }
  for (i = 0; i < 6; i++) {
    void *p = tessera_malloc(512 << i, 0, STREAM);
    CHECK(p != NULL, "tessera_malloc(%d) failed", 512 << (int)i);
    if (!p) return 1;
    ++traced_allocs;
    tessera_free(p, 0, 0, STREAM);
    ++traced_frees;
  }
  run_thread(&used);
  run_thread(&fresh);
  stage = "main";
  /* An error the atexit handler must still see. */
  CHECK(tessera_malloc(1, 99, STREAM) == NULL, "device 99 accepted");
  CHECK(tessera_last_error_code() == TESSERA_ERROR_INVALID_DEVICE, "no error recorded");

  /* Still buffered (tessera flushes at exit): what lets the atexit handler tell that the flush
   * ran before it. */
  count_trace_lines(&allocs, &frees);
  CHECK(allocs < traced_allocs, "the trace already holds all %lu allocations before exit",
        traced_allocs);
  printf("teardown_test: main done (%lu allocations, %lu frees so far; %lu and %lu in the trace "
         "file before exit)\n",
         traced_allocs, traced_frees, allocs, frees);
  return failures ? 1 : 0;
}
