//! The C ABI from C and C++: compiles `tests/c/abi_test.c` and `tests/c/teardown_test.c` (gcc,
//! C11) and `tests/c/torch_malloc_test.cpp` and `tests/c/graph_hooks_test.cpp` (g++, C++17: the
//! CUDA-graph hooks called as PyTorch's binding calls them) against `include/tessera.h`, links them to
//! the `libtessera.so` of this build, and runs them on the simulated device. Each program checks
//! real behaviour (patterns in every live allocation, exact stats, error codes, bad input at every
//! entry point, calls during process and thread teardown, the C++ exception) and exits non-zero
//! with a message at its failures; this test prints that output and fails.
//!
//! # Under valgrind
//! [`valgrind_memcheck_finds_nothing_in_the_c_programs`] runs `abi_test`, `teardown_test` and
//! `graph_hooks_test` under
//! valgrind's memcheck: no invalid access, no use of uninitialised memory, and nothing definitely
//! or indirectly lost at exit (memory the allocator still holds at exit is reachable from its
//! statics by design, and is not a leak). Without valgrind on PATH (or `VALGRIND=/path`) the test
//! prints a skip line and passes, unless `TESSERA_REQUIRE_VALGRIND=1`, as CI sets, makes it fail.
//! `scripts/valgrind-abi.sh` runs the same by hand.
//!
//! # Where the library comes from
//! Cargo does not build a package's `cdylib` before running that package's integration tests: a
//! test only depends on a *linkable* library (rlib/dylib), and `tessera-ffi` is `cdylib` only
//! (rust-lang/cargo#8311). A fresh `cargo test` therefore has no `libtessera.so`, and an old one may
//! be stale. So this test runs `cargo build -p tessera-ffi --lib` itself, once per test binary, with
//! the profile, target directory and target triple this binary was built with (read from its own
//! path, `<target-dir>/[<triple>/]<profile>/deps/<test>`), and takes the library's path from
//! cargo's JSON artifact messages. That build is a no-op when the library is fresh. Cargo releases
//! its build-directory lock before it runs test binaries (checked with cargo 1.95), so the nested
//! build does not deadlock; should a cargo ever hold it, the nested build would wait on "Blocking
//! waiting for file lock", and the watchdog below fails the test after 20 minutes saying so.
//!
//! `TESSERA_FFI_LIB=/path/to/libtessera.so` skips the nested build and uses that library.
//!
//! # Needs
//! `gcc` and `g++` on PATH (or `CC`/`CXX`); a missing compiler fails the test (CI has both).
//! valgrind for the memcheck test (see above).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The simulated machine both programs expect.
const SIM: &str = "devices:2,capacity:64MiB,granularity:2MiB";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("ffi/ has a parent")
        .to_path_buf()
}

/// Runs `cmd` to completion with a time limit, collecting stdout and stderr.
fn run_with_limit(mut cmd: Command, limit: Duration, what: &str) -> (ExitStatus, String, String) {
    let mut child: Child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{what}: cannot start {cmd:?}: {e}"));
    let mut out = child.stdout.take().expect("piped stdout");
    let mut err = child.stderr.take().expect("piped stderr");
    let out_reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = out.read_to_end(&mut s);
        String::from_utf8_lossy(&s).into_owned()
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = err.read_to_end(&mut s);
        String::from_utf8_lossy(&s).into_owned()
    });
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for a child") {
            break Some(status);
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stdout = out_reader.join().unwrap_or_default();
    let stderr = err_reader.join().unwrap_or_default();
    match status {
        Some(s) => (s, stdout, stderr),
        None => panic!(
            "{what}: still running after {} s, killed.\n--- command: {cmd:?}\n--- stdout:\n{stdout}\n--- stderr:\n{stderr}",
            limit.as_secs()
        ),
    }
}

