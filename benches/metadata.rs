//! Allocator metadata per live block: the host heap bytes tessera holds for its blocks, divided by
//! the number of live blocks.
//!
//! A `#[global_allocator]` wraps `System` and counts live heap bytes with atomic counters. The
//! simulated driver's own tables (what a real CUDA driver keeps in its own memory) are told apart:
//! the driver is wrapped in a `Driver` that marks its calls, and bytes allocated or freed during a
//! driver call are counted separately. Each case makes a fresh allocator on a simulated device
//! (bookkeeping backing: no device memory behind it), warms it with one allocation and free (so the
//! virtual reservation, sized to the device, is made before counting: a per-device cost, not a
//! per-block one), then allocates N live blocks and reports (heap bytes after - before) / N:
//! - `small`: N = 100 k blocks of log-uniform sizes from 512 B to 1 MiB (every size class);
//! - `large`: N = 10 k blocks, half a random number of pages (1 to 8 pages of 2 MiB), half a random
//!   size between 1 MiB and 16 MiB that is not a page multiple (so blocks split and leave free
//!   tails);
//!
//! for the VMM and the legacy backend. The bytes per page mapped are shown too: a large block spans
//! several pages, and each page has a record of its own.
//!
//! Informs the target of at most 64 B of metadata per live block (reported, not asserted).
//!
//! `cargo bench --bench metadata` (no criterion: it prints a table; `-- large` or `-- vmm` runs the
//! matching cases only). With `--test`, as CI runs it (`cargo bench --bench metadata -- --test`), N
//! is ten times smaller.

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use tessera::driver::sim::{Backing, SimConfig, SimDriver};
use tessera::driver::{
    CaptureInfo, CaptureMode, DevicePtr, Driver, DriverResult, Event, MemInfo, PhysHandle, Stream,
};
use tessera::{Backend, Config, Tessera};

/// Live heap bytes allocated outside driver calls (tessera, and this program).
static LIVE: AtomicI64 = AtomicI64::new(0);
/// Heap allocations made outside driver calls.
static ALLOCS: AtomicU64 = AtomicU64::new(0);
/// Live heap bytes allocated during driver calls (the simulated driver's tables).
static DRIVER_LIVE: AtomicI64 = AtomicI64::new(0);
/// Set while a driver call runs (the benchmark is single-threaded).
static IN_DRIVER: AtomicBool = AtomicBool::new(false);

struct Counting;

impl Counting {
    fn add(bytes: usize, sign: i64) {
        let counter = if IN_DRIVER.load(Relaxed) {
            &DRIVER_LIVE
        } else {
            &LIVE
        };
        counter.fetch_add(sign * bytes as i64, Relaxed);
    }
}

// SAFETY: every call is forwarded to `System` with the same arguments; the counters are atomics.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract is `System`'s.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            Counting::add(layout.size(), 1);
            if !IN_DRIVER.load(Relaxed) {
                ALLOCS.fetch_add(1, Relaxed);
            }
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as above.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            Counting::add(layout.size(), 1);
            if !IN_DRIVER.load(Relaxed) {
                ALLOCS.fetch_add(1, Relaxed);
            }
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) };
        Counting::add(layout.size(), -1);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as above.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            Counting::add(layout.size(), -1);
            Counting::add(new_size, 1);
        }
        p
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// The simulated driver, with its calls marked so that its heap is counted apart.
#[derive(Debug)]
struct Marked(SimDriver);

impl Marked {
    fn call<T>(&self, f: impl FnOnce(&SimDriver) -> T) -> T {
        IN_DRIVER.store(true, Relaxed);
        let r = f(&self.0);
        IN_DRIVER.store(false, Relaxed);
        r
    }
}

