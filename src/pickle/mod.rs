//! A reader and a writer for Python pickles of plain data, keeping the memo's sharing.
//!
//! PyTorch memory snapshots (`torch.cuda.memory._dump_snapshot()`, protocol 4) share one
//! `frames` list among many trace entries, and one frame dict among many lists, through the
//! pickle memo. [`from_slice`] keeps that sharing: a memo entry and every `GET` of it are clones
//! of one [`Rc`], so a list memoized while empty and filled by `APPENDS` afterwards is seen full
//! through every reference, as in Python. [`to_vec`] writes protocol 4 and memoizes by pointer:
//! a list, dict, set, tuple or object met a second time (the same `Rc`), and a str or bytes value
//! held more than once, is written as a memo reference, so an exported snapshot stays as small as
//! the one Python wrote.
//!
//! # Data structure and invariants
//!
//! A [`Value`] is a tree of `Rc`s: leaves are copied or `Rc`-shared, containers are
//! `Rc<RefCell<..>>` (mutable, as the pickle VM fills them after creating them) or `Rc<[..]>`
//! (tuples, immutable). Dicts and sets are vectors in insertion order; nothing is hashed, duplicate
//! dict keys are kept and [`Value::get`] finds the last one, which is the one Python keeps.
//! Nothing is locked: values are `Rc` and `RefCell`, so they are neither `Send` nor `Sync` and
//! live on one thread. A `RefCell` is only borrowed for the length of one call; calling any
//! function here while holding a `borrow_mut` of a container inside the value panics, as
//! `RefCell` does.
//!
//! # Hostile input
//!
//! The reader is a stack machine with no recursion. It never panics, and it allocates only for
//! the values an opcode makes: every declared length is checked against the bytes left before
//! anything is read or allocated, so memory is linear in the input. Values from a pickle may nest
//! arbitrarily deep (a chain of memoized lists costs a few bytes a level and no stack) and may be
//! cyclic (a list appended into itself). So no nesting limit is enforced while reading; a limit
//! counted at read time would be unsound anyway, as a memoized list can gain depth after it was
//! put inside another. Instead every walk here is iterative or bounded:
//! - `Drop` for [`Value`] is iterative: it moves the children of a container it owns alone onto a
//!   heap stack, so dropping a million-deep list cannot overflow the thread's stack;
//! - [`to_vec`] runs on an explicit task stack and writes a memo reference for a container
//!   already started, so cycles end (that is correct pickle: Python reads them back as cycles);
//! - `Debug` stops at 64 levels and after 10,000 values, printing `…`;
//! - [`Value::get`], [`Value::kind`], the `as_*` converters and `Clone` look one level deep only.
//!
//! Cycles are `Rc` cycles: a cyclic value leaks when dropped unless its owner breaks the cycle
//! (for example by clearing a list). Walking values from untrusted pickles in code outside this
//! module needs the same care: iterate, or bound the depth.
//!
//! # What is read
//!
//! All opcodes of protocols 0 to 5 that plain data uses, plus the object opcodes (`GLOBAL`,
//! `STACK_GLOBAL`, `REDUCE`, `NEWOBJ`, `NEWOBJ_EX`, `BUILD`, `INST`, `OBJ`), whose results are
//! kept inert as [`Value::Global`] and [`Value::Object`]: no code ever runs and no name is
//! resolved. `PERSID`, `BINPERSID`, the `EXT` opcodes, the out-of-band buffer opcodes
//! `NEXT_BUFFER`/`READONLY_BUFFER` and unknown bytes are errors naming the opcode and its offset.
//! Bytes after `STOP` are ignored, as `pickle.loads` ignores them. Python 2 strings (`STRING`,
//! `BINSTRING`, `SHORT_BINSTRING`) become a str when they are UTF-8 and bytes otherwise;
//! `bytearray` becomes bytes; a frozenset becomes a set. Decimal arguments (`INT`, `LONG`, `GET`,
//! `PUT`) are read in base 10. A str holding a lone surrogate, which a Rust `str` cannot hold,
//! is an error. `APPEND`/`SETITEM`/`ADDITEMS` into anything but a list/dict/set (as for pickled
//! `defaultdict` or list subclasses) is an error, since the items would have nowhere to go.
//!
//! # What is written
//!
//! Protocol 4 without `FRAME`s (framing is optional): ints as `BININT1`/`BININT2`/`BININT` where
//! they fit, else `LONG1`; strs as `SHORT_BINUNICODE`/`BINUNICODE`; floats as `BINFLOAT`; lists,
//! dicts and sets written empty, memoized, then filled in batches of 1000 (`APPENDS`, `SETITEMS`,
//! `ADDITEMS`), as CPython does; a set is written as a set, even if it was read from a frozenset.
//! An object is written as class, args, `REDUCE`, then state and `BUILD`; whether it was read
//! from `REDUCE` or `NEWOBJ` is not kept. Reading the output back gives an equal value, with the
//! same sharing.
//!
//! A [`Value`] takes 48 bytes (an `i128`, or a global's two `Rc<str>`), so a pickle read takes
//! about 48 bytes per item of a list or 96 per item of a dict, plus each container's allocation.