/// Where this test binary was built: (target dir, target triple if cross-building, profile dir
/// name), from `<target-dir>/[<triple>/]<profile>/deps/<this test>`.
fn build_layout() -> (PathBuf, Option<String>, String) {
    let exe = std::env::current_exe().expect("the test binary's path");
    let deps = exe.parent().expect("the test binary is in a directory");
    assert!(
        deps.file_name().is_some_and(|n| n == "deps"),
        "this test binary is not in <target-dir>/<profile>/deps ({}): cannot tell which \
         libtessera.so belongs to this build; set TESSERA_FFI_LIB=/path/to/libtessera.so",
        exe.display()
    );
    let profile_dir = deps.parent().expect("deps has a parent");
    let profile = profile_dir
        .file_name()
        .expect("a profile directory name")
        .to_string_lossy()
        .into_owned();
    let above = profile_dir.parent().expect("the profile dir has a parent");
    // Cargo marks the root of every target directory with CACHEDIR.TAG; with --target the profile
    // directory sits one level further down, under the triple.
    if above.join("CACHEDIR.TAG").exists() {
        (above.to_path_buf(), None, profile)
    } else {
        let triple = above.file_name().map(|n| n.to_string_lossy().into_owned());
        let root = above.parent().expect("a target directory above the triple");
        (root.to_path_buf(), triple, profile)
    }
}

/// `libtessera.so` of this build: built (or found fresh) by a nested `cargo build`.
fn library() -> &'static Path {
    static LIB: OnceLock<PathBuf> = OnceLock::new();
    LIB.get_or_init(|| {
        if let Some(path) = std::env::var_os("TESSERA_FFI_LIB") {
            let path = PathBuf::from(path);
            assert!(
                path.is_file(),
                "TESSERA_FFI_LIB={} is not a file",
                path.display()
            );
            return path;
        }
        let (target_dir, triple, profile_dir) = build_layout();
        // The profile whose output directory is `profile_dir`: dev -> debug, test -> debug,
        // release/bench -> release, a custom profile -> its own name.
        let profile = match profile_dir.as_str() {
            "debug" => "dev",
            other => other,
        };
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.arg("build")
            .arg("--manifest-path")
            .arg(repo_root().join("Cargo.toml"))
            .args(["-p", "tessera-ffi", "--lib", "--profile", profile])
            .arg("--target-dir")
            .arg(&target_dir)
            .arg("--message-format=json-render-diagnostics");
        if let Some(t) = &triple {
            cmd.args(["--target", t]);
        }
        let (status, stdout, stderr) = run_with_limit(
            cmd,
            Duration::from_secs(20 * 60),
            "the nested `cargo build -p tessera-ffi` (if its stderr says \"Blocking waiting for \
             file lock\", this cargo holds the build lock while tests run: build the library \
             first and set TESSERA_FFI_LIB)",
        );
        assert!(
            status.success(),
            "`cargo build -p tessera-ffi --lib --profile {profile}` failed ({status}):\n{stderr}"
        );
        let lib = cdylib_from_messages(&stdout).unwrap_or_else(|| {
            panic!(
                "`cargo build -p tessera-ffi` reported no cdylib artifact.\n--- stdout:\n{stdout}\n--- stderr:\n{stderr}"
            )
        });
        assert!(lib.is_file(), "cargo reported {} but it is not there", lib.display());
        lib
    })
}

/// The `.so` of tessera-ffi's cdylib, from cargo's `--message-format=json` lines.
fn cdylib_from_messages(stdout: &str) -> Option<PathBuf> {
    stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact")
        .filter(|m| {
            m["target"]["kind"]
                .as_array()
                .is_some_and(|k| k.iter().any(|k| k == "cdylib"))
        })
        .flat_map(|m| {
            m["filenames"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
        })
        .filter_map(|f| f.as_str().map(PathBuf::from))
        .find(|f| {
            f.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("libtessera.so"))
        })
}

/// The directory compiled programs go to (per profile, so that two builds never share one).
fn out_dir() -> PathBuf {
    let (_, triple, profile) = build_layout_or_default();
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("c-programs")
        .join(triple.unwrap_or_default())
        .join(profile);
    std::fs::create_dir_all(&dir).expect("creating the output directory");
    dir
}