impl Driver for Marked {
    fn name(&self) -> &'static str {
        self.0.name()
    }
    fn device_count(&self) -> DriverResult<usize> {
        self.call(|d| d.device_count())
    }
    fn supports_vmm(&self, device: usize) -> DriverResult<bool> {
        self.call(|d| d.supports_vmm(device))
    }
    fn granularity(&self, device: usize) -> DriverResult<u64> {
        self.call(|d| d.granularity(device))
    }
    fn mem_info(&self, device: usize) -> DriverResult<MemInfo> {
        self.call(|d| d.mem_info(device))
    }
    fn bytes_in_use(&self, device: usize) -> u64 {
        self.call(|d| d.bytes_in_use(device))
    }
    fn alloc_legacy(&self, device: usize, size: u64) -> DriverResult<DevicePtr> {
        self.call(|d| d.alloc_legacy(device, size))
    }
    fn free_legacy(&self, device: usize, ptr: DevicePtr) -> DriverResult<()> {
        self.call(|d| d.free_legacy(device, ptr))
    }
    fn reserve(&self, device: usize, size: u64, align: u64) -> DriverResult<DevicePtr> {
        self.call(|d| d.reserve(device, size, align))
    }
    fn free_reservation(&self, device: usize, va: DevicePtr, size: u64) -> DriverResult<()> {
        self.call(|d| d.free_reservation(device, va, size))
    }
    fn create_physical(&self, device: usize, size: u64) -> DriverResult<PhysHandle> {
        self.call(|d| d.create_physical(device, size))
    }
    fn release_physical(&self, device: usize, handle: PhysHandle) -> DriverResult<()> {
        self.call(|d| d.release_physical(device, handle))
    }
    fn map(&self, device: usize, va: DevicePtr, size: u64, handle: PhysHandle) -> DriverResult<()> {
        self.call(|d| d.map(device, va, size, handle))
    }
    fn unmap(&self, device: usize, va: DevicePtr, size: u64) -> DriverResult<()> {
        self.call(|d| d.unmap(device, va, size))
    }
    fn set_access(&self, device: usize, va: DevicePtr, size: u64) -> DriverResult<()> {
        self.call(|d| d.set_access(device, va, size))
    }
    fn event_create(&self, device: usize) -> DriverResult<Event> {
        self.call(|d| d.event_create(device))
    }
    fn event_record(&self, device: usize, event: Event, stream: Stream) -> DriverResult<()> {
        self.call(|d| d.event_record(device, event, stream))
    }
    fn event_query(&self, device: usize, event: Event) -> DriverResult<bool> {
        self.call(|d| d.event_query(device, event))
    }
    fn event_synchronize(&self, device: usize, event: Event) -> DriverResult<()> {
        self.call(|d| d.event_synchronize(device, event))
    }
    fn event_destroy(&self, device: usize, event: Event) -> DriverResult<()> {
        self.call(|d| d.event_destroy(device, event))
    }
    fn stream_wait_event(&self, device: usize, stream: Stream, event: Event) -> DriverResult<()> {
        self.call(|d| d.stream_wait_event(device, stream, event))
    }
    fn stream_synchronize(&self, device: usize, stream: Stream) -> DriverResult<()> {
        self.call(|d| d.stream_synchronize(device, stream))
    }
    fn device_synchronize(&self, device: usize) -> DriverResult<()> {
        self.call(|d| d.device_synchronize(device))
    }
    fn stream_begin_capture(
        &self,
        device: usize,
        stream: Stream,
        mode: CaptureMode,
    ) -> DriverResult<()> {
        self.call(|d| d.stream_begin_capture(device, stream, mode))
    }
    fn stream_end_capture(&self, device: usize, stream: Stream) -> DriverResult<()> {
        self.call(|d| d.stream_end_capture(device, stream))
    }
    fn stream_capture_info(&self, device: usize, stream: Stream) -> DriverResult<CaptureInfo> {
        self.call(|d| d.stream_capture_info(device, stream))
    }
    fn exchange_capture_mode(&self, mode: CaptureMode) -> DriverResult<CaptureMode> {
        self.call(|d| d.exchange_capture_mode(mode))
    }
    fn copy_to_device(
        &self,
        device: usize,
        dst: DevicePtr,
        src: &[u8],
        stream: Stream,
    ) -> DriverResult<()> {
        self.call(|d| d.copy_to_device(device, dst, src, stream))
    }
    fn copy_from_device(
        &self,
        device: usize,
        dst: &mut [u8],
        src: DevicePtr,
        stream: Stream,
    ) -> DriverResult<()> {
        self.call(|d| d.copy_from_device(device, dst, src, stream))
    }
    fn memset(
        &self,
        device: usize,
        dst: DevicePtr,
        value: u8,
        bytes: u64,
        stream: Stream,
    ) -> DriverResult<()> {
        self.call(|d| d.memset(device, dst, value, bytes, stream))
    }
}

const PAGE: u64 = 2 << 20;

