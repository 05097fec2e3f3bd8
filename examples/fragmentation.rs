//! The defragmentation core in one run, on a simulated GPU (no GPU needed):
//!
//! fill a device with blocks (two to a segment), free every other one (half the device free, in holes no larger than
//! one block), then ask for one large block. tessera's VMM backend remaps the fully free pages into
//! a contiguous range and succeeds; the legacy backend (`cuMemAlloc` segments, PyTorch's model)
//! cannot, and its OOM error says why.
//!
//! Run: `cargo run --release --example fragmentation [-- CAPACITY BLOCK]` (defaults: 8GiB 6MiB).

use std::sync::Arc;
use tessera::bytes::{format_bytes, parse_bytes};
use tessera::driver::sim::{SimConfig, SimDriver};
use tessera::driver::Stream;
use tessera::{Backend, Config, Tessera};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let capacity = parse_bytes(args.first().map_or("8GiB", String::as_str))?;
    let block = parse_bytes(args.get(1).map_or("6MiB", String::as_str))?;
    println!(
        "simulated device: {}, blocks of {}, every other one freed, then one request for half the device\n",
        format_bytes(capacity),
        format_bytes(block)
    );
    for backend in [Backend::Vmm, Backend::Legacy] {
        run(backend, capacity, block)?;
    }
    Ok(())
}

fn run(backend: Backend, capacity: u64, block: u64) -> Result<(), Box<dyn std::error::Error>> {
    let sim = Arc::new(SimDriver::new(SimConfig {
        capacity,
        ..SimConfig::default()
    }));
    let alloc = Tessera::new(sim, Config::builder().backend(backend).build()?)?;
    let s = Stream::DEFAULT;
    // Segments of two blocks each (what a training loop leaves behind): fill with double blocks,
    // free them, then fill the cached segments with single blocks.
    let mut doubles = Vec::new();
    while let Ok(p) = alloc.allocate(0, 2 * block, s) {
        doubles.push(p);
    }
    for p in doubles {
        alloc.free(0, p)?;
    }
    let mut live = Vec::new();
    while let Ok(p) = alloc.allocate(0, block, s) {
        live.push(p);
    }
    for p in live.iter().step_by(2) {
        alloc.free(0, *p)?;
    }
    let before = alloc.stats(0)?;
    let want = capacity / 2 - capacity / 16;
    let result = alloc.allocate(0, want, s);
    let after = alloc.stats(0)?;
    println!("{backend:?} backend:");
    println!(
        "  {} blocks live, {} free in {} holes; largest free range {}, stranded {}",
        live.len() / 2,
        format_bytes(before.reserved_bytes - before.allocated_bytes),
        live.len().div_ceil(2),
        format_bytes(before.largest_free_bytes),
        format_bytes(before.stranded_bytes)
    );
    match result {
        Ok(_) => println!(
            "  request for {}: served, {} pages remapped, reserved {} -> {}\n",
            format_bytes(want),
            after.remaps - before.remaps,
            format_bytes(before.reserved_bytes),
            format_bytes(after.reserved_bytes)
        ),
        Err(e) => println!("  request for {}: failed\n  {e}\n", format_bytes(want)),
    }
    Ok(())
}