use std::cell::{Cell, RefCell};
use std::fmt;
use std::rc::Rc;

mod read;
#[cfg(test)]
mod tests;
mod write;

pub use read::from_slice;
pub use write::to_vec;

/// A Python value from a pickle. See the [module docs](self) for sharing and cycles.
#[derive(Clone, Default)]
pub enum Value {
    /// `None`.
    #[default]
    None,
    /// `True` or `False` (not an int here: [`Value::as_int`] is `None` for it).
    Bool(bool),
    /// An int that fits in `i128`.
    Int(i128),
    /// An int beyond `i128`; its value is not kept and converters treat it as out of range.
    /// [`to_vec`] writes it as `2**127`, the smallest int beyond `i128`.
    BigInt,
    /// A float.
    Float(f64),
    /// A str.
    Str(Rc<str>),
    /// A bytes object (also a bytearray, or a Python 2 string that is not UTF-8).
    Bytes(Rc<[u8]>),
    /// A list.
    List(Rc<RefCell<Vec<Value>>>),
    /// A tuple.
    Tuple(Rc<[Value]>),
    /// A dict: its items in insertion order; a duplicate key is kept, and the later one wins in
    /// [`Value::get`].
    Dict(Rc<RefCell<Vec<(Value, Value)>>>),
    /// A set or a frozenset, in the pickle's order.
    Set(Rc<RefCell<Vec<Value>>>),
    /// A global (`GLOBAL`/`STACK_GLOBAL`): a name, never resolved.
    Global {
        /// The module, such as `builtins`.
        module: Rc<str>,
        /// The qualified name in the module.
        name: Rc<str>,
    },
    /// The inert result of `REDUCE`/`NEWOBJ`/`NEWOBJ_EX`/`INST`/`OBJ`, and `BUILD` on it.
    ///
    /// The fields are `Rc` so that a clone (a memo `GET`) is the same object: `BUILD`, which
    /// Python's pickler writes after memoizing the object, sets the state seen through every
    /// reference, and a pickle cannot blow up memory by cloning a deep object tree.
    Object {
        /// The callable or class (usually a [`Value::Global`]).
        class: Rc<Value>,
        /// Its arguments, usually a tuple; for `NEWOBJ_EX` the 2-tuple `(args, kwargs)`; for
        /// `INST`/`OBJ` the tuple of the items after the mark.
        args: Rc<Value>,
        /// The state given by `BUILD` (a later `BUILD` replaces it), shared by every clone.
        state: Rc<RefCell<Option<Value>>>,
    },
}

impl Value {
    /// The value for `key` in a dict whose key is the str `key` (or bytes equal to it); the last
    /// such item wins. `None` for a missing key or a value that is not a dict.
    pub fn get(&self, key: &str) -> Option<Value> {
        let Value::Dict(items) = self else {
            return None;
        };
        let items = items.borrow();
        let found = items.iter().rev().find(|(k, _)| match k {
            Value::Str(s) => **s == *key,
            Value::Bytes(b) => **b == *key.as_bytes(),
            _ => false,
        });
        found.map(|(_, v)| v.clone())
    }

    /// The int, if this is one that fits in `i128` (`None` for bools and [`Value::BigInt`]).
    pub fn as_int(&self) -> Option<i128> {
        match self {
            Value::Int(i) => Some(*i),
            _ => None,
        }
    }