/// The sizes of one case, from a fixed seed.
fn sizes(large: bool, n: usize) -> Vec<u64> {
    let mut rng = SmallRng::seed_from_u64(if large { 2 } else { 1 });
    (0..n)
        .map(|_| {
            if !large {
                let u: f64 = rng.random();
                ((512.0 * 2048f64.powf(u)) as u64).clamp(512, 1 << 20)
            } else if rng.random_bool(0.5) {
                rng.random_range(1..=8) * PAGE
            } else {
                loop {
                    let s = rng.random_range((1 << 20) + 1..16 << 20);
                    if s % PAGE != 0 {
                        break s;
                    }
                }
            }
        })
        .collect()
}

struct Row {
    case: &'static str,
    backend: Backend,
    blocks: usize,
    bytes: i64,
    allocs: u64,
    driver_bytes: i64,
    pages: u64,
    segments: u64,
    leftover: i64,
}

fn measure(case: &'static str, backend: Backend, n: usize) -> Row {
    let large = case == "large";
    let sizes = sizes(large, n);
    let mut ptrs: Vec<DevicePtr> = Vec::with_capacity(n);
    let sim = SimDriver::new(SimConfig {
        capacity: 256 << 30,
        granularity: PAGE,
        backing: Backing::Bookkeeping,
        ..SimConfig::default()
    });
    let config = Config::builder()
        .backend(backend)
        .check_invariants(false)
        .build()
        .unwrap();
    let t = Tessera::untraced(Arc::new(Marked(sim)), config).unwrap();
    let s = Stream::DEFAULT;
    // The reservation and the device's tables are made here, before counting.
    t.free(0, t.allocate(0, sizes[0], s).unwrap()).unwrap();
    let stats = t.stats(0).unwrap();
    drop(stats);

    let (live0, allocs0, drv0) = (
        LIVE.load(Relaxed),
        ALLOCS.load(Relaxed),
        DRIVER_LIVE.load(Relaxed),
    );
    for &size in &sizes {
        ptrs.push(t.allocate(0, size, s).unwrap());
    }
    let (live1, allocs1, drv1) = (
        LIVE.load(Relaxed),
        ALLOCS.load(Relaxed),
        DRIVER_LIVE.load(Relaxed),
    );

    let stats = t.stats(0).unwrap();
    let (pages, segments) = (stats.mapped_pages, stats.segments);
    drop(stats);
    for p in ptrs.drain(..) {
        t.free(0, p).unwrap();
    }
    let leftover = LIVE.load(Relaxed) - live0;
    Row {
        case,
        backend,
        blocks: n,
        bytes: live1 - live0,
        allocs: allocs1 - allocs0,
        driver_bytes: drv1 - drv0,
        pages,
        segments,
        leftover,
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--test");
    // Other words filter the cases, as criterion's do: `metadata large`, `metadata legacy`.
    let filters: Vec<&String> = args.iter().filter(|a| !a.starts_with('-')).collect();
    let scale = if quick { 10 } else { 1 };
    let cases = [
        ("small", Backend::Vmm, 100_000),
        ("large", Backend::Vmm, 10_000),
        ("small", Backend::Legacy, 100_000),
        ("large", Backend::Legacy, 10_000),
    ];
    let rows: Vec<Row> = cases
        .into_iter()
        .filter(|(case, backend, _)| {
            let name = format!("{case}/{}", backend.name());
            filters.is_empty() || filters.iter().any(|f| name.contains(f.as_str()))
        })
        .map(|(case, backend, n)| measure(case, backend, n / scale))
        .collect();
    println!(
        "metadata per live block{} (target: at most 64 B per block)",
        if quick { " (--test: N / 10)" } else { "" }
    );
    println!(
        "{:<6} {:<7} {:>7} {:>12} {:>9} {:>9} {:>8} {:>10} {:>9} {:>15} {:>14}",
        "case",
        "backend",
        "blocks",
        "heap bytes",
        "B/block",
        "allocs/bl",
        "pages",
        "B/page",
        "segments",
        "driver B/block",
        "kept after free"
    );
    for r in &rows {
        let per_page = if r.pages > 0 {
            format!("{:.1}", r.bytes as f64 / r.pages as f64)
        } else {
            "-".into()
        };
        println!(
            "{:<6} {:<7} {:>7} {:>12} {:>9.1} {:>9.3} {:>8} {:>10} {:>9} {:>15.1} {:>14}",
            r.case,
            r.backend.name(),
            r.blocks,
            r.bytes,
            r.bytes as f64 / r.blocks as f64,
            r.allocs as f64 / r.blocks as f64,
            r.pages,
            per_page,
            r.segments,
            r.driver_bytes as f64 / r.blocks as f64,
            r.leftover
        );
    }
}
