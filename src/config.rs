//! Allocator configuration: a [`Config`] value, a [`ConfigBuilder`], and the `TESSERA_CONF`
//! environment variable.
//!
//! # The data
//! A [`Config`] is a plain value, copied into the allocator when it is created; every device the
//! allocator manages uses the same settings. Settings that depend on the device (a page size that
//! must be a multiple of the driver's granularity, a fraction of the device's memory) are stored as
//! written and resolved when the device is first used; [`Config::validate`] checks everything that
//! does not depend on a device. Both [`ConfigBuilder::build`] and [`Config::parse`] call it.
//!
//! # The keys
//! | key                | value                                   | default                          |
//! |--------------------|-----------------------------------------|----------------------------------|
//! | `backend`          | `vmm` or `legacy`                       | `vmm`                            |
//! | `page_size`        | a size, positive                        | the driver's granularity (2 MiB) |
//! | `limit`            | a size: bytes reserved per device, max  | none (the device)                |
//! | `memory_fraction`  | a number in (0, 1]: share of the device | none                             |
//! | `small_max`        | a size, at least 512 B                  | `64KiB`                          |
//! | `size_classes`     | classes per doubling, integer 1..=16    | `4`                              |
//! | `placement`        | `lifetime` or `best_fit`                | `lifetime`                       |
//! | `thread_cache`     | a size: free bytes one thread may hold  | `32MiB` (`0`: no thread caches)  |
//! | `check_invariants` | `true`, `false`, `1` or `0`             | on in debug builds, else off     |
//!
//! `size_classes` is the field [`Config::classes_per_doubling`]. When both `limit` and
//! `memory_fraction` are set, the smaller of the two limits applies.
//!
//! # The syntax
//! `TESSERA_CONF` takes comma-separated `key:value` pairs, as `PYTORCH_CUDA_ALLOC_CONF` does:
//!
//! ```text
//! TESSERA_CONF="backend:vmm,limit:8GiB,small_max:512KiB,check_invariants:false"
//! ```
//!
//! Parsing starts from [`Config::default`] and overrides the keys given. Whitespace around items,
//! keys and values is ignored, and so are empty items (a trailing comma); an empty string gives the
//! defaults. Sizes are a number with an optional unit, `B`, `KiB`, `MiB`, `GiB`, `TiB` (`KB`, `MB`,
//! ... are read as binary units, as PyTorch reads them; see [`crate::bytes::parse_bytes`]). Keys and
//! `backend`/`check_invariants` values are case-sensitive, lowercase. An unknown key, an item without
//! `:`, a key given twice, or a bad value is an [`Error::Config`] whose message names the key and the
//! value. [`Config`]'s `Display` prints this syntax back, so `Config::parse(&c.to_string())` gives `c`
//! again.

use crate::bytes::{format_bytes_exact, parse_bytes};
use crate::error::{Error, Result};
use std::fmt;
use std::str::FromStr;

/// The environment variable [`Config::from_env`] reads.
pub const ENV_VAR: &str = "TESSERA_CONF";

/// The keys of `TESSERA_CONF`, in the order `Display` prints them.
pub const KEYS: [&str; 9] = [
    "backend",
    "page_size",
    "limit",
    "memory_fraction",
    "small_max",
    "size_classes",
    "placement",
    "thread_cache",
    "check_invariants",
];

/// The smallest `small_max` accepted: one rounding unit.
const SMALL_MAX_MIN: u64 = 512;
/// The accepted range of `classes_per_doubling` (`size_classes`).
const CLASSES_PER_DOUBLING: std::ops::RangeInclusive<u32> = 1..=16;

/// Which memory the allocator builds its pools from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Backend {
    /// The CUDA virtual-memory API: physical pages mapped into reserved virtual ranges, remappable.
    #[default]
    Vmm,
    /// `cuMemAlloc` segments: the same pools, no remapping (for drivers without VMM, or by choice).
    Legacy,
}

