//! Byte sizes: formatting as B/KiB/MiB/GiB with two decimals (as OOM messages print them) and
//! parsing of sizes written by people (`512`, `512B`, `64KiB`, `2MiB`, `1.5GiB`, `8GB`).

/// The binary units, largest first.
const UNITS: [(&str, u64); 4] = [
    ("TiB", 1 << 40),
    ("GiB", 1 << 30),
    ("MiB", 1 << 20),
    ("KiB", 1 << 10),
];

/// Formats a byte count with binary units and two decimals: `512 B`, `1.50 KiB`, `2.00 MiB`.
pub fn format_bytes(bytes: u64) -> String {
    for (name, unit) in UNITS {
        if bytes >= unit {
            return format!("{:.2} {}", bytes as f64 / unit as f64, name);
        }
    }
    format!("{bytes} B")
}

/// A size in the largest binary unit that divides it exactly (`4MiB`, `1536KiB`, `100B`), so that
/// [`parse_bytes`] reads it back unchanged.
pub fn format_bytes_exact(bytes: u64) -> String {
    for (name, unit) in UNITS {
        // Units are powers of two: `unit - 1` masks the remainder.
        if bytes != 0 && bytes & (unit - 1) == 0 {
            return format!("{}{name}", bytes / unit);
        }
    }
    format!("{bytes}B")
}

/// Parses a size: a non-negative number (decimals allowed with a unit) followed by an optional unit,
/// `B`, `K`/`KB`/`KiB`, `M`/`MB`/`MiB`, `G`/`GB`/`GiB`, `T`/`TB`/`TiB` (case-insensitive). Decimal
/// units (`KB`, `MB`, ...) are taken as binary ones, as PyTorch does. Returns a message on error.
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    if num.is_empty() {
        return Err(format!(
            "'{text}' is not a size (expected a number with an optional unit such as MiB)"
        ));
    }
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        other => {
            return Err(format!(
                "'{text}' has an unknown unit '{other}' (use B, KiB, MiB, GiB or TiB)"
            ))
        }
    };
    if let Ok(n) = num.parse::<u64>() {
        return n
            .checked_mul(mult)
            .ok_or_else(|| format!("'{text}' is too large"));
    }
    let f: f64 = num
        .parse()
        .map_err(|_| format!("'{text}' is not a size (bad number '{num}')"))?;
    let v = f * mult as f64;
    if !v.is_finite() || v >= u64::MAX as f64 {
        return Err(format!("'{text}' is too large"));
    }
    Ok(v.round() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_with_two_decimals() {
        assert_eq!(format_bytes(0), "0 B");
        assert_eq!(format_bytes(511), "511 B");
        assert_eq!(format_bytes(1536), "1.50 KiB");
        assert_eq!(format_bytes(2 << 20), "2.00 MiB");
        assert_eq!(format_bytes(80 << 30), "80.00 GiB");
    }

    #[test]
    fn exact_sizes_parse_back() {
        for b in [0, 100, 1536, 2 << 20, 3 << 29, (1 << 40) + 512] {
            assert_eq!(parse_bytes(&format_bytes_exact(b)).unwrap(), b);
        }
        assert_eq!(format_bytes_exact(2 << 20), "2MiB");
    }

    #[test]
    fn parses_units_and_rejects_garbage() {
        assert_eq!(parse_bytes("512").unwrap(), 512);
        assert_eq!(parse_bytes("2MiB").unwrap(), 2 << 20);
        assert_eq!(parse_bytes("1.5GiB").unwrap(), 3 << 29);
        assert_eq!(parse_bytes(" 8 gb ").unwrap(), 8 << 30);
        assert!(parse_bytes("").is_err());
        assert!(parse_bytes("-1MiB").is_err());
        assert!(parse_bytes("12 parsecs").is_err());
        assert!(parse_bytes("99999999999TiB").is_err());
    }
}