fn build_layout_or_default() -> (PathBuf, Option<String>, String) {
    if std::env::var_os("TESSERA_FFI_LIB").is_some() {
        (PathBuf::new(), None, "given-lib".into())
    } else {
        build_layout()
    }
}

/// Compiles one program with `compiler` (gcc or g++; `CC`/`CXX` override) and returns its path.
fn compile(compiler_env: &str, default: &str, std_flag: &str, source: &str, name: &str) -> PathBuf {
    let lib = library();
    let lib_dir = lib.parent().expect("the library's directory");
    let root = repo_root();
    let exe = out_dir().join(name);
    let compiler = std::env::var(compiler_env).unwrap_or_else(|_| default.to_string());
    let mut cmd = Command::new(&compiler);
    cmd.args([
        std_flag,
        "-Wall",
        "-Wextra",
        "-Werror",
        "-pedantic",
        "-O2",
        "-g",
        "-pthread",
    ])
    .arg("-I")
    .arg(root.join("include"))
    .arg(root.join(source))
    .arg("-L")
    .arg(lib_dir)
    .arg("-ltessera")
    .arg(format!("-Wl,-rpath,{}", lib_dir.display()))
    .arg("-o")
    .arg(&exe);
    let output = match cmd.output() {
        Ok(o) => o,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "`{compiler}` was not found on PATH. This test compiles {source} against \
             libtessera.so and needs gcc and g++ (CI has them; on Debian/Ubuntu: \
             apt-get install gcc g++)."
        ),
        Err(e) => panic!("cannot run `{compiler}`: {e}"),
    };
    assert!(
        output.status.success(),
        "compiling {source} failed ({}):\n--- command: {cmd:?}\n--- stderr:\n{}\n--- stdout:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr),
        String::from_utf8_lossy(&output.stdout),
    );
    exe
}

/// A program of `tests/c/`, compiled once per test binary: C11 with gcc, or C++17 with g++ for a
/// `.cpp` file.
fn program(cell: &'static OnceLock<PathBuf>, source: &str) -> &'static Path {
    cell.get_or_init(|| {
        let name = Path::new(source)
            .file_stem()
            .and_then(|s| s.to_str())
            .expect("a program's file name");
        if source.ends_with(".cpp") {
            compile("CXX", "g++", "-std=c++17", source, name)
        } else {
            compile("CC", "gcc", "-std=c11", source, name)
        }
    })
}

fn abi_test() -> &'static Path {
    static EXE: OnceLock<PathBuf> = OnceLock::new();
    program(&EXE, "tests/c/abi_test.c")
}

fn teardown_test() -> &'static Path {
    static EXE: OnceLock<PathBuf> = OnceLock::new();
    program(&EXE, "tests/c/teardown_test.c")
}

fn torch_malloc_test() -> &'static Path {
    static EXE: OnceLock<PathBuf> = OnceLock::new();
    program(&EXE, "tests/c/torch_malloc_test.cpp")
}

fn graph_hooks_test() -> &'static Path {
    static EXE: OnceLock<PathBuf> = OnceLock::new();
    program(&EXE, "tests/c/graph_hooks_test.cpp")
}

/// Runs a compiled program on the simulated device: (status, stdout, stderr).
fn run_on_sim(exe: &Path, sim: &str) -> (ExitStatus, String, String) {
    run_on_sim_with(Command::new(exe), exe, sim, &[])
}

/// Runs `cmd` (which runs `exe`, perhaps under a tool) on the simulated device with the extra
/// environment `env`.
fn run_on_sim_with(
    mut cmd: Command,
    exe: &Path,
    sim: &str,
    env: &[(&str, &Path)],
) -> (ExitStatus, String, String) {
    cmd.env("TESSERA_DRIVER", "sim")
        .env("TESSERA_SIM", sim)
        // The programs configure tessera themselves; none of the caller's settings may leak in.
        .env_remove("TESSERA_CONF")
        .env_remove("TESSERA_TRACE")
        // The rpath names the library of this build; cargo's LD_LIBRARY_PATH must not override it.
        .env_remove("LD_LIBRARY_PATH")
        .current_dir(out_dir());
    for (k, v) in env {
        cmd.env(k, v);
    }
    run_with_limit(cmd, Duration::from_secs(300), &exe.display().to_string())
}

