//! [`SimConfig`] and [`Backing`]: the simulated machine, and its `key:value` syntax.

use std::collections::HashSet;
use std::fmt;

use super::host;
use crate::bytes::parse_bytes;

/// The most devices a simulated machine may have.
pub const MAX_DEVICES: usize = 1024;

/// Where the simulated device's memory lives.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Backing {
    /// Host memory: device pointers can be read and written once mapped and accessible.
    #[default]
    Real,
    /// No memory at all, only tables and fake addresses: for replaying huge traces.
    Bookkeeping,
}

/// The simulated machine. `Display` prints the [`SimConfig::parse`] syntax.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimConfig {
    /// Number of devices (default 1).
    pub devices: usize,
    /// Bytes of memory per device (default 80 GiB).
    pub capacity: u64,
    /// Allocation granularity, a power of two (default 2 MiB; at least the host page with real backing).
    pub granularity: u64,
    /// Whether the virtual-memory API is supported (default true).
    pub vmm: bool,
    /// Where the memory lives (default [`Backing::Real`]).
    pub backing: Backing,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            devices: 1,
            capacity: 80 << 30,
            granularity: 2 << 20,
            vmm: true,
            backing: Backing::Real,
        }
    }
}

impl SimConfig {
    /// Parses comma-separated `key:value` pairs over the defaults, e.g.
    /// `devices:2,capacity:8GiB,granularity:2MiB,vmm:false,backing:bookkeeping`. Keys are `devices`,
    /// `capacity`, `granularity` (sizes as [`parse_bytes`] reads them), `vmm` (`true`/`false`/`1`/`0`)
    /// and `backing` (`real`/`bookkeeping`). Whitespace and empty items are ignored. An unknown key,
    /// an item without `:`, a repeated key or a bad value is an error naming it.
    pub fn parse(text: &str) -> Result<SimConfig, String> {
        let mut c = SimConfig::default();
        let mut seen = HashSet::new();
        for item in text.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let (key, value) = item
                .split_once(':')
                .map(|(k, v)| (k.trim(), v.trim()))
                .ok_or_else(|| format!("sim config item '{item}' is not key:value"))?;
            if !seen.insert(key) {
                return Err(format!("sim config key '{key}' given twice"));
            }
            let bad = |why: &str| format!("sim config {key}: bad value '{value}' ({why})");
            match key {
                "devices" => c.devices = value.parse().map_err(|_| bad("expected a count"))?,
                "capacity" => c.capacity = parse_bytes(value).map_err(|e| bad(&e))?,
                "granularity" => c.granularity = parse_bytes(value).map_err(|e| bad(&e))?,
                "vmm" => {
                    c.vmm = match value {
                        "true" | "1" => true,
                        "false" | "0" => false,
                        _ => return Err(bad("expected true, false, 1 or 0")),
                    }
                }
                "backing" => {
                    c.backing = match value {
                        "real" => Backing::Real,
                        "bookkeeping" => Backing::Bookkeeping,
                        _ => return Err(bad("expected real or bookkeeping")),
                    }
                }
                _ => {
                    return Err(format!(
                        "sim config: unknown key '{key}' (expected devices, capacity, granularity, vmm or backing)"
                    ))
                }
            }
        }
        match c.problem() {
            Some(p) => Err(format!("sim config: {p}")),
            None => Ok(c),
        }
    }

    /// What makes this configuration unusable, if anything.
    pub(super) fn problem(&self) -> Option<String> {
        if !self.granularity.is_power_of_two() {
            return Some(format!(
                "granularity {} is not a power of two",
                self.granularity
            ));
        }
        if self.devices > MAX_DEVICES {
            return Some(format!(
                "{} devices is more than {MAX_DEVICES}",
                self.devices
            ));
        }
        let page = host::page_size();
        if self.backing == Backing::Real && self.granularity < page {
            return Some(format!(
                "granularity {} is below the host page size {page} (needed with real backing)",
                self.granularity
            ));
        }
        None
    }
}

impl std::str::FromStr for SimConfig {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        SimConfig::parse(s)
    }
}

impl fmt::Display for SimConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let backing = match self.backing {
            Backing::Real => "real",
            Backing::Bookkeeping => "bookkeeping",
        };
        write!(
            f,
            "devices:{},capacity:{}B,granularity:{}B,vmm:{},backing:{backing}",
            self.devices, self.capacity, self.granularity, self.vmm
        )
    }
}
