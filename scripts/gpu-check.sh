#!/usr/bin/env bash
# What to run on a GPU machine for the C ABI and PyTorch (issue 3).
#
# That machine has a GPU, its driver, nvcc and PyTorch, but no cargo: build the library where
# cargo is (`cargo build --release -p tessera-ffi`), then carry the repository with
# target/release/libtessera.so and include/tessera.h, and run from the repository root:
#
#     bash scripts/gpu-check.sh
#
# Steps (each prints one PASS/FAIL/SKIP line; the exit status is 1 if any step failed):
#   1. abi_check     nvcc-compiles cuda/abi_check.cu against the carried libtessera.so and runs it
#                    with TESSERA_DRIVER=cuda: remapping under a cap, kernel-verified patterns in
#                    every live allocation, two streams, record_stream, an OOM, a CUDA graph
#                    captured into a private pool and replayed.
#   1b. sanitizer    the same program under compute-sanitizer's memcheck (invalid device accesses,
#                    e.g. a kernel touching memory tessera unmapped); SKIP without compute-sanitizer.
#   2. c_abi_sim     tests/c/abi_test.c, torch_malloc_test.cpp and graph_hooks_test.cpp against the same library,
#                    on the SIMULATED device (TESSERA_DRIVER=sim): they write device memory with the
#                    CPU (memset/memcmp), which is only valid there, so they never run with
#                    TESSERA_DRIVER=cuda. This step only shows the carried library works on this
#                    machine; SKIP without gcc/g++.
#   3. torch         scripts/gpu_torch_check.py: tessera as PyTorch's allocator (training parity with
#                    the native allocator, OOM, OOM hook, empty_cache, record_stream, snapshot, a
#                    training step captured as a CUDA graph, shared pools, make_graphed_callables,
#                    torch.compile(mode="reduce-overhead")).
#
# Environment: TESSERA_LIBRARY (default target/release/libtessera.so), PYTHON (default python3),
# NVCC (default nvcc), NVCC_FLAGS (default -arch=native, dropped if nvcc rejects it). Logs go to
# $OUT/gpu-check/ when OUT is set, else target/gpu-check/.
set -u

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
LIB=${TESSERA_LIBRARY:-$ROOT/target/release/libtessera.so}
PYTHON=${PYTHON:-python3}
NVCC=${NVCC:-nvcc}
NVCC_FLAGS=${NVCC_FLAGS:--arch=native}
if [ -n "${OUT:-}" ]; then LOGS=$OUT/gpu-check; else LOGS=$ROOT/target/gpu-check; fi
BUILD=$LOGS/build
mkdir -p "$LOGS" "$BUILD"
SUMMARY=$LOGS/summary.txt
: > "$SUMMARY"
FAILED=0

verdict() { # verdict STATUS NAME TEXT
  local line="$1 $2: $3"
  echo "$line"
  echo "$line" >> "$SUMMARY"
  [ "$1" = FAIL ] && FAILED=1
  return 0
}

# run NAME CMD...: runs CMD, its output shown and logged to $LOGS/NAME.log; returns its status.
run() {
  local name=$1
  shift
  echo "+ $*" | tee "$LOGS/$name.log"
  "$@" 2>&1 | tee -a "$LOGS/$name.log"
  return "${PIPESTATUS[0]}"
}

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "host: $(uname -a)"
  echo "library: $LIB"
  (cd "$ROOT" && git rev-parse HEAD 2>/dev/null && git status --short 2>/dev/null | head -20) || echo "git: no repository"
  nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv 2>&1 || echo "nvidia-smi: not available"
  "$NVCC" --version 2>&1 | tail -2 || echo "nvcc: not available"
  "$PYTHON" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())' 2>&1
} > "$LOGS/environment.txt" 2>&1
cat "$LOGS/environment.txt"
echo