fn assert_passes(exe: &Path, ok_line: &str) {
    let (status, stdout, stderr) = run_on_sim(exe, SIM);
    assert!(
        status.success() && stdout.contains(ok_line),
        "{} failed ({status}) on TESSERA_SIM={SIM}, library {}\n--- stdout:\n{stdout}\n--- stderr:\n{stderr}",
        exe.display(),
        library().display(),
    );
    // Shown with `cargo test -- --nocapture`.
    print!("{stdout}");
}

#[test]
fn c_abi_test_passes_on_the_simulated_device() {
    assert_passes(abi_test(), "abi_test: OK");
}

#[test]
fn cpp_torch_malloc_test_passes_on_the_simulated_device() {
    assert_passes(torch_malloc_test(), "torch_malloc_test: OK");
}

#[test]
fn cpp_graph_hooks_called_as_pytorch_calls_them_pass_on_the_simulated_device() {
    assert_passes(graph_hooks_test(), "graph_hooks_test: OK");
}

/// The harness sees a failing program: on a machine unlike the one it expects, abi_test must
/// stop with exit status 1 and say where.
#[test]
fn a_failing_check_fails_the_program() {
    let (status, stdout, stderr) =
        run_on_sim(abi_test(), "devices:1,capacity:64MiB,granularity:2MiB");
    assert_eq!(
        status.code(),
        Some(1),
        "abi_test on a 1-device machine should fail with status 1\n--- stdout:\n{stdout}\n--- stderr:\n{stderr}"
    );
    assert!(
        stderr.contains("abi_test: FAIL") && stderr.contains("tessera_device_count()"),
        "the failure message does not say what failed:\n{stderr}"
    );
}

/// A trace file for one run of teardown_test, removed first so that a stale one cannot pass.
fn fresh_trace_path(name: &str) -> PathBuf {
    let path = out_dir().join(name);
    let _ = std::fs::remove_file(&path);
    path
}

/// tessera called from an atexit handler (after tessera's own trace flush), from pthread TLS-key
/// destructors (after the thread's thread_local destructors) and from a destructor function: every
/// call returns its value or error code, nothing crashes or aborts, and the trace file written
/// with `TESSERA_TRACE` stays well-formed, holding every event, those made during exit included.
#[test]
fn c_teardown_test_calls_tessera_during_exit_and_thread_teardown() {
    let exe = teardown_test();
    let trace = fresh_trace_path("teardown.trace");
    let sim = "devices:1,capacity:64MiB,granularity:2MiB";
    let (status, stdout, stderr) =
        run_on_sim_with(Command::new(exe), exe, sim, &[("TESSERA_TRACE", &trace)]);
    let context = format!("--- stdout:\n{stdout}\n--- stderr:\n{stderr}");
    assert!(
        status.success() && stdout.contains("teardown_test: OK"),
        "{} failed ({status}) on TESSERA_SIM={sim}, library {}\n{context}",
        exe.display(),
        library().display(),
    );
    // Each stage ran, in the order glibc promises (the program checks the order itself).
    let stages = [
        "(b) TLS-key destructor, thread that used tessera",
        "(b) TLS-key destructor, thread that never used tessera",
        "(a) atexit handler",
        "(c) destructor function",
    ];
    let mut at = 0;
    for stage in stages {
        let found = stdout[at..]
            .find(&format!("stage '{stage}"))
            .unwrap_or_else(|| {
                panic!("stage {stage:?} did not report, or out of order\n{context}")
            });
        at += found + 1;
    }
    // stderr: one line per refused free (one per stage), nothing else: no panic, no abort.
    let lines: Vec<&str> = stderr.lines().collect();
    assert!(
        lines.len() == stages.len()
            && lines
                .iter()
                .all(|l| l.starts_with("tessera: tessera_free(") && l.contains("unknown pointer")),
        "stderr should hold exactly one refused-free line per stage\n{context}"
    );

    // The trace: whole lines, parsed by the replay reader without error or problem, holding the
    // events made before exit and during it (after its exit-time flush tessera writes each line
    // at once).
    let text = std::fs::read_to_string(&trace)
        .unwrap_or_else(|e| panic!("reading the trace {}: {e}\n{context}", trace.display()));
    assert!(
        text.ends_with('\n'),
        "the trace ends inside a line:\n{text}"
    );
    let parsed = tessera_core::replay::trace::load(&trace, 0)
        .unwrap_or_else(|e| panic!("the trace is malformed: {e}\n{text}"));
    assert!(
        parsed.problems.is_empty(),
        "the trace has problems: {:?}\n{text}",
        parsed.problems
    );
    assert!(
        parsed
            .meta
            .as_ref()
            .is_some_and(|m| m["format"] == "tessera-trace"),
        "the trace lacks its metadata line:\n{text}"
    );
    let (allocs, frees) = parsed.events.iter().fold((0, 0), |(a, f), e| match e.op {
        tessera_core::replay::trace::Op::Alloc { .. } => (a + 1, f),
        tessera_core::replay::trace::Op::Free { .. } => (a, f + 1),
    });
    let want = format!("and {allocs} and {frees} in all)");
    assert!(
        stdout.contains(&want),
        "the trace holds {allocs} allocations and {frees} frees; the program says otherwise\n{context}"
    );
    print!("{stdout}");
}