impl Backend {
    /// The name `TESSERA_CONF` uses: `vmm` or `legacy`.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Vmm => "vmm",
            Backend::Legacy => "legacy",
        }
    }

    /// The backend named `vmm` or `legacy`, if `name` is one of them.
    pub fn from_name(name: &str) -> Option<Backend> {
        match name {
            "vmm" => Some(Backend::Vmm),
            "legacy" => Some(Backend::Legacy),
            _ => None,
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Backend {
    type Err = Error;

    /// Parses `vmm` or `legacy`.
    fn from_str(s: &str) -> Result<Backend> {
        Backend::from_name(s.trim()).ok_or_else(|| {
            Error::Config(format!(
                "bad value '{s}' for key 'backend' (expected vmm or legacy)"
            ))
        })
    }
}

/// Where a large block goes among the free blocks that hold it (see `pool/large.rs`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Placement {
    /// Next to a live block predicted to be freed at about the same time, as learned from the
    /// previous occurrences of the same request (`pool/lifetimes.rs`); the best fit when there is
    /// nothing to go by or the fit is exact.
    #[default]
    Lifetime,
    /// The smallest free block that holds the request, at its start.
    BestFit,
}

impl Placement {
    /// The name `TESSERA_CONF` uses: `lifetime` or `best_fit`.
    pub fn name(self) -> &'static str {
        match self {
            Placement::Lifetime => "lifetime",
            Placement::BestFit => "best_fit",
        }
    }

    /// The placement named `lifetime` or `best_fit`, if `name` is one of them.
    pub fn from_name(name: &str) -> Option<Placement> {
        match name {
            "lifetime" => Some(Placement::Lifetime),
            "best_fit" => Some(Placement::BestFit),
            _ => None,
        }
    }
}

