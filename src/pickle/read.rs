//! The reader: a stack machine over the pickle's opcodes.

use std::cell::RefCell;
use std::rc::Rc;

use rustc_hash::FxHashMap;

use super::{op, opcode_name, Error, Value};

/// The highest protocol read.
const HIGHEST_PROTOCOL: u8 = 5;

/// Reads one pickled value (protocols 0 to 5); bytes after its `STOP` are ignored.
pub fn from_slice(bytes: &[u8]) -> std::result::Result<Value, Error> {
    Reader {
        data: bytes,
        pos: 0,
        at: 0,
        code: 0,
        stack: Vec::new(),
        marks: Vec::new(),
        memo: Memo::default(),
    }
    .run()
}

/// The memo: dense below its first gap (the usual case), sparse beyond. Keys are unique across
/// both parts, so its length is Python's `len(memo)`, the index `MEMOIZE` uses.
#[derive(Default)]
struct Memo {
    dense: Vec<Value>,
    sparse: FxHashMap<u64, Value>,
}

impl Memo {
    fn len(&self) -> u64 {
        self.dense.len() as u64 + self.sparse.len() as u64
    }

    fn put(&mut self, index: u64, value: Value) {
        let dense = self.dense.len() as u64;
        if index < dense {
            self.dense[index as usize] = value;
        } else if index == dense {
            if !self.sparse.is_empty() {
                self.sparse.remove(&index);
            }
            self.dense.push(value);
        } else {
            self.sparse.insert(index, value);
        }
    }

    fn get(&self, index: u64) -> Option<&Value> {
        match usize::try_from(index) {
            Ok(i) if i < self.dense.len() => Some(&self.dense[i]),
            _ => self.sparse.get(&index),
        }
    }
}

/// The pickle machine. Values above the topmost mark (`stack[floor()..]`) are the ones an opcode
/// may pop; marks are indexes into `stack`, never above its length.
struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
    /// The offset of the opcode being run.
    at: usize,
    /// The opcode being run.
    code: u8,
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: Memo,
}

type Result<T> = std::result::Result<T, Error>;

impl<'a> Reader<'a> {
    fn err(&self, message: impl Into<String>) -> Error {
        Error {
            offset: self.at as u64,
            message: message.into(),
        }
    }