if [ ! -f "$LIB" ] || [ ! -f "$ROOT/include/tessera.h" ]; then
  verdict FAIL setup "no $LIB or include/tessera.h: build with \`cargo build --release -p tessera-ffi\` and carry both"
  exit 1
fi
LIBDIR=$(cd "$(dirname "$LIB")" && pwd)
if [ "$(basename "$LIB")" != libtessera.so ]; then
  # -ltessera needs the name libtessera.so; link a copy under that name.
  cp "$LIB" "$BUILD/libtessera.so"
  LIBDIR=$BUILD
fi

# 1. abi_check on the GPU ------------------------------------------------------------------------
echo "== 1. abi_check (cuda/abi_check.cu, TESSERA_DRIVER=cuda)"
ABI_CHECK_BUILT=0 # set when this run built it: step 1b must not sanitize a stale binary
if ! command -v "$NVCC" > /dev/null 2>&1; then
  verdict FAIL abi_check "$NVCC not found (set NVCC=/usr/local/cuda/bin/nvcc)"
else
  compile_abi_check() {
    # shellcheck disable=SC2086 # NVCC_FLAGS is a list of flags
    run abi_check_build "$NVCC" -std=c++17 -O2 $1 -I"$ROOT/include" "$ROOT/cuda/abi_check.cu" \
      -L"$LIBDIR" -ltessera -Xlinker -rpath -Xlinker "$LIBDIR" -o "$BUILD/abi_check"
  }
  if compile_abi_check "$NVCC_FLAGS" || { [ -n "$NVCC_FLAGS" ] && echo "(retrying without $NVCC_FLAGS)" && compile_abi_check ""; }; then
    ABI_CHECK_BUILT=1
    if run abi_check env -u TESSERA_SIM -u TESSERA_CONF -u TESSERA_TRACE TESSERA_DRIVER=cuda "$BUILD/abi_check" \
      && grep -q '^abi_check: OK$' "$LOGS/abi_check.log"; then
      verdict PASS abi_check "$(grep '^abi_check: summary' "$LOGS/abi_check.log" | sed 's/^abi_check: summary: //')"
    else
      verdict FAIL abi_check "see $LOGS/abi_check.log: $(grep -m1 'FAIL' "$LOGS/abi_check.log" || tail -1 "$LOGS/abi_check.log")"
    fi
  else
    verdict FAIL abi_check "nvcc could not compile cuda/abi_check.cu (see $LOGS/abi_check_build.log)"
  fi
fi
echo

# 1b. compute-sanitizer over abi_check (issue 6) ------------------------------------------------------
# memcheck sees every kernel access: a kernel touching memory tessera unmapped or remapped under it
# would be reported here even when the pattern checks happen to pass. (No --leak-check: the
# process-wide allocator keeps its cache until exit by design. --report-api-errors no: abi_check
# polls with cudaStreamQuery, whose "not ready" is expected, not an error.)
echo "== 1b. compute-sanitizer memcheck over abi_check"
SANITIZER=${COMPUTE_SANITIZER:-$(command -v compute-sanitizer || echo "$(dirname "$(command -v "$NVCC" 2>/dev/null || echo /usr/local/cuda/bin/nvcc)")/compute-sanitizer")}
if [ "$ABI_CHECK_BUILT" != 1 ]; then
  verdict FAIL sanitizer "abi_check was not built by step 1 of this run"
elif [ ! -x "$SANITIZER" ]; then
  verdict SKIP sanitizer "compute-sanitizer not found (set COMPUTE_SANITIZER=/path/to/compute-sanitizer)"
elif run sanitizer env -u TESSERA_SIM -u TESSERA_CONF -u TESSERA_TRACE TESSERA_DRIVER=cuda \
    "$SANITIZER" --tool memcheck --report-api-errors no --error-exitcode 97 "$BUILD/abi_check" \
  && grep -q '^abi_check: OK$' "$LOGS/sanitizer.log"; then
  verdict PASS sanitizer "$(grep -m1 'ERROR SUMMARY' "$LOGS/sanitizer.log" || echo 'no errors')"
