//! A CUDA kernel over tessera buffers, with cudarc: NVRTC compiles a saxpy kernel, cudarc loads
//! and launches it, and tessera allocates the memory it works on.
//!
//! Needs an NVIDIA GPU, its driver and NVRTC (`libnvrtc`). Without them it says so and exits
//! cleanly (status 0).
//!
//! Run: `cargo run --example cudarc_kernel`.

use cudarc::driver::{CudaContext, LaunchConfig, PushKernelArg};
use std::sync::Arc;
use tessera::bytes::format_bytes;
use tessera::driver::cuda::CudaDriver;
use tessera::{Config, CudaBuffer, Tessera};

const SAXPY: &str = r#"
extern "C" __global__ void saxpy(float a, const float *x, float *y, unsigned int n) {
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        y[i] = a * x[i] + y[i];
    }
}
"#;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // cudarc panics when it cannot load libcuda or libnvrtc, so ask first. `CudaDriver::open`
    // checks libcuda and finds the devices, and fails cleanly when there are none.
    let driver = match CudaDriver::open() {
        Ok(d) => d,
        Err(e) => {
            println!("no usable NVIDIA GPU here ({e}); nothing to run");
            return Ok(());
        }
    };
    // SAFETY: only tries to load the NVRTC library by its usual names (and unloads it again).
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        println!("NVRTC (libnvrtc) is not installed; it compiles the kernel, so nothing to run");
        return Ok(());
    }

    // cudarc: the context of GPU 0 (its primary context, the one tessera's driver uses too), a
    // stream, and the kernel compiled at run time.
    let ctx = CudaContext::new(0)?;
    let stream = ctx.default_stream();
    let ptx = cudarc::nvrtc::compile_ptx(SAXPY)?;
    let saxpy = ctx.load_module(ptx)?.load_function("saxpy")?;

    // tessera: the allocator, and buffers on cudarc's stream.
    let alloc = Tessera::new(Arc::new(driver), Config::from_env()?)?;
    let n: u32 = 1 << 20;
    let a = 2.0f32;
    let host_x: Vec<f32> = (0..n).map(|i| i as f32).collect();
    let x = CudaBuffer::from_slice(&alloc, &stream, &host_x)?;
    let mut y = CudaBuffer::<f32>::zeroed(&alloc, &stream, n as usize)?;
    // cudarc's own copies take tessera buffers: y = 1.
    stream.memcpy_htod(&vec![1.0f32; n as usize], &mut y)?;

    let mut launch = stream.launch_builder(&saxpy);
    launch.arg(&a).arg(&x).arg(&mut y).arg(&n);
    // SAFETY: the arguments match the kernel's parameters (float, const float*, float*,
    // unsigned int); `x` and `y` hold `n` floats each on this device, and the kernel touches
    // elements below `n` only, on the buffers' own stream.
    unsafe { launch.launch(LaunchConfig::for_num_elems(n)) }?;

    // Read back with cudarc (ordered after the kernel on the stream), and check.
    let result = stream.clone_dtoh(&y)?;
    let wrong = (0..n as usize)
        .filter(|&i| result[i] != a * host_x[i] + 1.0)
        .count();
    println!(
        "saxpy over {n} elements on {}: y[0..4] = {:?}, {wrong} wrong",
        ctx.name()?,
        &result[..4]
    );
    // tessera's own copy gives the same.
    assert_eq!(y.to_vec()?, result);

    let s = alloc.stats(0)?;
    println!(
        "tessera: {} live in {} blocks, {} reserved",
        format_bytes(s.allocated_bytes),
        s.active_blocks,
        format_bytes(s.reserved_bytes)
    );
    drop((x, y));
    if wrong != 0 {
        return Err(format!("{wrong} results are wrong").into());
    }
    Ok(())
}
