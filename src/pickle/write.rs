//! The writer: protocol 4, memoizing by pointer, on an explicit task stack.

use std::cell::RefCell;
use std::rc::Rc;

use rustc_hash::FxHashMap;

use super::{op, Value};

/// Writes `value` as a protocol 4 pickle (without frames), memoizing shared values by pointer.
pub fn to_vec(value: &Value) -> Vec<u8> {
    let mut w = Writer {
        out: vec![op::PROTO, 4],
        memo: FxHashMap::default(),
        tasks: Vec::new(),
    };
    w.value(value, 1);
    while let Some(task) = w.tasks.pop() {
        match task {
            Task::Value(v) => w.value(&v, 2),
            Task::Op(code) => w.out.push(code),
            Task::Items(v, pos) => w.items(v, pos),
            Task::TupleEnd(t) => w.tuple_end(&t),
            Task::ReduceEnd(state) => w.reduce_end(&state),
        }
    }
    w.out.push(op::STOP);
    w.out
}

/// Items per `APPENDS`/`SETITEMS`/`ADDITEMS`, as in Python.
const BATCH: usize = 1000;

/// A memo key: the address of an `Rc`'s allocation (aligned to 8 at least), with the variant in
/// its low bits, so that a list and a set on one `Rc` stay apart.
fn key<T: ?Sized>(rc: &Rc<T>, tag: usize) -> usize {
    Rc::as_ptr(rc).cast::<u8>() as usize | tag
}

/// The memo key of a value that `to_vec` memoizes by identity, and whether it has items.
fn identity(v: &Value) -> Option<usize> {
    match v {
        Value::List(l) => Some(key(l, 2)),
        Value::Dict(d) => Some(key(d, 3)),
        Value::Set(s) => Some(key(s, 4)),
        Value::Tuple(t) if !t.is_empty() => Some(key(t, 5)),
        Value::Object { state, .. } => Some(key(state, 6)),
        _ => None,
    }
}

enum Task {
    /// A value to write, held by this task too.
    Value(Value),
    Op(u8),
    /// The items of a list, dict or set from `pos` on; for a dict `pos` counts keys and values.
    Items(Value, usize),
    /// After the items of a tuple.
    TupleEnd(Rc<[Value]>),
    /// After the class and args of an object.
    ReduceEnd(Rc<RefCell<Option<Value>>>),
}

/// The writer: output, memo (key to index), and the tasks left, the next on top. Every `Rc` in
/// the memo is reachable from the value written, so its address stays unique for the whole write.
struct Writer {
    out: Vec<u8>,
    memo: FxHashMap<usize, u64>,
    tasks: Vec<Task>,
}

/// A borrowed list, set or dict, indexed by value (a dict's key `i` is at `2i`, its value next).
enum Items<'a> {
    Seq(std::cell::Ref<'a, Vec<Value>>),
    Pairs(std::cell::Ref<'a, Vec<(Value, Value)>>),
}

impl Items<'_> {
    fn len(&self) -> usize {
        match self {
            Items::Seq(v) => v.len(),
            Items::Pairs(p) => 2 * p.len(),
        }
    }

    fn at(&self, i: usize) -> &Value {
        match self {
            Items::Seq(v) => &v[i],
            Items::Pairs(p) if i.is_multiple_of(2) => &p[i / 2].0,
            Items::Pairs(p) => &p[i / 2].1,
        }
    }
}

impl Writer {
    fn memoize(&mut self, key: usize) {
        let index = self.memo.len() as u64;
        self.memo.insert(key, index);
        self.out.push(op::MEMOIZE);
    }

    /// Writes a memo reference if `key` is memoized.
    fn fetch(&mut self, key: usize) -> bool {
        let Some(&index) = self.memo.get(&key) else {
            return false;
        };
        if let Ok(i) = u8::try_from(index) {
            self.out.extend([op::BINGET, i]);
        } else if let Ok(i) = u32::try_from(index) {
            self.out.push(op::LONG_BINGET);
            self.out.extend(i.to_le_bytes());
        } else {
            self.out.extend(format!("g{index}\n").bytes());
        }
        true
    }

    fn sized(&mut self, codes: [u8; 3], data: &[u8]) {
        if let Ok(n) = u8::try_from(data.len()) {
            self.out.extend([codes[0], n]);
        } else if let Ok(n) = u32::try_from(data.len()) {
            self.out.push(codes[1]);
            self.out.extend(n.to_le_bytes());
        } else {
            self.out.push(codes[2]);
            self.out.extend((data.len() as u64).to_le_bytes());
        }
        self.out.extend_from_slice(data);
    }

    fn int(&mut self, i: i128) {
        if let Ok(v) = u8::try_from(i) {
            self.out.extend([op::BININT1, v]);
        } else if let Ok(v) = u16::try_from(i) {
            self.out.push(op::BININT2);
            self.out.extend(v.to_le_bytes());
        } else if let Ok(v) = i32::try_from(i) {
            self.out.push(op::BININT);
            self.out.extend(v.to_le_bytes());
        } else {
            // Minimal two's complement: drop sign-extension bytes.
            let b = i.to_le_bytes();
            let mut n = b.len();
            while n > 1
                && ((b[n - 1] == 0 && b[n - 2] < 0x80) || (b[n - 1] == 0xff && b[n - 2] >= 0x80))
            {
                n -= 1;
            }
            self.out.extend([op::LONG1, n as u8]);
            self.out.extend_from_slice(&b[..n]);
        }
    }

    /// Writes `v`, held `held` times by the writer itself (1 when borrowed, 2 in a task): a
    /// container is memoized and its items go to tasks; a str or bytes held elsewhere too is
    /// memoized.
    fn value(&mut self, v: &Value, held: usize) {
        if !self.inline(v, held) {
            self.open(v);
        }
    }