/// The harness sees a failing teardown_test: on a device too small for the blocks it keeps
/// for its teardown stages, it must report the failures and exit 1, not 0 and not by a signal.
#[test]
fn a_failing_teardown_check_fails_the_program() {
    let exe = teardown_test();
    let trace = fresh_trace_path("teardown-failing.trace");
    let (status, stdout, stderr) = run_on_sim_with(
        Command::new(exe),
        exe,
        "devices:1,capacity:8MiB,granularity:2MiB",
        &[("TESSERA_TRACE", &trace)],
    );
    assert_eq!(
        status.code(),
        Some(1),
        "teardown_test on an 8 MiB device should fail with status 1\n--- stdout:\n{stdout}\n--- stderr:\n{stderr}"
    );
    assert!(
        stderr.contains("teardown_test: FAIL in stage 'main'")
            && stderr.contains("no live block to free")
            && !stdout.contains("teardown_test: OK"),
        "the failure message does not say what failed:\n{stdout}\n{stderr}"
    );
}

/// valgrind, from `VALGRIND` or PATH; `None` when there is none.
fn valgrind() -> Option<PathBuf> {
    if let Some(v) = std::env::var_os("VALGRIND") {
        return Some(PathBuf::from(v));
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("valgrind"))
            .find(|p| p.is_file())
    })
}

/// The arguments every memcheck run gets: any error, and any definitely or indirectly lost block,
/// makes valgrind exit with status 99. (Possibly lost and still reachable blocks are the
/// allocator's own state, kept alive by its statics until the process ends, as designed.)
/// `--track-origins=yes` would double the run time; to find where an uninitialised value came
/// from, rerun with `VALGRIND_OPTS=--track-origins=yes` (valgrind reads it itself).
const VALGRIND_ARGS: [&str; 5] = [
    "--tool=memcheck",
    "--error-exitcode=99",
    "--leak-check=full",
    "--errors-for-leak-kinds=definite,indirect",
    "--show-leak-kinds=definite,indirect",
];

/// The summary lines of a valgrind run's stderr (its own lines start with `==pid==`).
fn valgrind_summary(stderr: &str) -> Vec<String> {
    stderr
        .lines()
        .filter(|l| l.starts_with("=="))
        .filter(|l| {
            [
                "ERROR SUMMARY",
                "definitely lost:",
                "indirectly lost:",
                "possibly lost:",
                "still reachable:",
                "All heap blocks were freed",
            ]
            .iter()
            .any(|k| l.contains(k))
        })
        .map(|l| {
            l.split_once("== ")
                .map_or(l, |(_, rest)| rest)
                .trim()
                .to_string()
        })
        .collect()
}

