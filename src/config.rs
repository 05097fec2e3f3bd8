//! Allocator configuration: a builder, and the `TESSERA_CONF` environment variable.
//!
//! (The `TESSERA_CONF` parser is being written; this file defines the shape the core uses.)

use crate::error::{Error, Result};

/// Which memory the allocator builds its pools from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Backend {
    /// The CUDA virtual-memory API: physical pages mapped into reserved virtual ranges, remappable.
    #[default]
    Vmm,
    /// `cuMemAlloc` segments: the same pools, no remapping (for drivers without VMM, or by choice).
    Legacy,
}

/// The configuration of one allocator (every device it manages uses the same settings).
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub backend: Backend,
    /// Page size: a multiple of the driver's granularity. `None`: the granularity (2 MiB on current GPUs).
    pub page_size: Option<u64>,
    /// A byte limit on reserved memory per device. `None`: no limit but the device.
    pub limit: Option<u64>,
    /// A limit as a fraction of each device's total memory, in (0, 1]. The smaller of this and
    /// `limit` applies.
    pub memory_fraction: Option<f64>,
    /// Requests of at most this many bytes (after rounding) are small: served from size classes.
    pub small_max: u64,
    /// Size classes per doubling of the slot size (class spacing) above 2 KiB.
    pub classes_per_doubling: u32,
    /// Run `check_invariants()` after every mutation (slow; on by default in debug builds).
    pub check_invariants: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            backend: Backend::Vmm,
            page_size: None,
            limit: None,
            memory_fraction: None,
            small_max: 1 << 20,
            classes_per_doubling: 4,
            check_invariants: cfg!(debug_assertions),
        }
    }
}

impl Config {
    /// A builder starting from the defaults.
    pub fn builder() -> ConfigBuilder {
        ConfigBuilder(Config::default())
    }

    /// Checks the values that do not depend on the device.
    pub fn validate(&self) -> Result<()> {
        if let Some(f) = self.memory_fraction {
            if !(f > 0.0 && f <= 1.0) {
                return Err(Error::Config(format!("memory_fraction {f} is not in (0, 1]")));
            }
        }
        if self.small_max < 512 {
            return Err(Error::Config(format!("small_max {} is below 512 B", self.small_max)));
        }
        if !(1..=16).contains(&self.classes_per_doubling) {
            return Err(Error::Config(format!(
                "size_classes {} is not in 1..=16",
                self.classes_per_doubling
            )));
        }
        Ok(())
    }
}

/// Builds a [`Config`].
#[derive(Clone, Debug, Default)]
pub struct ConfigBuilder(Config);

impl ConfigBuilder {
    pub fn backend(mut self, backend: Backend) -> Self {
        self.0.backend = backend;
        self
    }
    pub fn page_size(mut self, bytes: u64) -> Self {
        self.0.page_size = Some(bytes);
        self
    }
    pub fn limit(mut self, bytes: u64) -> Self {
        self.0.limit = Some(bytes);
        self
    }
    pub fn memory_fraction(mut self, fraction: f64) -> Self {
        self.0.memory_fraction = Some(fraction);
        self
    }
    pub fn small_max(mut self, bytes: u64) -> Self {
        self.0.small_max = bytes;
        self
    }
    pub fn classes_per_doubling(mut self, n: u32) -> Self {
        self.0.classes_per_doubling = n;
        self
    }
    pub fn check_invariants(mut self, on: bool) -> Self {
        self.0.check_invariants = on;
        self
    }
    pub fn build(self) -> Result<Config> {
        self.0.validate()?;
        Ok(self.0)
    }
}