    /// The bool, if this is one.
    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Value::Bool(b) => Some(*b),
            _ => None,
        }
    }

    /// The number as a float, if this is a float or an int.
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Float(f) => Some(*f),
            Value::Int(i) => Some(*i as f64),
            _ => None,
        }
    }

    /// The str, if this is a str or bytes that are UTF-8 (those are copied into a new `Rc`).
    pub fn as_str(&self) -> Option<Rc<str>> {
        match self {
            Value::Str(s) => Some(s.clone()),
            Value::Bytes(b) => std::str::from_utf8(b).ok().map(Rc::from),
            _ => None,
        }
    }

    /// The items of a list or a tuple, cloned shallowly (`Rc` clones).
    pub fn as_list(&self) -> Option<Vec<Value>> {
        match self {
            Value::List(items) => Some(items.borrow().clone()),
            Value::Tuple(items) => Some(items.to_vec()),
            _ => None,
        }
    }

    /// The items of a dict, cloned shallowly (`Rc` clones), in insertion order.
    pub fn as_dict(&self) -> Option<Vec<(Value, Value)>> {
        match self {
            Value::Dict(items) => Some(items.borrow().clone()),
            _ => None,
        }
    }

    /// Whether this is `None`.
    pub fn is_none(&self) -> bool {
        matches!(self, Value::None)
    }

    /// The Python type, for messages: "None", "a bool", "an int", "a str", "a list", "a dict", ...
    pub fn kind(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool(_) => "a bool",
            Value::Int(_) => "an int",
            Value::BigInt => "an int beyond i128",
            Value::Float(_) => "a float",
            Value::Str(_) => "a str",
            Value::Bytes(_) => "a bytes object",
            Value::List(_) => "a list",
            Value::Tuple(_) => "a tuple",
            Value::Dict(_) => "a dict",
            Value::Set(_) => "a set",
            Value::Global { .. } => "a global",
            Value::Object { .. } => "an object",
        }
    }

    /// A str.
    pub fn str(s: &str) -> Value {
        Value::Str(Rc::from(s))
    }

    /// A bytes object.
    pub fn bytes(b: &[u8]) -> Value {
        Value::Bytes(Rc::from(b))
    }

    /// A list of `items`.
    pub fn list(items: Vec<Value>) -> Value {
        Value::List(Rc::new(RefCell::new(items)))
    }

    /// A tuple of `items`.
    pub fn tuple(items: Vec<Value>) -> Value {
        Value::Tuple(Rc::from(items))
    }

    /// A dict with str keys, in the order given.
    pub fn dict(pairs: Vec<(&str, Value)>) -> Value {
        let items = pairs.into_iter().map(|(k, v)| (Value::str(k), v)).collect();
        Value::Dict(Rc::new(RefCell::new(items)))
    }

    /// An int.
    pub fn int(i: impl Into<i128>) -> Value {
        Value::Int(i.into())
    }

    /// Whether dropping this value would drop other values with it: a container whose `Rc` (or
    /// one of an object's) is held here alone. `Drop` moves those onto its heap stack; shared
    /// ones only lose a count.
    fn owns_alone(&self) -> bool {
        match self {
            Value::List(rc) | Value::Set(rc) => Rc::strong_count(rc) == 1,
            Value::Dict(rc) => Rc::strong_count(rc) == 1,
            Value::Tuple(rc) => Rc::strong_count(rc) == 1,
            Value::Object { class, args, state } => {
                Rc::strong_count(class) == 1
                    || Rc::strong_count(args) == 1
                    || Rc::strong_count(state) == 1
            }
            _ => false,
        }
    }

    /// Moves the children that [`Self::owns_alone`] of a container held here alone into `out`.
    fn take_children(&mut self, out: &mut Vec<Value>) {
        let keep = |v: &Value| v.owns_alone();
        match self {
            Value::List(rc) | Value::Set(rc) => {
                if let (1, Ok(mut items)) = (Rc::strong_count(rc), rc.try_borrow_mut()) {
                    out.extend(items.drain(..).filter(keep));
                }
            }
            Value::Dict(rc) => {
                if let (1, Ok(mut items)) = (Rc::strong_count(rc), rc.try_borrow_mut()) {
                    for (k, v) in items.drain(..) {
                        out.extend([k, v].into_iter().filter(keep));
                    }
                }
            }
            Value::Tuple(rc) => {
                if let Some(items) = Rc::get_mut(rc) {
                    out.extend(
                        items
                            .iter_mut()
                            .filter(|v| v.owns_alone())
                            .map(std::mem::take),
                    );
                }
            }
            Value::Object { class, args, state } => {
                for rc in [class, args] {
                    if let Some(v) = Rc::get_mut(rc) {
                        out.push(std::mem::take(v));
                    }
                }
                if let (1, Ok(mut v)) = (Rc::strong_count(state), state.try_borrow_mut()) {
                    out.extend(v.take());
                }
            }
            _ => {}
        }
    }
}

impl Drop for Value {
    /// Iterative, so that dropping a deeply nested value cannot overflow the stack: children of
    /// containers owned alone go to a heap stack instead of being dropped recursively.
    fn drop(&mut self) {
        if !self.owns_alone() {
            return;
        }
        let mut pending = Vec::new();
        self.take_children(&mut pending);
        while let Some(mut v) = pending.pop() {
            v.take_children(&mut pending);
        }
    }
}

/// How deep `Debug` goes before printing `…`.
const DEBUG_DEPTH: usize = 64;
/// How many values `Debug` prints in all before printing `…`.
const DEBUG_VALUES: usize = 10_000;

impl fmt::Debug for Value {
    /// Python-like notation, bounded in depth and size (so cycles end).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        debug(self, f, 0, &Cell::new(DEBUG_VALUES))
    }
}

