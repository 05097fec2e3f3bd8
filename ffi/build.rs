//! Builds `src/torch_oom.cpp` (the C++ throw behind `tessera_torch_malloc`) into the library and
//! gives the library its SONAME.
fn main() {
    println!("cargo:rerun-if-changed=src/torch_oom.cpp");
    // A SONAME, so that programs linked to the library record its name rather than its path.
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libtessera.so");
    cc::Build::new()
        .cpp(true)
        .std("c++17")
        .warnings(true)
        .extra_warnings(true)
        .file("src/torch_oom.cpp")
        .compile("tessera_torch_oom");
}
