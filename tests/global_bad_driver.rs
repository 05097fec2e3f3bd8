//! A bad `TESSERA_DRIVER` is a clear configuration error, the same one on every call.

#[test]
fn unknown_driver_is_a_config_error_every_time() {
    std::env::set_var(tessera::global::DRIVER_ENV_VAR, "opencl");
    let first = tessera::global().unwrap_err();
    assert!(matches!(first, tessera::Error::Config(_)), "{first:?}");
    assert!(
        first.to_string().contains("expected cuda or sim"),
        "{first}"
    );
    let again = tessera::global().unwrap_err();
    assert_eq!(first.to_string(), again.to_string());
}