    fn name(&self) -> &'static str {
        opcode_name(self.code)
    }

    fn bytes(&mut self, n: u64) -> Result<&'a [u8]> {
        let left = self.data.len() - self.pos;
        if n > left as u64 {
            return Err(self.err(format!(
                "truncated: {} needs {n} bytes, {left} left",
                self.name()
            )));
        }
        let s = &self.data[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut a = [0; N];
        a.copy_from_slice(self.bytes(N as u64)?);
        Ok(a)
    }

    fn u8(&mut self) -> Result<u8> {
        Ok(self.array::<1>()?[0])
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn i32_len(&mut self) -> Result<u64> {
        let n = i32::from_le_bytes(self.array()?);
        u64::try_from(n)
            .map_err(|_| self.err(format!("{} with a negative length {n}", self.name())))
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    /// The next line, without its `\n`.
    fn line(&mut self) -> Result<&'a [u8]> {
        let rest = &self.data[self.pos..];
        let Some(n) = rest.iter().position(|&b| b == b'\n') else {
            return Err(self.err(format!("truncated: {} has no end of line", self.name())));
        };
        self.pos += n + 1;
        Ok(&rest[..n])
    }

    fn utf8_line(&mut self) -> Result<&'a str> {
        let line = self.line()?;
        std::str::from_utf8(line)
            .map_err(|_| self.err(format!("{} argument is not UTF-8", self.name())))
    }

    fn decimal(&self, line: &[u8]) -> Result<Value> {
        parse_decimal(line).ok_or_else(|| {
            self.err(format!(
                "{} argument {:?} is not an int",
                self.name(),
                line.escape_ascii().to_string()
            ))
        })
    }

    fn memo_index(&mut self) -> Result<u64> {
        let line = self.line()?;
        match self.decimal(line)? {
            Value::Int(i) => u64::try_from(i)
                .map_err(|_| self.err(format!("{} index {i} is negative", self.name()))),
            _ => Err(self.err(format!("{} index is too large", self.name()))),
        }
    }

    /// The length before a string's bytes: 1 byte for `short`, 4 for `four`, 8 for the others.
    fn length(&mut self, code: u8, short: u8, four: u8) -> Result<u64> {
        match code {
            c if c == short => Ok(self.u8()?.into()),
            c if c == four => Ok(self.u32()?.into()),
            _ => self.u64(),
        }
    }

    /// The two lines of `GLOBAL` or `INST`: module and name.
    fn global(&mut self) -> Result<Value> {
        let module = Rc::from(self.utf8_line()?);
        let name = Rc::from(self.utf8_line()?);
        Ok(Value::Global { module, name })
    }

    fn floor(&self) -> usize {
        self.marks.last().copied().unwrap_or(0)
    }

    fn underflow(&self) -> Error {
        self.err(format!(
            "stack underflow: {} needs a value the stack does not have",
            self.name()
        ))
    }

    fn pop(&mut self) -> Result<Value> {
        if self.stack.len() > self.floor() {
            self.stack.pop().ok_or_else(|| self.underflow())
        } else {
            Err(self.underflow())
        }
    }

    fn top(&self) -> Result<&Value> {
        match self.stack.last() {
            Some(v) if self.stack.len() > self.floor() => Ok(v),
            _ => Err(self.underflow()),
        }
    }

    /// Pops the topmost mark; the items above it are `stack[mark..]`.
    fn pop_mark(&mut self) -> Result<usize> {
        self.marks
            .pop()
            .ok_or_else(|| self.err(format!("{} needs a MARK, and there is none", self.name())))
    }

    /// The value just below the mark `m` popped by [`Self::pop_mark`], which must lie above the
    /// next mark.
    fn below_mark(&self, m: usize) -> Result<&Value> {
        if m > self.floor() {
            Ok(&self.stack[m - 1])
        } else {
            Err(self.underflow())
        }
    }

    fn wrong(&self, v: &Value, wanted: &str) -> Error {
        self.err(format!("{} on {}, not {wanted}", self.name(), v.kind()))
    }

    /// Moves the items above the mark `m` into `out` as (key, value) pairs.
    fn pairs_into(&mut self, m: usize, out: &mut Vec<(Value, Value)>) -> Result<()> {
        if !(self.stack.len() - m).is_multiple_of(2) {
            return Err(self.err(format!("{} with an odd number of items", self.name())));
        }
        out.reserve((self.stack.len() - m) / 2);
        let mut items = self.stack.drain(m..);
        while let (Some(k), Some(v)) = (items.next(), items.next()) {
            out.push((k, v));
        }
        Ok(())
    }

    /// Moves the items above the mark `m` to the end of `out`.
    fn items_into(&mut self, m: usize, out: &mut Vec<Value>) {
        if out.is_empty() {
            // The usual case (`EMPTY_LIST`, `MEMOIZE`, `MARK`, ..., `APPENDS`): no copy.
            *out = self.stack.split_off(m);
        } else {
            out.extend(self.stack.drain(m..));
        }
    }

    fn run(mut self) -> Result<Value> {
        loop {
            self.at = self.pos;
            let Some(&code) = self.data.get(self.pos) else {
                return Err(self.err("truncated: the pickle ends before its STOP opcode"));
            };
            self.code = code;
            self.pos += 1;
            // Each arm makes the value to push, or does its work and continues.
            let v = match code {
                op::PROTO => {
                    let v = self.u8()?;
                    if v > HIGHEST_PROTOCOL {
                        return Err(self.err(format!("unsupported pickle protocol {v}")));
                    }
                    continue;
                }
                op::FRAME => {
                    // A buffering hint; the frame's opcodes follow inline.
                    let n = self.u64()?;
                    if n > (self.data.len() - self.pos) as u64 {
                        return Err(self.err(format!("truncated: a FRAME of {n} bytes")));
                    }
                    continue;
                }
                op::STOP => return self.pop(),
                op::MARK => {
                    self.marks.push(self.stack.len());
                    continue;
                }
                // As in Python, POP on an empty frame pops the mark instead.
                op::POP if self.stack.len() == self.floor() => {
                    self.pop_mark()?;
                    continue;
                }
                op::POP => {
                    self.stack.pop();
                    continue;
                }
                op::POP_MARK => {
                    let m = self.pop_mark()?;
                    self.stack.truncate(m);
                    continue;
                }
                op::DUP => self.top()?.clone(),
                op::NONE => Value::None,
                op::NEWTRUE => Value::Bool(true),
                op::NEWFALSE => Value::Bool(false),
                op::INT => match self.line()? {
                    b"00" => Value::Bool(false),
                    b"01" => Value::Bool(true),
                    line => self.decimal(line)?,
                },
                op::LONG => {
                    let line = self.line()?;
                    self.decimal(line.strip_suffix(b"L").unwrap_or(line))?
                }
                op::BININT => Value::Int(i32::from_le_bytes(self.array()?).into()),
                op::BININT1 => Value::Int(self.u8()?.into()),
                op::BININT2 => Value::Int(u16::from_le_bytes(self.array()?).into()),
                op::LONG1 => {
                    let n = self.u8()?.into();
                    int_from_le(self.bytes(n)?)
                }
                op::LONG4 => {
                    let n = self.i32_len()?;
                    int_from_le(self.bytes(n)?)
                }
                op::FLOAT => {
                    let line = self.utf8_line()?;
                    let v = line
                        .trim()
                        .parse()
                        .map_err(|_| self.err(format!("FLOAT {line:?} is not a float")))?;
                    Value::Float(v)
                }
                op::BINFLOAT => Value::Float(f64::from_be_bytes(self.array()?)),
                op::STRING => {
                    let line = self.line()?;
                    let quoted = match (line.first(), line.last()) {
                        (Some(&a), Some(&b)) => {
                            line.len() >= 2 && a == b && (a == b'\'' || a == b'"')
                        }
                        _ => false,
                    };
                    if !quoted {
                        return Err(self.err("the STRING argument must be quoted"));
                    }
                    let raw = escape_decode(&line[1..line.len() - 1]).map_err(|e| self.err(e))?;
                    str_or_bytes(&raw)
                }
                op::BINSTRING => {
                    let n = self.i32_len()?;
                    str_or_bytes(self.bytes(n)?)
                }
                op::SHORT_BINSTRING => {
                    let n = self.u8()?.into();
                    str_or_bytes(self.bytes(n)?)
                }
                op::UNICODE => {
                    let line = self.line()?;
                    Value::str(&raw_unicode_escape(line).map_err(|e| self.err(e))?)
                }
                op::BINUNICODE | op::SHORT_BINUNICODE | op::BINUNICODE8 => {
                    let n = self.length(code, op::SHORT_BINUNICODE, op::BINUNICODE)?;
                    let b = self.bytes(n)?;
                    Value::str(
                        std::str::from_utf8(b)
                            .map_err(|_| self.err(format!("{} is not UTF-8", self.name())))?,
                    )
                }
                op::BINBYTES | op::SHORT_BINBYTES | op::BINBYTES8 | op::BYTEARRAY8 => {
                    let n = self.length(code, op::SHORT_BINBYTES, op::BINBYTES)?;
                    Value::bytes(self.bytes(n)?)
                }
                op::EMPTY_LIST => Value::list(Vec::new()),
                op::APPEND => {
                    let v = self.pop()?;
                    match self.top()? {
                        Value::List(l) => l.borrow_mut().push(v),
                        other => return Err(self.wrong(other, "a list")),
                    }
                    continue;
                }
                op::APPENDS => {
                    let m = self.pop_mark()?;
                    let list = match self.below_mark(m)? {
                        Value::List(l) => l.clone(),
                        other => return Err(self.wrong(other, "a list")),
                    };
                    self.items_into(m, &mut list.borrow_mut());
                    continue;
                }
                op::LIST => {
                    let m = self.pop_mark()?;
                    Value::list(self.stack.split_off(m))
                }
                op::EMPTY_TUPLE => Value::tuple(Vec::new()),
                op::TUPLE => {
                    let m = self.pop_mark()?;
                    Value::Tuple(self.stack.drain(m..).collect())
                }
                op::TUPLE1 | op::TUPLE2 | op::TUPLE3 => {
                    let n = usize::from(code - op::TUPLE1 + 1);
                    if self.stack.len() < self.floor() + n {
                        return Err(self.underflow());
                    }
                    let at = self.stack.len() - n;
                    Value::Tuple(self.stack.drain(at..).collect())
                }
                op::EMPTY_DICT => Value::Dict(Rc::default()),
                op::DICT => {
                    let m = self.pop_mark()?;
                    let mut pairs = Vec::new();
                    self.pairs_into(m, &mut pairs)?;
                    Value::Dict(Rc::new(RefCell::new(pairs)))
                }
                op::SETITEM => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    match self.top()? {
                        Value::Dict(d) => d.borrow_mut().push((k, v)),
                        other => return Err(self.wrong(other, "a dict")),
                    }
                    continue;
                }
                op::SETITEMS => {
                    let m = self.pop_mark()?;
                    let dict = match self.below_mark(m)? {
                        Value::Dict(d) => d.clone(),
                        other => return Err(self.wrong(other, "a dict")),
                    };
                    self.pairs_into(m, &mut dict.borrow_mut())?;
                    continue;
                }
                op::EMPTY_SET => Value::Set(Rc::default()),
                op::ADDITEMS => {
                    let m = self.pop_mark()?;
                    let set = match self.below_mark(m)? {
                        Value::Set(s) => s.clone(),
                        other => return Err(self.wrong(other, "a set")),
                    };
                    self.items_into(m, &mut set.borrow_mut());
                    continue;
                }
                op::FROZENSET => {
                    let m = self.pop_mark()?;
                    Value::Set(Rc::new(RefCell::new(self.stack.split_off(m))))
                }
                op::GET | op::BINGET | op::LONG_BINGET => {
                    let index = match code {
                        op::GET => self.memo_index()?,
                        op::BINGET => self.u8()?.into(),
                        _ => self.u32()?.into(),
                    };
                    match self.memo.get(index) {
                        Some(v) => v.clone(),
                        None => {
                            return Err(self.err(format!(
                                "{} of memo index {index}, which is not set",
                                self.name()
                            )))
                        }
                    }
                }
                op::PUT | op::BINPUT | op::LONG_BINPUT | op::MEMOIZE => {
                    let index = match code {
                        op::PUT => self.memo_index()?,
                        op::BINPUT => self.u8()?.into(),
                        op::LONG_BINPUT => self.u32()?.into(),
                        _ => self.memo.len(),
                    };
                    let v = self.top()?.clone();
                    self.memo.put(index, v);
                    continue;
                }
                op::GLOBAL => self.global()?,
                op::STACK_GLOBAL => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    let (Value::Str(module), Value::Str(name)) = (&module, &name) else {
                        let kinds = (module.kind(), name.kind());
                        return Err(self.err(format!(
                            "STACK_GLOBAL of {} and {}, not two strs",
                            kinds.0, kinds.1
                        )));
                    };
                    Value::Global {
                        module: module.clone(),
                        name: name.clone(),
                    }
                }
                op::REDUCE | op::NEWOBJ => {
                    let args = self.pop()?;
                    object(self.pop()?, args)
                }
                op::NEWOBJ_EX => {
                    let kwargs = self.pop()?;
                    let args = self.pop()?;
                    object(self.pop()?, Value::tuple(vec![args, kwargs]))
                }
                op::BUILD => {
                    let v = self.pop()?;
                    match self.top()? {
                        Value::Object { state, .. } => *state.borrow_mut() = Some(v),
                        other => return Err(self.wrong(other, "an object")),
                    }
                    continue;
                }
                op::INST => {
                    let class = self.global()?;
                    let m = self.pop_mark()?;
                    object(class, Value::Tuple(self.stack.drain(m..).collect()))
                }
                op::OBJ => {
                    let m = self.pop_mark()?;
                    if self.stack.len() == m {
                        return Err(self.underflow());
                    }
                    let mut items = self.stack.drain(m..);
                    let class = items.next().unwrap_or_default();
                    object(class, Value::Tuple(items.collect()))
                }
                _ => {
                    return Err(self.err(format!(
                        "opcode 0x{code:02x} ({}) is not supported",
                        self.name()
                    )))
                }
            };
            self.stack.push(v);
        }
    }
}

