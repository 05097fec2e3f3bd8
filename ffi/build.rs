//! Builds `src/torch_oom.cpp` (the C++ throw behind `tessera_torch_malloc`) into the library.
fn main() {
    println!("cargo:rerun-if-changed=src/torch_oom.cpp");
    cc::Build::new()
        .cpp(true)
        .std("c++17")
        .warnings(true)
        .extra_warnings(true)
        .file("src/torch_oom.cpp")
        .compile("tessera_torch_oom");
}
