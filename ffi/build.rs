//! Builds the library's C++: `src/torch_oom.cpp` (the throw behind `tessera_torch_malloc`) and
//! `src/torch_graphs.cpp` (PyTorch's CUDA-graph hooks), and gives the library its SONAME.
fn main() {
    println!("cargo:rerun-if-changed=src/torch_oom.cpp");
    println!("cargo:rerun-if-changed=src/torch_graphs.cpp");
    println!("cargo:rerun-if-changed=../include/tessera.h");
    // A SONAME, so that programs linked to the library record its name rather than its path.
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libtessera.so");
    cc::Build::new()
        .cpp(true)
        .std("c++17")
        .warnings(true)
        .extra_warnings(true)
        .include("../include")
        .file("src/torch_oom.cpp")
        .file("src/torch_graphs.cpp")
        .compile("tessera_torch_cpp");
}
