//! The committed `include/tessera.h` is what cbindgen makes from `ffi/src` now: an entry point
//! changed without regenerating the header fails here. `TESSERA_BLESS=1` rewrites the header.

use std::path::Path;

#[test]
fn committed_header_matches_a_fresh_one() {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = cbindgen::Config::from_file(crate_dir.join("cbindgen.toml")).unwrap();
    let mut fresh = Vec::new();
    cbindgen::Builder::new()
        .with_crate(crate_dir)
        .with_config(config)
        .generate()
        .expect("cbindgen could not read ffi/src")
        .write(&mut fresh);
    let fresh = String::from_utf8(fresh).unwrap();
    let path = crate_dir.join("../include/tessera.h");
    if std::env::var_os("TESSERA_BLESS").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &fresh).unwrap();
        return;
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == fresh,
        "include/tessera.h differs from what cbindgen makes from ffi/src; \
         run `TESSERA_BLESS=1 cargo test -p tessera-ffi --test header` and commit the result"
    );
}