/// Runs `exe` under memcheck and checks it: the program's own OK line, exit status 0 (99 is
/// valgrind's: an error or a leak), and a summary with no error and nothing definitely or
/// indirectly lost. Returns the summary and the time taken.
fn memcheck(
    valgrind: &Path,
    exe: &Path,
    sim: &str,
    env: &[(&str, &Path)],
    ok_line: &str,
) -> (Vec<String>, Duration) {
    let mut cmd = Command::new(valgrind);
    cmd.args(VALGRIND_ARGS);
    let supp = repo_root().join("tests/c/valgrind.supp");
    if supp.is_file() {
        cmd.arg(format!("--suppressions={}", supp.display()));
    }
    cmd.arg(exe);
    let start = Instant::now();
    let (status, stdout, stderr) = run_on_sim_with(cmd, exe, sim, env);
    let took = start.elapsed();
    let summary = valgrind_summary(&stderr);
    let context = format!(
        "{} under valgrind: {status}\n--- stdout:\n{stdout}\n--- stderr:\n{stderr}",
        exe.display()
    );
    assert_ne!(
        status.code(),
        Some(99),
        "valgrind found invalid accesses or leaks\n{context}"
    );
    assert!(
        status.success() && stdout.contains(ok_line),
        "the program failed under valgrind\n{context}"
    );
    assert!(
        summary
            .iter()
            .any(|l| l.starts_with("ERROR SUMMARY: 0 errors")),
        "no clean ERROR SUMMARY line\n{context}"
    );
    let clean_heap = summary
        .iter()
        .any(|l| l.starts_with("All heap blocks were freed"))
        || (summary
            .iter()
            .any(|l| l.starts_with("definitely lost: 0 bytes in 0 blocks"))
            && summary
                .iter()
                .any(|l| l.starts_with("indirectly lost: 0 bytes in 0 blocks")));
    assert!(clean_heap, "no clean leak summary\n{context}");
    (summary, took)
}

#[test]
fn valgrind_memcheck_finds_nothing_in_the_c_programs() {
    let Some(valgrind) = valgrind() else {
        assert!(
            std::env::var("TESSERA_REQUIRE_VALGRIND").as_deref() != Ok("1"),
            "TESSERA_REQUIRE_VALGRIND=1 but valgrind is not on PATH (set VALGRIND=/path/to/valgrind, \
             or apt-get install valgrind)"
        );
        println!(
            "SKIPPED: valgrind_memcheck_finds_nothing_in_the_c_programs: valgrind not found on PATH \
             (TESSERA_REQUIRE_VALGRIND=1 makes this a failure)"
        );
        return;
    };
    // Compile (and build the library) before the clock starts, and run them at once.
    let (abi, teardown, graphs) = (abi_test(), teardown_test(), graph_hooks_test());
    let trace = fresh_trace_path("teardown-valgrind.trace");
    let teardown_run = std::thread::scope(|scope| {
        let t = scope.spawn(|| {
            memcheck(
                &valgrind,
                teardown,
                "devices:1,capacity:64MiB,granularity:2MiB",
                &[("TESSERA_TRACE", &trace)],
                "teardown_test: OK",
            )
        });
        // The std::function filters handed over and destroyed across the boundary.
        let g = scope.spawn(|| memcheck(&valgrind, graphs, SIM, &[], "graph_hooks_test: OK"));
        let abi_run = memcheck(&valgrind, abi, SIM, &[], "abi_test: OK");
        (abi_run, t.join(), g.join())
    });
    let (abi_run, teardown_run, graphs_run) = teardown_run;
    let teardown_run = teardown_run.unwrap_or_else(|e| std::panic::resume_unwind(e));
    let graphs_run = graphs_run.unwrap_or_else(|e| std::panic::resume_unwind(e));
    for (name, (summary, took)) in [
        ("abi_test", abi_run),
        ("teardown_test", teardown_run),
        ("graph_hooks_test", graphs_run),
    ] {
        println!(
            "valgrind {name} ({:.1} s): {}",
            took.as_secs_f64(),
            summary.join(" | ")
        );
    }
}