impl fmt::Display for Placement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The configuration of one allocator (every device it manages uses the same settings).
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// Which memory the pools are built from.
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
    /// Where large blocks go among the free blocks that hold them.
    pub placement: Placement,
    /// Free bytes one thread may keep cached per device, off the device lock (`device/tcache.rs`);
    /// blocks larger than a quarter of it are never cached. 0 turns the thread caches off.
    pub thread_cache: u64,
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
            // Chosen on the bundled traces (docs/design-notes.md, "Placement"): above it, the
            // large pool's 512 B best fit reuses the free space that shares pages with live data.
            small_max: 64 << 10,
            classes_per_doubling: 4,
            placement: Placement::Lifetime,
            // docs/design-notes.md, "Thread caches": enough for a hot pair up to 8 MiB and a
            // refill batch of every small class, small beside a GPU.
            thread_cache: 32 << 20,
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
        if self.page_size == Some(0) {
            return Err(Error::Config("page_size 0 is not a page size".into()));
        }
        if let Some(p) = self.page_size.filter(|p| !p.is_power_of_two()) {
            // Pages are aligned to their size; page arithmetic masks addresses with it.
            return Err(Error::Config(format!(
                "page_size {p} is not a power of two (use 2MiB, 4MiB, ...)"
            )));
        }
        if let Some(f) = self.memory_fraction {
            if !fraction_ok(f) {
                return Err(Error::Config(format!(
                    "memory_fraction {f} is not in (0, 1]"
                )));
            }
        }
        if self.small_max < SMALL_MAX_MIN {
            return Err(Error::Config(format!(
                "small_max {} is below {SMALL_MAX_MIN} B",
                self.small_max
            )));
        }
        if !CLASSES_PER_DOUBLING.contains(&self.classes_per_doubling) {
            return Err(Error::Config(format!(
                "size_classes {} is not in 1..=16",
                self.classes_per_doubling
            )));
        }
        Ok(())
    }

    /// Parses the `TESSERA_CONF` syntax (see the [module documentation](self)): comma-separated
    /// `key:value` pairs applied to the defaults, then [`validate`](Config::validate)d.
    ///
    /// ```
    /// # use tessera::config::{Backend, Config};
    /// let c = Config::parse("backend:legacy, limit:8GiB")?;
    /// assert_eq!(c.backend, Backend::Legacy);
    /// assert_eq!(c.limit, Some(8 << 30));
    /// assert!(Config::parse("pagesize:2MiB").is_err());
    /// # Ok::<(), tessera::error::Error>(())
    /// ```
    pub fn parse(conf: &str) -> Result<Config> {
        let mut config = Config::default();
        let mut seen: Vec<&str> = Vec::new();
        for item in conf.split(',') {
            let item = item.trim();
            if item.is_empty() {
                continue;
            }
            let Some((key, value)) = item.split_once(':') else {
                return Err(Error::Config(format!(
                    "item '{item}' in {ENV_VAR} has no ':' (expected key:value, e.g. limit:8GiB)"
                )));
            };
            let (key, value) = (key.trim(), value.trim());
            let Some(&known) = KEYS.iter().find(|k| **k == key) else {
                return Err(Error::Config(unknown_key(key)));
            };
            if seen.contains(&known) {
                return Err(Error::Config(format!(
                    "key '{key}' is given twice in {ENV_VAR} (second value '{value}')"
                )));
            }
            seen.push(known);
            config.set(known, value).map_err(|reason| {
                Error::Config(format!(
                    "bad value '{value}' for key '{key}' in {ENV_VAR}: {reason}"
                ))
            })?;
        }
        config.validate()?;
        Ok(config)
    }

    /// Reads [`TESSERA_CONF`](ENV_VAR) and [`parse`](Config::parse)s it; unset gives the defaults.
    pub fn from_env() -> Result<Config> {
        Config::from_env_value(std::env::var_os(ENV_VAR))
    }

    fn from_env_value(value: Option<std::ffi::OsString>) -> Result<Config> {
        match value {
            None => Ok(Config::default()),
            Some(v) => match v.into_string() {
                Ok(s) => Config::parse(&s),
                Err(v) => Err(Error::Config(format!(
                    "{ENV_VAR} is not valid UTF-8: {v:?}"
                ))),
            },
        }
    }

    /// Sets one key from its text; the error is the reason only (the caller adds key and value).
    fn set(&mut self, key: &str, value: &str) -> std::result::Result<(), String> {
        match key {
            "backend" => {
                self.backend = Backend::from_name(value).ok_or("expected vmm or legacy")?;
            }
            "page_size" => {
                let b = parse_bytes(value)?;
                if b == 0 {
                    return Err("a page size must be positive".into());
                }
                self.page_size = Some(b);
            }
            "limit" => self.limit = Some(parse_bytes(value)?),
            "memory_fraction" => {
                let f: f64 = value
                    .parse()
                    .map_err(|_| "expected a number in (0, 1], e.g. 0.8".to_string())?;
                if !fraction_ok(f) {
                    return Err("expected a number in (0, 1], e.g. 0.8".into());
                }
                self.memory_fraction = Some(f);
            }
            "small_max" => {
                let b = parse_bytes(value)?;
                if b < SMALL_MAX_MIN {
                    return Err(format!("must be at least {SMALL_MAX_MIN} B"));
                }
                self.small_max = b;
            }
            "size_classes" => {
                let n: u32 = value
                    .parse()
                    .ok()
                    .filter(|n| CLASSES_PER_DOUBLING.contains(n))
                    .ok_or("expected an integer in 1..=16 (classes per doubling)")?;
                self.classes_per_doubling = n;
            }
            "placement" => {
                self.placement =
                    Placement::from_name(value).ok_or("expected lifetime or best_fit")?;
            }
            "thread_cache" => self.thread_cache = parse_bytes(value)?,
            "check_invariants" => {
                self.check_invariants = match value {
                    "true" | "1" => true,
                    "false" | "0" => false,
                    _ => return Err("expected true, false, 1 or 0".into()),
                }
            }
            _ => unreachable!("set() is called with known keys only"),
        }
        Ok(())
    }
}

fn fraction_ok(f: f64) -> bool {
    f > 0.0 && f <= 1.0
}

/// The message for an unknown key, with a suggestion when the key differs from a known one only in
/// case, `-` or `_`.
fn unknown_key(key: &str) -> String {
    let norm = |s: &str| {
        s.chars()
            .filter(|c| *c != '_' && *c != '-')
            .collect::<String>()
            .to_ascii_lowercase()
    };
    let hint = KEYS
        .iter()
        .find(|k| norm(k) == norm(key))
        .map(|k| format!("; did you mean '{k}'?"))
        .unwrap_or_default();
    format!(
        "unknown key '{key}' in {ENV_VAR} (known: {}){hint}",
        KEYS.join(", ")
    )
}