/// An inert object: `class` called with `args`, no state yet.
pub(super) fn object(class: Value, args: Value) -> Value {
    Value::Object {
        class: Rc::new(class),
        args: Rc::new(args),
        state: Rc::new(RefCell::new(None)),
    }
}

/// A base-10 int with optional sign and surrounding whitespace; `None` when malformed.
fn parse_decimal(s: &[u8]) -> Option<Value> {
    let s = s.trim_ascii();
    let (negative, digits) = match s.split_first() {
        Some((b'-', rest)) => (true, rest),
        Some((b'+', rest)) => (false, rest),
        _ => (false, s),
    };
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let mut acc = Some(0i128);
    for &d in digits {
        let d = i128::from(d - b'0');
        acc = acc.and_then(|a| a.checked_mul(10)).and_then(|a| {
            if negative {
                a.checked_sub(d)
            } else {
                a.checked_add(d)
            }
        });
    }
    Some(acc.map_or(Value::BigInt, Value::Int))
}

/// A little-endian two's complement int (`LONG1`/`LONG4`), of any length.
fn int_from_le(mut b: &[u8]) -> Value {
    // Sign-extension bytes do not change the value.
    while let [.., prev, last] = b {
        if (*last == 0 && *prev < 0x80) || (*last == 0xff && *prev >= 0x80) {
            b = &b[..b.len() - 1];
        } else {
            break;
        }
    }
    match b.last() {
        None => Value::Int(0),
        Some(_) if b.len() > 16 => Value::BigInt,
        Some(&last) => {
            let mut buf = [if last >= 0x80 { 0xff } else { 0 }; 16];
            buf[..b.len()].copy_from_slice(b);
            Value::Int(i128::from_le_bytes(buf))
        }
    }
}

