//! tessera from Rust in a few lines: an allocator, typed device buffers, copies, stats.
//!
//! Runs anywhere: on a simulated 1 GiB GPU by default, on a real one with `TESSERA_DRIVER=cuda`.
//!
//! Run: `cargo run --example quickstart` (or `TESSERA_DRIVER=cuda cargo run --example quickstart`).

use std::sync::Arc;
use tessera::bytes::format_bytes;
use tessera::driver::sim::{SimConfig, SimDriver};
use tessera::driver::{Driver, Stream};
use tessera::{Config, DeviceBuffer, Tessera};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // The driver: `TESSERA_DRIVER` (cuda or sim) when set, else a simulated 1 GiB device.
    let driver: Arc<dyn Driver> = if std::env::var_os("TESSERA_DRIVER").is_some() {
        tessera::global::driver_from_env()?
    } else {
        Arc::new(SimDriver::new(SimConfig {
            capacity: 1 << 30,
            ..SimConfig::default()
        }))
    };
    // The allocator (configured by `TESSERA_CONF`, if set). `tessera::global()` is the
    // process-wide one; buffers borrow their allocator, so they cannot outlive it.
    let alloc = Tessera::new(driver, Config::from_env()?)?;
    let (device, stream) = (0, Stream::DEFAULT);

    // Buffers: from host data, zeroed, and written later.
    let x = DeviceBuffer::from_slice(&alloc, device, &[1.0f32, 2.0, 3.0, 4.0], stream)?;
    let mut y = DeviceBuffer::<f32>::zeroed(&alloc, device, 4, stream)?;
    println!("y (zeroed)  = {:?}", y.to_vec()?);

    // A kernel would compute on the GPU here (see examples/cudarc_kernel.rs); on the host:
    let host: Vec<f32> = x.to_vec()?.iter().map(|v| 2.0 * v + 1.0).collect();
    y.copy_from_slice(&host)?;
    println!("y = 2x + 1  = {:?}", y.to_vec()?);

    // A large buffer, many pages: 64 MiB of u32.
    let big = DeviceBuffer::from_slice(&alloc, device, &vec![7u32; 16 << 20], stream)?;
    println!(
        "big: {} elements, {} at {:#x}",
        big.len(),
        format_bytes(big.byte_len() as u64),
        big.as_raw()
    );

    let s = alloc.stats(device)?;
    println!(
        "live: {} in {} blocks, {} reserved from the driver",
        format_bytes(s.allocated_bytes),
        s.active_blocks,
        format_bytes(s.reserved_bytes)
    );

    // Dropping a buffer frees it (on its stream); the allocator keeps the memory cached.
    drop((x, y, big));
    let s = alloc.stats(device)?;
    println!(
        "after drop: {} in {} blocks, {} cached",
        format_bytes(s.allocated_bytes),
        s.active_blocks,
        format_bytes(s.cached_free_bytes)
    );
    println!(
        "empty_cache released {}",
        format_bytes(alloc.empty_cache(device)?)
    );
    Ok(())
}