impl fmt::Display for Config {
    /// Prints the `TESSERA_CONF` syntax: every key that has a value (`page_size`, `limit` and
    /// `memory_fraction` are left out when unset, which is their default).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "backend:{}", self.backend)?;
        if let Some(p) = self.page_size {
            write!(f, ",page_size:{}", format_bytes_exact(p))?;
        }
        if let Some(l) = self.limit {
            write!(f, ",limit:{}", format_bytes_exact(l))?;
        }
        if let Some(m) = self.memory_fraction {
            // `{}` on f64 prints the shortest text that parses back to the same value.
            write!(f, ",memory_fraction:{m}")?;
        }
        write!(
            f,
            ",small_max:{},size_classes:{},placement:{},thread_cache:{},check_invariants:{}",
            format_bytes_exact(self.small_max),
            self.classes_per_doubling,
            self.placement,
            format_bytes_exact(self.thread_cache),
            self.check_invariants
        )
    }
}

impl FromStr for Config {
    type Err = Error;

    /// The same as [`Config::parse`].
    fn from_str(s: &str) -> Result<Config> {
        Config::parse(s)
    }
}

/// Builds a [`Config`].
#[derive(Clone, Debug, Default)]
pub struct ConfigBuilder(Config);

impl ConfigBuilder {
    /// Sets [`Config::backend`].
    pub fn backend(mut self, backend: Backend) -> Self {
        self.0.backend = backend;
        self
    }
    /// Sets [`Config::page_size`], in bytes.
    pub fn page_size(mut self, bytes: u64) -> Self {
        self.0.page_size = Some(bytes);
        self
    }
    /// Sets [`Config::limit`], in bytes.
    pub fn limit(mut self, bytes: u64) -> Self {
        self.0.limit = Some(bytes);
        self
    }
    /// Sets [`Config::memory_fraction`].
    pub fn memory_fraction(mut self, fraction: f64) -> Self {
        self.0.memory_fraction = Some(fraction);
        self
    }
    /// Sets [`Config::small_max`], in bytes.
    pub fn small_max(mut self, bytes: u64) -> Self {
        self.0.small_max = bytes;
        self
    }
    /// Sets [`Config::classes_per_doubling`].
    pub fn classes_per_doubling(mut self, n: u32) -> Self {
        self.0.classes_per_doubling = n;
        self
    }
    /// Sets [`Config::placement`].
    pub fn placement(mut self, placement: Placement) -> Self {
        self.0.placement = placement;
        self
    }
    /// Sets [`Config::thread_cache`], in bytes (0: no thread caches).
    pub fn thread_cache(mut self, bytes: u64) -> Self {
        self.0.thread_cache = bytes;
        self
    }
    /// Sets [`Config::check_invariants`].
    pub fn check_invariants(mut self, on: bool) -> Self {
        self.0.check_invariants = on;
        self
    }
    /// The configuration, checked by [`Config::validate`].
    pub fn build(self) -> Result<Config> {
        self.0.validate()?;
        Ok(self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The message of a `Config` error (panics on success or another error).
    fn err(conf: &str) -> String {
        match Config::parse(conf) {
            Err(Error::Config(m)) => m,
            other => panic!("{conf:?}: expected a config error, got {other:?}"),
        }
    }

    /// Asserts that parsing fails with a message naming the key and the value.
    fn rejects(conf: &str, key: &str, value: &str) {
        let m = err(conf);
        assert!(m.contains(&format!("'{key}'")), "{conf:?}: {m}");
        assert!(m.contains(value), "{conf:?}: {m}");
        assert!(m.contains(ENV_VAR), "{conf:?}: {m}");
    }

    #[test]
    fn empty_and_blank_give_defaults() {
        assert_eq!(Config::parse("").unwrap(), Config::default());
        assert_eq!(Config::parse("  ").unwrap(), Config::default());
        assert_eq!(Config::parse(" , ,").unwrap(), Config::default());
        assert_eq!(Config::from_env_value(None).unwrap(), Config::default());
        assert_eq!(
            Config::from_env_value(Some("limit:1GiB".into())).unwrap(),
            Config::builder().limit(1 << 30).build().unwrap()
        );
    }

    #[test]
    fn defaults_are_valid_and_as_documented() {
        let c = Config::default();
        c.validate().unwrap();
        assert_eq!(c.backend, Backend::Vmm);
        assert_eq!(c.page_size, None);
        assert_eq!(c.limit, None);
        assert_eq!(c.memory_fraction, None);
        assert_eq!(c.small_max, 64 << 10);
        assert_eq!(c.classes_per_doubling, 4);
        assert_eq!(c.placement, Placement::Lifetime);
        assert_eq!(c.check_invariants, cfg!(debug_assertions));
    }

    #[test]
    fn every_key() {
        let p = |s: &str| Config::parse(s).unwrap();
        assert_eq!(p("backend:vmm").backend, Backend::Vmm);
        assert_eq!(p("backend:legacy").backend, Backend::Legacy);
        assert_eq!(p("page_size:2MiB").page_size, Some(2 << 20));
        assert_eq!(p("page_size:4194304").page_size, Some(4 << 20));
        assert_eq!(p("limit:8GiB").limit, Some(8 << 30));
        assert_eq!(p("limit:1.5GiB").limit, Some(3 << 29));
        assert_eq!(p("limit:0").limit, Some(0));
        assert_eq!(p("memory_fraction:0.5").memory_fraction, Some(0.5));
        assert_eq!(p("memory_fraction:1").memory_fraction, Some(1.0));
        assert_eq!(p("small_max:512KiB").small_max, 512 << 10);
        assert_eq!(p("small_max:512").small_max, 512);
        assert_eq!(p("size_classes:1").classes_per_doubling, 1);
        assert_eq!(p("size_classes:16").classes_per_doubling, 16);
        assert_eq!(p("placement:best_fit").placement, Placement::BestFit);
        assert_eq!(p("placement:lifetime").placement, Placement::Lifetime);
        assert_eq!(p("thread_cache:0").thread_cache, 0);
        assert_eq!(p("thread_cache:8MiB").thread_cache, 8 << 20);
        for (v, on) in [("true", true), ("1", true), ("false", false), ("0", false)] {
            assert_eq!(p(&format!("check_invariants:{v}")).check_invariants, on);
        }
    }

    #[test]
    fn several_keys_with_whitespace() {
        let c = Config::parse(
            " backend : legacy ,page_size:4MiB,  limit: 8GiB ,memory_fraction:0.75,\
             small_max:256KiB,size_classes:8,check_invariants:false, ",
        )
        .unwrap();
        let want = Config::builder()
            .backend(Backend::Legacy)
            .page_size(4 << 20)
            .limit(8 << 30)
            .memory_fraction(0.75)
            .small_max(256 << 10)
            .classes_per_doubling(8)
            .check_invariants(false)
            .build()
            .unwrap();
        assert_eq!(c, want);
        assert_eq!(c, want.to_string().parse::<Config>().unwrap());
    }

    #[test]
    fn display_round_trips() {
        for c in [
            Config::default(),
            Config::builder().backend(Backend::Legacy).build().unwrap(),
            Config::builder()
                .page_size(8 << 20)
                .limit((8 << 30) + 512)
                .memory_fraction(0.1)
                .small_max(1536)
                .classes_per_doubling(16)
                .check_invariants(true)
                .build()
                .unwrap(),
            Config::builder().limit(0).build().unwrap(),
        ] {
            let text = c.to_string();
            assert_eq!(Config::parse(&text).unwrap(), c, "{text}");
        }
        assert_eq!(
            Config::builder()
                .limit(8 << 30)
                .check_invariants(false)
                .build()
                .unwrap()
                .to_string(),
            "backend:vmm,limit:8GiB,small_max:64KiB,size_classes:4,placement:lifetime,thread_cache:32MiB,check_invariants:false"
        );
    }

    #[test]
    fn unknown_key_is_named_with_the_known_ones() {
        let m = err("pagesize:2MiB");
        assert!(m.contains("unknown key 'pagesize' in TESSERA_CONF"), "{m}");
        for k in KEYS {
            assert!(m.contains(k), "{m}");
        }
        assert!(m.contains("did you mean 'page_size'"), "{m}");
        let m = err("expandable_segments:True");
        assert!(
            m.contains("'expandable_segments'") && !m.contains("did you mean"),
            "{m}"
        );
        // The message comes through the error's Display with its prefix.
        let e = Config::parse("colour:blue").unwrap_err();
        assert!(e
            .to_string()
            .starts_with("configuration error: unknown key 'colour'"));
    }

    #[test]
    fn missing_colon_is_named() {
        let m = err("backend:vmm,limit=8GiB");
        assert!(m.contains("'limit=8GiB'") && m.contains("no ':'"), "{m}");
    }

    #[test]
    fn duplicate_key_is_named() {
        let m = err("limit:1GiB, limit:2GiB");
        assert!(
            m.contains("'limit'") && m.contains("twice") && m.contains("2GiB"),
            "{m}"
        );
    }

    #[test]
    fn bad_values_name_key_and_value() {
        rejects("backend:cuda", "backend", "'cuda'");
        rejects("backend:VMM", "backend", "'VMM'");
        rejects("page_size:0", "page_size", "'0'");
        rejects("page_size:0MiB", "page_size", "'0MiB'");
        rejects("page_size:2 parsecs", "page_size", "'2 parsecs'");
        rejects("page_size:", "page_size", "''");
        rejects("limit:-1GiB", "limit", "'-1GiB'");
        rejects("limit:lots", "limit", "'lots'");
        rejects("limit:8XB", "limit", "'8XB'");
        rejects("limit:99999999999TiB", "limit", "'99999999999TiB'");
        rejects("memory_fraction:0", "memory_fraction", "'0'");
        rejects("memory_fraction:1.5", "memory_fraction", "'1.5'");
        rejects("memory_fraction:-0.5", "memory_fraction", "'-0.5'");
        rejects("memory_fraction:half", "memory_fraction", "'half'");
        rejects("memory_fraction:NaN", "memory_fraction", "'NaN'");
        rejects("memory_fraction:inf", "memory_fraction", "'inf'");
        rejects("small_max:256", "small_max", "'256'");
        rejects("placement:first_fit", "placement", "'first_fit'");
        rejects("small_max:-1MiB", "small_max", "'-1MiB'");
        rejects("size_classes:0", "size_classes", "'0'");
        rejects("size_classes:17", "size_classes", "'17'");
        rejects("size_classes:-4", "size_classes", "'-4'");
        rejects("size_classes:2.5", "size_classes", "'2.5'");
        rejects("check_invariants:yes", "check_invariants", "'yes'");
        rejects("check_invariants:2", "check_invariants", "'2'");
    }

    #[test]
    fn builder_and_validate_reject_the_same_values() {
        assert!(Config::builder().page_size(0).build().is_err());
        assert!(Config::builder().memory_fraction(0.0).build().is_err());
        assert!(Config::builder().memory_fraction(1.5).build().is_err());
        assert!(Config::builder().memory_fraction(f64::NAN).build().is_err());
        assert!(Config::builder().small_max(511).build().is_err());
        assert!(Config::builder().classes_per_doubling(0).build().is_err());
        assert!(Config::builder().classes_per_doubling(17).build().is_err());
        assert!(Config::builder().memory_fraction(1.0).build().is_ok());
    }

    #[test]
    fn backend_parses_and_prints() {
        assert_eq!("legacy".parse::<Backend>().unwrap(), Backend::Legacy);
        assert_eq!(Backend::Vmm.to_string(), "vmm");
        let e = "cuda".parse::<Backend>().unwrap_err().to_string();
        assert!(e.contains("'backend'") && e.contains("'cuda'"), "{e}");
    }

    #[test]
    fn non_utf8_env_is_an_error() {
        use std::os::unix::ffi::OsStringExt;
        let v = std::ffi::OsString::from_vec(vec![b'l', 0xff]);
        assert!(matches!(
            Config::from_env_value(Some(v)),
            Err(Error::Config(_))
        ));
    }

    proptest! {
        #[test]
        fn any_valid_config_round_trips(
            legacy in any::<bool>(),
            page_size in proptest::option::of((0u32..42).prop_map(|k| 1u64 << k)),
            limit in proptest::option::of(0u64..(1 << 50)),
            fraction in proptest::option::of(1u32..=1_000_000),
            small_max in 512u64..(1 << 30),
            classes in 1u32..=16,
            best_fit in any::<bool>(),
            thread_cache in 0u64..(1 << 40),
            check in any::<bool>(),
        ) {
            let c = Config {
                backend: if legacy { Backend::Legacy } else { Backend::Vmm },
                page_size,
                limit,
                memory_fraction: fraction.map(|n| n as f64 / 1_000_000.0),
                small_max,
                classes_per_doubling: classes,
                placement: if best_fit { Placement::BestFit } else { Placement::Lifetime },
                thread_cache,
                check_invariants: check,
            };
            c.validate().unwrap();
            let text = c.to_string();
            prop_assert_eq!(Config::parse(&text).unwrap(), c, "{}", text);
        }
    }
}
