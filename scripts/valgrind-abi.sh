#!/usr/bin/env bash
# Runs the C ABI test programs (tests/c/abi_test.c, tests/c/teardown_test.c) under valgrind's
# memcheck on the simulated device, as the test valgrind_memcheck_finds_nothing_in_the_c_programs
# in ffi/tests/c_programs.rs does, and prints valgrind's summary of each.
#
# Usage: scripts/valgrind-abi.sh [--release]
#   Builds libtessera.so (cargo build -p tessera-ffi, in CARGO_TARGET_DIR or target/), compiles
#   both programs against it, runs each under memcheck. Fails (exit 1) if a program fails, or
#   valgrind reports an error or a definitely/indirectly lost block (its exit status 99).
#   Extra valgrind options come from VALGRIND_OPTS, which valgrind reads itself, e.g.
#   VALGRIND_OPTS=--track-origins=yes to see where an uninitialised value came from.
#   VALGRIND=/path/to/valgrind, CC=... override the tools. Full logs are kept in the work
#   directory printed at the end.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
root=$PWD

profile=debug
cargo_profile=()
if [[ "${1:-}" == "--release" ]]; then
    profile=release
    cargo_profile=(--release)
elif [[ $# -gt 0 ]]; then
    echo "usage: $0 [--release]" >&2
    exit 2
fi

valgrind=${VALGRIND:-$(command -v valgrind || true)}
if [[ -z "$valgrind" ]]; then
    echo "valgrind not found (apt-get install valgrind, or set VALGRIND=/path/to/valgrind)" >&2
    exit 1
fi
cc=${CC:-gcc}

echo "== building libtessera.so ($profile)"
target_dir=${CARGO_TARGET_DIR:-$root/target}
cargo build -p tessera-ffi --lib "${cargo_profile[@]}" --target-dir "$target_dir"
lib_dir="$target_dir/$profile"
[[ -f "$lib_dir/libtessera.so" ]] || { echo "no $lib_dir/libtessera.so" >&2; exit 1; }

work=$(mktemp -d "${TMPDIR:-/tmp}/tessera-valgrind.XXXXXX")
for prog in abi_test teardown_test; do
    "$cc" -std=c11 -Wall -Wextra -Werror -pedantic -O2 -g -pthread -I "$root/include" \
        "$root/tests/c/$prog.c" -L "$lib_dir" -ltessera -Wl,-rpath,"$lib_dir" -o "$work/$prog"
done

supp=()
[[ -f "$root/tests/c/valgrind.supp" ]] && supp=(--suppressions="$root/tests/c/valgrind.supp")
vg_args=(--tool=memcheck --error-exitcode=99 --leak-check=full
         --errors-for-leak-kinds=definite,indirect --show-leak-kinds=definite,indirect "${supp[@]}")

failed=0
run() { # name sim [env...]
    local name=$1 sim=$2 status=0 start end
    shift 2
    echo "== valgrind $name (TESSERA_SIM=$sim)"
    start=$(date +%s)
    (cd "$work" && env -u TESSERA_CONF -u TESSERA_TRACE -u LD_LIBRARY_PATH \
        TESSERA_DRIVER=sim TESSERA_SIM="$sim" "$@" \
        "$valgrind" "${vg_args[@]}" "./$name" >"$name.out" 2>"$name.err") || status=$?
    end=$(date +%s)
    grep -E "^$name: (OK|FAIL)" "$work/$name.out" "$work/$name.err" -h || true
    grep -E "ERROR SUMMARY|definitely lost|indirectly lost|possibly lost|still reachable|All heap blocks were freed" \
        "$work/$name.err" | sed 's/^==[0-9]*== */  /'
    echo "  exit status $status, $((end - start)) s"
    if [[ $status -ne 0 ]]; then
        failed=1
        if [[ $status -eq 99 ]]; then
            echo "  valgrind found errors or leaks: see $work/$name.err" >&2
        else
            echo "  the program failed: see $work/$name.out and $work/$name.err" >&2
        fi
    fi
}

run abi_test devices:2,capacity:64MiB,granularity:2MiB
run teardown_test devices:1,capacity:64MiB,granularity:2MiB TESSERA_TRACE="$work/teardown.trace"

echo "== logs in $work"
if [[ $failed -ne 0 ]]; then
    echo "FAILED" >&2
    exit 1
fi
echo "OK: no invalid access, nothing definitely or indirectly lost"
