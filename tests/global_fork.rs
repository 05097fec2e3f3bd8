//! A fork while the process-wide allocator writes a `TESSERA_TRACE`: the child inherits the trace's
//! buffer, and a child that exits flushes it at exit. Without the fork handlers, the parent's
//! buffered lines would be written twice (once by the child, once by the parent), and the child's
//! own events would land in the parent's file under clashing ids. One test in its own binary: it
//! sets environment variables before the allocator is made.

use tessera::driver::Stream;
use tessera::replay::trace;

#[test]
fn a_forked_child_that_exits_does_not_write_the_parents_lines_again() {
    let dir = std::env::temp_dir().join(format!("tessera-fork-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("trace.csv");
    std::env::set_var("TESSERA_DRIVER", "sim");
    std::env::set_var("TESSERA_SIM", "devices:1,capacity:64MiB");
    std::env::set_var("TESSERA_TRACE", &path);
    let t = tessera::global().expect("the process-wide allocator on the simulated device");

    // Buffered, not yet written: a few lines are far below the buffer's size.
    let a: Vec<_> = (1..=5u64)
        .map(|i| t.allocate(0, i * 4096, Stream(1)).unwrap())
        .collect();
    t.free(0, a[0]).unwrap();

    // SAFETY: the child only calls `exit`, which runs the exit handlers (tessera's trace flush
    // among them) in the child's one thread; the parent waits for it.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        // The child's own events are not traced: their ids would clash with the parent's.
        let ok = t
            .allocate(0, 4096, Stream(2))
            .and_then(|p| t.free(0, p))
            .is_ok();
        // SAFETY: ends the child, running its exit handlers; never returns.
        unsafe { libc::exit(if ok { 0 } else { 3 }) };
    }
    let mut status = 0;
    // SAFETY: `pid` is our child; `status` is a valid out-pointer.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0);

    for &p in &a[1..] {
        t.free(0, p).unwrap();
    }
    t.flush_trace();

    let tr = trace::load(&path, 0).expect("a well-formed trace");
    assert!(tr.problems.is_empty(), "{:?}", tr.problems);
    let text = std::fs::read_to_string(&path).unwrap();
    let allocs = text.lines().filter(|l| l.starts_with("a,")).count();
    let frees = text.lines().filter(|l| l.starts_with("f,")).count();
    assert_eq!(
        (allocs, frees),
        (5, 5),
        "the trace must hold the parent's events once each, and no child's:\n{text}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
