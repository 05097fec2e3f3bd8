//! The process-wide allocator: made once from the environment and the pending configuration,
//! configurable only before it exists. (One test: the allocator is per process.)

use tessera::driver::Stream;
use tessera::{configure_global, global, Config};

#[test]
fn global_is_made_once_from_env_and_pending_config() {
    std::env::set_var(tessera::global::DRIVER_ENV_VAR, "sim");
    std::env::set_var(tessera::global::SIM_ENV_VAR, "devices:2,capacity:256MiB");
    // A bad TESSERA_CONF is not read: the pending configuration replaces it.
    std::env::set_var("TESSERA_CONF", "no_such_key:1");
    assert!(!tessera::global::global_is_created());
    configure_global(Config::parse("limit:64MiB").unwrap()).unwrap();

    let t = global().unwrap();
    assert!(tessera::global::global_is_created());
    assert!(
        std::ptr::eq(t, global().unwrap()),
        "one allocator per process"
    );
    assert_eq!(t.device_count(), 2);
    assert_eq!(t.stats(1).unwrap().limit_bytes, Some(64 << 20));
    let p = t.allocate(1, 1 << 20, Stream::DEFAULT).unwrap();
    t.free(1, p).unwrap();

    let late = configure_global(Config::default()).unwrap_err();
    assert!(late.to_string().contains("already in use"), "{late}");
    assert_eq!(t.stats(1).unwrap().limit_bytes, Some(64 << 20), "unchanged");
}