/// A Python 2 string: a str when UTF-8, bytes otherwise.
fn str_or_bytes(b: &[u8]) -> Value {
    match std::str::from_utf8(b) {
        Ok(s) => Value::str(s),
        Err(_) => Value::bytes(b),
    }
}

fn hex(digits: &[u8]) -> Option<u32> {
    digits
        .iter()
        .try_fold(0u32, |acc, &d| Some(acc * 16 + char::from(d).to_digit(16)?))
}

/// Python's `codecs.escape_decode`, for the `STRING` opcode's quoted argument.
fn escape_decode(s: &[u8]) -> std::result::Result<Vec<u8>, &'static str> {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while let Some(&c) = s.get(i) {
        i += 1;
        if c != b'\\' {
            out.push(c);
            continue;
        }
        let Some(&e) = s.get(i) else {
            return Err("a trailing \\ in a STRING");
        };
        i += 1;
        match e {
            b'\n' => {}
            b'a' => out.push(7),
            b'b' => out.push(8),
            b't' => out.push(9),
            b'n' => out.push(10),
            b'v' => out.push(11),
            b'f' => out.push(12),
            b'r' => out.push(13),
            b'0'..=b'7' => {
                let mut v = u32::from(e - b'0');
                for _ in 0..2 {
                    match s.get(i) {
                        Some(&d @ b'0'..=b'7') => {
                            v = v * 8 + u32::from(d - b'0');
                            i += 1;
                        }
                        _ => break,
                    }
                }
                out.push((v & 0xff) as u8);
            }
            b'x' => {
                let v = s
                    .get(i..i + 2)
                    .and_then(hex)
                    .ok_or("an invalid \\x escape in a STRING")?;
                out.push(v as u8);
                i += 2;
            }
            b'\\' | b'\'' | b'"' => out.push(e),
            _ => out.extend([b'\\', e]),
        }
    }
    Ok(out)
}

/// Python's `raw-unicode-escape` decoding, for the `UNICODE` opcode: bytes are Latin-1 but for
/// `\uXXXX` and `\UXXXXXXXX` after an odd number of backslashes.
fn raw_unicode_escape(s: &[u8]) -> std::result::Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    while let Some(&c) = s.get(i) {
        if c != b'\\' {
            out.push(char::from(c));
            i += 1;
            continue;
        }
        let start = i;
        while s.get(i) == Some(&b'\\') {
            out.push('\\');
            i += 1;
        }
        let width = match s.get(i) {
            Some(b'u') => 4,
            Some(b'U') => 8,
            _ => continue,
        };
        if (i - start) % 2 == 0 {
            continue;
        }
        out.pop();
        let digits = s
            .get(i + 1..i + 1 + width)
            .ok_or("a truncated \\u escape in a UNICODE argument")?;
        let code = hex(digits).ok_or("an invalid \\u escape in a UNICODE argument")?;
        let ch = char::from_u32(code).ok_or_else(|| {
            format!("UNICODE character U+{code:04X} is a surrogate or out of range")
        })?;
        out.push(ch);
        i += 1 + width;
    }
    Ok(out)
}
