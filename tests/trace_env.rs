//! `TESSERA_TRACE`: set before the allocator is made, every allocation and free goes to the file
//! (`%p` replaced by the process id), and the file replays. One test in its own binary: it sets
//! an environment variable, which no other test thread may race.

use std::sync::Arc;
use tessera::driver::sim::{SimConfig, SimDriver};
use tessera::driver::Stream;
use tessera::replay::trace;
use tessera::{Config, Error, Tessera, TRACE_ENV_VAR};

#[test]
fn tessera_trace_names_the_file_every_allocation_goes_to() {
    let dir = std::env::temp_dir().join(format!("tessera-trace-env-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sim = || Arc::new(SimDriver::new(SimConfig::default()));

    // An unopenable file is a configuration error, not a silent loss of the trace.
    std::env::set_var(TRACE_ENV_VAR, dir.join("no/such/folder/t.csv"));
    let e = Tessera::new(sim(), Config::default()).unwrap_err();
    assert!(
        matches!(e, Error::Config(ref m) if m.contains(TRACE_ENV_VAR)),
        "{e}"
    );

    std::env::set_var(TRACE_ENV_VAR, dir.join("run-%p.csv"));
    let t = Tessera::new(sim(), Config::default()).unwrap();
    std::env::remove_var(TRACE_ENV_VAR);
    let ptrs: Vec<_> = (1..=10u64)
        .map(|i| t.allocate(0, i * 1000, Stream(3)).unwrap())
        .collect();
    for p in ptrs.iter().step_by(2) {
        t.free(0, *p).unwrap();
    }
    drop(t); // flushes

    let path = dir.join(format!("run-{}.csv", std::process::id()));
    let tr = trace::load(&path, 0).unwrap();
    assert_eq!(tr.events.len(), 15);
    assert_eq!(tr.streams, vec![3]);
    assert!(tr.problems.is_empty());
    let meta = tr.meta.expect("a metadata line");
    assert_eq!(meta["format"], "tessera-trace");
    let _ = std::fs::remove_dir_all(&dir);
}