fn debug(v: &Value, f: &mut fmt::Formatter<'_>, depth: usize, left: &Cell<usize>) -> fmt::Result {
    if depth >= DEBUG_DEPTH || left.get() == 0 {
        return f.write_str("…");
    }
    left.set(left.get() - 1);
    let items = |f: &mut fmt::Formatter<'_>, items: &[Value]| {
        for (i, item) in items.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            debug(item, f, depth + 1, left)?;
        }
        Ok(())
    };
    match v {
        Value::None => f.write_str("None"),
        Value::Bool(b) => f.write_str(if *b { "True" } else { "False" }),
        Value::Int(i) => write!(f, "{i}"),
        Value::BigInt => f.write_str("<int beyond i128>"),
        Value::Float(x) => write!(f, "{x:?}"),
        Value::Str(s) => write!(f, "{:?}", &**s),
        Value::Bytes(b) => write!(f, "b\"{}\"", b.escape_ascii()),
        Value::List(l) => {
            f.write_str("[")?;
            items(f, &l.borrow())?;
            f.write_str("]")
        }
        Value::Tuple(t) => {
            f.write_str("(")?;
            items(f, t)?;
            f.write_str(if t.len() == 1 { ",)" } else { ")" })
        }
        Value::Set(s) => {
            f.write_str("{")?;
            items(f, &s.borrow())?;
            f.write_str("}")
        }
        Value::Dict(d) => {
            f.write_str("{")?;
            for (i, (k, v)) in d.borrow().iter().enumerate() {
                f.write_str(if i > 0 { ", " } else { "" })?;
                debug(k, f, depth + 1, left)?;
                f.write_str(": ")?;
                debug(v, f, depth + 1, left)?;
            }
            f.write_str("}")
        }
        Value::Global { module, name } => write!(f, "{module}.{name}"),
        Value::Object { class, args, state } => {
            f.write_str("<object ")?;
            debug(class, f, depth + 1, left)?;
            f.write_str(" ")?;
            debug(args, f, depth + 1, left)?;
            if let Some(state) = &*state.borrow() {
                f.write_str(" state ")?;
                debug(state, f, depth + 1, left)?;
            }
            f.write_str(">")
        }
    }
}

/// An error reading a pickle: where, and what.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Error {
    /// The offset of the opcode that failed (the input's length when `STOP` is missing).
    pub offset: u64,
    /// What went wrong.
    pub message: String,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "at byte {}: {}", self.offset, self.message)
    }
}

impl std::error::Error for Error {}

macro_rules! opcodes {
    ($($name:ident = $byte:literal,)*) => {
        /// The opcodes (pickletools' names), including those only named in errors.
        #[allow(dead_code)]
        mod op {
            $(pub(super) const $name: u8 = $byte;)*
        }
        /// The name of an opcode byte, for messages.
        fn opcode_name(byte: u8) -> &'static str {
            match byte {
                $($byte => stringify!($name),)*
                _ => "unknown",
            }
        }
    };
}

opcodes! {
    MARK = b'(', STOP = b'.', POP = b'0', POP_MARK = b'1', DUP = b'2', FLOAT = b'F', INT = b'I',
    BININT = b'J', BININT1 = b'K', LONG = b'L', BININT2 = b'M', NONE = b'N', PERSID = b'P',
    BINPERSID = b'Q', REDUCE = b'R', STRING = b'S', BINSTRING = b'T', SHORT_BINSTRING = b'U',
    UNICODE = b'V', BINUNICODE = b'X', APPEND = b'a', BUILD = b'b', GLOBAL = b'c', DICT = b'd',
    EMPTY_DICT = b'}', APPENDS = b'e', GET = b'g', BINGET = b'h', INST = b'i', LONG_BINGET = b'j',
    LIST = b'l', EMPTY_LIST = b']', OBJ = b'o', PUT = b'p', BINPUT = b'q', LONG_BINPUT = b'r',
    SETITEM = b's', TUPLE = b't', EMPTY_TUPLE = b')', SETITEMS = b'u', BINFLOAT = b'G',
    PROTO = 0x80, NEWOBJ = 0x81, EXT1 = 0x82, EXT2 = 0x83, EXT4 = 0x84, TUPLE1 = 0x85,
    TUPLE2 = 0x86, TUPLE3 = 0x87, NEWTRUE = 0x88, NEWFALSE = 0x89, LONG1 = 0x8a, LONG4 = 0x8b,
    BINBYTES = b'B', SHORT_BINBYTES = b'C', SHORT_BINUNICODE = 0x8c, BINUNICODE8 = 0x8d,
    BINBYTES8 = 0x8e, EMPTY_SET = 0x8f, ADDITEMS = 0x90, FROZENSET = 0x91, NEWOBJ_EX = 0x92,
    STACK_GLOBAL = 0x93, MEMOIZE = 0x94, FRAME = 0x95, BYTEARRAY8 = 0x96, NEXT_BUFFER = 0x97,
    READONLY_BUFFER = 0x98,
}