    /// Writes `v` if that needs no tasks: a leaf, or a memo reference. False for a container
    /// not written yet.
    fn inline(&mut self, v: &Value, held: usize) -> bool {
        if let Some(key) = identity(v) {
            return self.fetch(key);
        }
        match v {
            Value::None => self.out.push(op::NONE),
            Value::Bool(b) => self.out.push(if *b { op::NEWTRUE } else { op::NEWFALSE }),
            Value::Int(i) => self.int(*i),
            // 2**127, the smallest int beyond i128.
            Value::BigInt => self
                .out
                .extend(b"\x8a\x11\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\x80\0"),
            Value::Float(f) => {
                self.out.push(op::BINFLOAT);
                self.out.extend(f.to_be_bytes());
            }
            Value::Str(s) => {
                let shared = Rc::strong_count(s) > held;
                if !(shared && self.fetch(key(s, 0))) {
                    self.sized(
                        [op::SHORT_BINUNICODE, op::BINUNICODE, op::BINUNICODE8],
                        s.as_bytes(),
                    );
                    if shared {
                        self.memoize(key(s, 0));
                    }
                }
            }
            Value::Bytes(b) => {
                let shared = Rc::strong_count(b) > held;
                if !(shared && self.fetch(key(b, 1))) {
                    self.sized([op::SHORT_BINBYTES, op::BINBYTES, op::BINBYTES8], b);
                    if shared {
                        self.memoize(key(b, 1));
                    }
                }
            }
            Value::Global { module, name } => {
                self.sized(
                    [op::SHORT_BINUNICODE, op::BINUNICODE, op::BINUNICODE8],
                    module.as_bytes(),
                );
                self.sized(
                    [op::SHORT_BINUNICODE, op::BINUNICODE, op::BINUNICODE8],
                    name.as_bytes(),
                );
                self.out.push(op::STACK_GLOBAL);
            }
            // An empty tuple, the only container without an identity.
            _ => self.out.push(op::EMPTY_TUPLE),
        }
        true
    }

    /// Starts a container that is not memoized yet: a list, dict or set is written empty and
    /// memoized before its items, so that its items may refer to it.
    fn open(&mut self, v: &Value) {
        let empty = match v {
            Value::List(_) => op::EMPTY_LIST,
            Value::Dict(_) => op::EMPTY_DICT,
            Value::Set(_) => op::EMPTY_SET,
            Value::Tuple(t) => {
                if t.len() > 3 {
                    self.out.push(op::MARK);
                }
                self.tasks.push(Task::TupleEnd(t.clone()));
                self.tasks.extend(t.iter().rev().cloned().map(Task::Value));
                return;
            }
            Value::Object { class, args, state } => {
                self.tasks.push(Task::ReduceEnd(state.clone()));
                self.tasks.push(Task::Value((**args).clone()));
                self.tasks.push(Task::Value((**class).clone()));
                return;
            }
            _ => return,
        };
        self.out.push(empty);
        if let Some(key) = identity(v) {
            self.memoize(key);
        }
        self.tasks.push(Task::Items(v.clone(), 0));
    }

    /// Writes the items of `v` from `pos` on, in batches of [`BATCH`], until one needs tasks of
    /// its own: then this continues after them.
    fn items(&mut self, v: Value, mut pos: usize) {
        let (items, per, one, many) = match &v {
            Value::List(l) => (Items::Seq(l.borrow()), 1, op::APPEND, op::APPENDS),
            Value::Set(s) => (Items::Seq(s.borrow()), 1, op::ADDITEMS, op::ADDITEMS),
            Value::Dict(d) => (Items::Pairs(d.borrow()), 2, op::SETITEM, op::SETITEMS),
            _ => return,
        };
        let len = items.len();
        while pos < len {
            let start = pos - pos % (BATCH * per);
            let end = len.min(start + BATCH * per);
            let close = if end - start > per || one == many {
                many
            } else {
                one
            };
            if pos == start && close == many {
                self.out.push(op::MARK);
            }
            let item = items.at(pos);
            pos += 1;
            if self.inline(item, 1) {
                if pos == end {
                    self.out.push(close);
                }
                continue;
            }
            if pos < len {
                self.tasks.push(Task::Items(v.clone(), pos));
            }
            if pos == end {
                self.tasks.push(Task::Op(close));
            }
            self.open(item);
            return;
        }
    }

    fn tuple_end(&mut self, t: &Rc<[Value]>) {
        let n = t.len();
        if self.memo.contains_key(&key(t, 5)) {
            // Written again inside its own items (through a list): drop this copy.
            if n <= 3 {
                self.out.extend(std::iter::repeat_n(op::POP, n));
            } else {
                self.out.push(op::POP_MARK);
            }
            self.fetch(key(t, 5));
        } else {
            self.out.push(if n <= 3 {
                op::TUPLE1 + n as u8 - 1
            } else {
                op::TUPLE
            });
            self.memoize(key(t, 5));
        }
    }

    fn reduce_end(&mut self, state: &Rc<RefCell<Option<Value>>>) {
        self.out.push(op::REDUCE);
        if self.memo.contains_key(&key(state, 6)) {
            // Written again inside its own class or args: drop this copy.
            self.out.push(op::POP);
            self.fetch(key(state, 6));
            return;
        }
        self.memoize(key(state, 6));
        if let Some(s) = state.borrow().clone() {
            self.tasks.push(Task::Op(op::BUILD));
            self.tasks.push(Task::Value(s));
        }
    }
}
