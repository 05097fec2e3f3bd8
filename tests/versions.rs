//! One version number: `[workspace.package] version` in the root Cargo.toml. Every crate inherits
//! it, the `tessera` dependency the other crates name pins it (cargo needs a version there to
//! publish), and the Python wheel reads it (setup.py), so all of them must agree.

use std::path::Path;

fn manifest(path: &str) -> toml::Table {
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    let text = std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    text.parse()
        .unwrap_or_else(|e| panic!("{}: {e}", file.display()))
}

fn get<'a>(table: &'a toml::Table, keys: &[&str]) -> &'a toml::Value {
    let mut value = table
        .get(keys[0])
        .unwrap_or_else(|| panic!("no {}", keys[0]));
    for key in &keys[1..] {
        value = value
            .get(key)
            .unwrap_or_else(|| panic!("no {} in {keys:?}", key));
    }
    value
}

#[test]
fn every_crate_and_the_pinned_dependency_use_the_workspace_version() {
    let root = manifest("Cargo.toml");
    let version = get(&root, &["workspace", "package", "version"])
        .as_str()
        .expect("a string");
    assert_eq!(version, env!("CARGO_PKG_VERSION"));
    // The wheel's metadata writes the version the way PEP 440 normalizes it: a semver pre-release
    // (`0.2.0-alpha.1`) would read `0.2.0a1` there and differ from `tessera.__version__` and the
    // library's. Plain MAJOR.MINOR.PATCH reads the same in both.
    let parts: Vec<&str> = version.split('.').collect();
    assert!(
        parts.len() == 3
            && parts
                .iter()
                .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit())),
        "version {version:?} must be MAJOR.MINOR.PATCH, which Cargo and PEP 440 spell alike"
    );
    let pinned = get(&root, &["workspace", "dependencies", "tessera", "version"])
        .as_str()
        .expect("a string");
    assert_eq!(
        pinned,
        format!("={version}"),
        "[workspace.dependencies] tessera must pin [workspace.package] version"
    );
    for path in ["Cargo.toml", "cli/Cargo.toml", "ffi/Cargo.toml"] {
        let crate_manifest = manifest(path);
        assert_eq!(
            get(&crate_manifest, &["package", "version", "workspace"]).as_bool(),
            Some(true),
            "{path}: the version must be `version.workspace = true`"
        );
    }
}

#[test]
fn the_wheel_takes_its_version_from_cargo_toml() {
    let pyproject = manifest("pyproject.toml");
    let dynamic = get(&pyproject, &["project", "dynamic"])
        .as_array()
        .expect("a list");
    assert!(dynamic.iter().any(|v| v.as_str() == Some("version")));
    // No second number: setup.py supplies it from Cargo.toml (the installed wheel's metadata is
    // checked against it in python/tests/test_package.py).
    assert!(get(&pyproject, &["project"]).get("version").is_none());
}
