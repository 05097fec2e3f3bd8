//! The tessera CSV reader: `a,<id>,<size>,<stream>` and `f,<id>` lines, `#` comments, metadata
//! on the first line.

use std::io::BufRead;

use super::{Builder, Trace, TraceError};

/// Reads a tessera CSV trace (see the [module documentation](super) for the format) from
/// `reader`; `name` names the trace and its errors.
///
/// A malformed line fails with [`TraceError::Malformed`], a read error with [`TraceError::Io`];
/// ops that cannot be replayed become [`super::Problem`]s.
pub fn parse_csv(name: &str, mut reader: impl BufRead) -> Result<Trace, TraceError> {
    let mut b = Builder::default();
    let mut meta = None;
    let mut buf = Vec::with_capacity(128);
    let mut line = 0u64;
    loop {
        buf.clear();
        let read = reader
            .read_until(b'\n', &mut buf)
            .map_err(|error| TraceError::Io {
                path: name.to_owned(),
                error,
            })?;
        if read == 0 {
            break;
        }
        line += 1;
        let mut text = buf.as_slice();
        if line == 1 {
            text = text.strip_prefix(b"\xef\xbb\xbf").unwrap_or(text);
        }
        let text = text.trim_ascii();
        match text.first() {
            None => continue,
            Some(b'#') => {
                if line == 1 {
                    meta = parse_meta(&text[1..]).map_err(|message| TraceError::Malformed {
                        path: name.to_owned(),
                        line,
                        message,
                    })?;
                }
                continue;
            }
            Some(_) => {}
        }
        match parse_line(text) {
            Ok(Line::Alloc { id, size, stream }) => {
                if let Err(since) = b.alloc(id, size, stream, line) {
                    b.problem(
                        line,
                        format!(
                            "allocation of id {id}, which is already live (since line {since})"
                        ),
                    );
                }
            }
            Ok(Line::Free { id }) => {
                if !b.free(id, line) {
                    b.problem(line, format!("free of unknown id {id}"));
                }
            }
            Err(message) => {
                return Err(TraceError::Malformed {
                    path: name.to_owned(),
                    line,
                    message,
                })
            }
        }
    }
    let mut trace = b.finish(name);
    trace.meta = meta;
    Ok(trace)
}

/// One well-formed operation line.
enum Line {
    Alloc { id: u64, size: u64, stream: u64 },
    Free { id: u64 },
}

/// Parses a trimmed, non-empty line that is not a comment.
fn parse_line(text: &[u8]) -> Result<Line, String> {
    // The fields, trimmed; a fifth means "too many".
    let mut fields: [&[u8]; 5] = [&[]; 5];
    let mut count = 0;
    for field in text.split(|&c| c == b',') {
        fields[count] = field.trim_ascii();
        count += 1;
        if count == fields.len() {
            break;
        }
    }
    match (fields[0], count) {
        (b"a", 4) => {
            let id = integer(fields[1], "id")?;
            let size = integer(fields[2], "size")?;
            if size == 0 {
                return Err(format!(
                    "expected a size of at least 1 byte, found {}",
                    quote(fields[2])
                ));
            }
            let stream = integer(fields[3], "stream")?;
            Ok(Line::Alloc { id, size, stream })
        }
        (b"f", 2) => Ok(Line::Free {
            id: integer(fields[1], "id")?,
        }),
        (b"a", _) => Err(format!(
            "expected 'a,<id>,<size>,<stream>', found {}",
            quote(text)
        )),
        (b"f", _) => Err(format!("expected 'f,<id>', found {}", quote(text))),
        _ => Err(format!(
            "expected 'a,<id>,<size>,<stream>' or 'f,<id>', found {}",
            quote(text)
        )),
    }
}

/// An unsigned decimal integer: digits only, at most `u64::MAX`.
fn integer(field: &[u8], what: &str) -> Result<u64, String> {
    parse_u64(field).ok_or_else(|| format!("expected an integer {what}, found {}", quote(field)))
}

fn parse_u64(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() {
        return None;
    }
    let mut value: u64 = 0;
    for &c in digits {
        let digit = c.wrapping_sub(b'0');
        if digit > 9 {
            return None;
        }
        value = value.checked_mul(10)?.checked_add(u64::from(digit))?;
    }
    Some(value)
}

/// The metadata of a first-line comment (the text after `#`): a JSON object if the text starts
/// with `{`, nothing otherwise (a plain comment).
fn parse_meta(text: &[u8]) -> Result<Option<serde_json::Value>, String> {
    let text = text.trim_ascii();
    if !text.starts_with(b"{") {
        return Ok(None);
    }
    // JSON text that starts with '{' and parses is an object.
    serde_json::from_slice::<serde_json::Value>(text)
        .map(Some)
        .map_err(|e| {
            format!(
                "expected a JSON object of trace metadata after '# ', found {} ({e})",
                quote(text)
            )
        })
}

/// `field` as a quoted, escaped string for an error message, cut after 80 characters.
fn quote(field: &[u8]) -> String {
    const MAX: usize = 80;
    let text = String::from_utf8_lossy(field);
    match text.char_indices().nth(MAX) {
        Some((cut, _)) => format!("{:?}...", &text[..cut]),
        None => format!("{text:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_are_digits_only_and_fit_in_u64() {
        assert_eq!(parse_u64(b"0"), Some(0));
        assert_eq!(parse_u64(b"007"), Some(7));
        assert_eq!(parse_u64(b"18446744073709551615"), Some(u64::MAX));
        assert_eq!(parse_u64(b"18446744073709551616"), None);
        for bad in [
            &b""[..],
            b"+1",
            b"-1",
            b"1.0",
            b"1e3",
            b"0x10",
            b"1 2",
            b"\xff",
        ] {
            assert_eq!(parse_u64(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn long_fields_are_cut_in_messages() {
        let long = "x".repeat(200);
        let q = quote(long.as_bytes());
        assert_eq!(q, format!("{:?}...", "x".repeat(80)));
        assert_eq!(quote(b"a\"b\tc"), r#""a\"b\tc""#);
    }
}