else
  verdict FAIL sanitizer "see $LOGS/sanitizer.log: $(grep -m1 -E 'ERROR SUMMARY|Invalid|FAIL' "$LOGS/sanitizer.log" || tail -1 "$LOGS/sanitizer.log")"
fi
echo

# 2. The C ABI tests, on the simulated device -------------------------------------------------------
echo "== 2. tests/c on the SIMULATED device (CPU writes to device memory: never TESSERA_DRIVER=cuda)"
if ! command -v gcc > /dev/null 2>&1 || ! command -v g++ > /dev/null 2>&1; then
  verdict SKIP c_abi_sim "gcc/g++ not installed here (these run under \`cargo test -p tessera-ffi\` where cargo is)"
else
  SIM_ENV=(env -u TESSERA_CONF -u TESSERA_TRACE TESSERA_DRIVER=sim TESSERA_SIM=devices:2,capacity:64MiB,granularity:2MiB)
  if run c_abi_build gcc -std=c11 -Wall -Wextra -Werror -pedantic -O2 -pthread -I"$ROOT/include" \
       "$ROOT/tests/c/abi_test.c" -L"$LIBDIR" -ltessera -Wl,-rpath,"$LIBDIR" -o "$BUILD/abi_test" \
     && run c_abi_build_cpp g++ -std=c++17 -Wall -Wextra -Werror -pedantic -O2 -pthread -I"$ROOT/include" \
       "$ROOT/tests/c/torch_malloc_test.cpp" -L"$LIBDIR" -ltessera -Wl,-rpath,"$LIBDIR" -o "$BUILD/torch_malloc_test" \
     && run c_abi_build_graphs g++ -std=c++17 -Wall -Wextra -Werror -pedantic -O2 -pthread -I"$ROOT/include" \
       "$ROOT/tests/c/graph_hooks_test.cpp" -L"$LIBDIR" -ltessera -Wl,-rpath,"$LIBDIR" -o "$BUILD/graph_hooks_test"; then
    if run c_abi_sim "${SIM_ENV[@]}" "$BUILD/abi_test" && run c_torch_malloc_sim "${SIM_ENV[@]}" "$BUILD/torch_malloc_test" \
       && run c_graph_hooks_sim "${SIM_ENV[@]}" "$BUILD/graph_hooks_test"; then
      verdict PASS c_abi_sim "abi_test, torch_malloc_test and graph_hooks_test passed on the simulated device with the carried library"
    else
      verdict FAIL c_abi_sim "see $LOGS/c_abi_sim.log, $LOGS/c_torch_malloc_sim.log and $LOGS/c_graph_hooks_sim.log"
    fi
  else
    verdict FAIL c_abi_sim "the C/C++ tests did not compile against the carried header (see $LOGS/c_abi_build*.log)"
  fi
fi
echo

# 3. PyTorch ----------------------------------------------------------------------------------------
echo "== 3. PyTorch (scripts/gpu_torch_check.py)"
if run torch env PYTHONPATH="$ROOT/python${PYTHONPATH:+:$PYTHONPATH}" TESSERA_LIBRARY="$LIB" \
   "$PYTHON" "$ROOT/scripts/gpu_torch_check.py" --json-out "$LOGS/gpu_torch_check.jsonl"; then
  verdict PASS torch "$(grep -c '^PASS ' "$LOGS/torch.log") passed, $(grep -c '^SKIP ' "$LOGS/torch.log") skipped (see $LOGS/torch.log)"
else
  verdict FAIL torch "$(grep -E '^(FAIL|SKIP) ' "$LOGS/torch.log" | head -3 | tr '\n' ' ')(see $LOGS/torch.log)"
fi
echo

echo "== summary (also in $SUMMARY)"
cat "$SUMMARY"
exit "$FAILED"
