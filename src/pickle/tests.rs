//! Tests of the pickle reader and writer: round trips, CPython's bytes, hostile input.

use std::cell::RefCell;
use std::rc::Rc;

use super::*;

/// Structural equality, for the acyclic values of these tests.
fn same(a: &Value, b: &Value) -> bool {
    let all =
        |a: &[Value], b: &[Value]| a.len() == b.len() && a.iter().zip(b).all(|(a, b)| same(a, b));
    match (a, b) {
        (Value::None, Value::None) | (Value::BigInt, Value::BigInt) => true,
        (Value::Bool(a), Value::Bool(b)) => a == b,
        (Value::Int(a), Value::Int(b)) => a == b,
        (Value::Float(a), Value::Float(b)) => a.to_bits() == b.to_bits(),
        (Value::Str(a), Value::Str(b)) => a == b,
        (Value::Bytes(a), Value::Bytes(b)) => a == b,
        (Value::List(a), Value::List(b)) | (Value::Set(a), Value::Set(b)) => {
            all(&a.borrow(), &b.borrow())
        }
        (Value::Tuple(a), Value::Tuple(b)) => all(a, b),
        (Value::Dict(a), Value::Dict(b)) => {
            let (a, b) = (a.borrow(), b.borrow());
            a.len() == b.len()
                && a.iter()
                    .zip(b.iter())
                    .all(|((ka, va), (kb, vb))| same(ka, kb) && same(va, vb))
        }
        (
            Value::Global {
                module: ma,
                name: na,
            },
            Value::Global {
                module: mb,
                name: nb,
            },
        ) => ma == mb && na == nb,
        (
            Value::Object {
                class: ca,
                args: aa,
                state: sa,
            },
            Value::Object {
                class: cb,
                args: ab,
                state: sb,
            },
        ) => {
            same(ca, cb)
                && same(aa, ab)
                && match (&*sa.borrow(), &*sb.borrow()) {
                    (None, None) => true,
                    (Some(a), Some(b)) => same(a, b),
                    _ => false,
                }
        }
        _ => false,
    }
}

fn round_trip(v: &Value) -> Value {
    let bytes = to_vec(v);
    let back = from_slice(&bytes).unwrap_or_else(|e| panic!("{e} reading back {v:?}"));
    assert!(same(v, &back), "{v:?} came back as {back:?}");
    back
}

fn list_rc(v: &Value) -> Rc<RefCell<Vec<Value>>> {
    match v {
        Value::List(l) => l.clone(),
        other => panic!("{other:?} is not a list"),
    }
}

fn global(module: &str, name: &str) -> Value {
    Value::Global {
        module: Rc::from(module),
        name: Rc::from(name),
    }
}

#[test]
fn round_trip_keeps_nesting_and_sharing() {
    let frame = Value::dict(vec![
        ("filename", Value::str("a.py")),
        ("line", Value::int(3)),
        ("name", Value::str("f")),
    ]);
    let frames = Value::list(vec![
        frame.clone(),
        frame.clone(),
        Value::tuple(vec![Value::None, Value::Float(-0.5)]),
    ]);
    let entries: Vec<Value> = (0..1500)
        .map(|i| {
            Value::dict(vec![
                ("addr", Value::int(i * 512)),
                ("frames", frames.clone()),
            ])
        })
        .collect();
    let v = Value::dict(vec![
        ("entries", Value::list(entries)),
        ("again", frames.clone()),
        (
            "set",
            Value::Set(Rc::new(RefCell::new(vec![Value::int(1), Value::str("x")]))),
        ),
        ("bytes", Value::bytes(&[0, 1, 255])),
        ("long", Value::str(&"é".repeat(400))),
        (
            "tuples",
            Value::list(
                (0..6)
                    .map(|n| Value::tuple((0..n).map(Value::int).collect()))
                    .collect(),
            ),
        ),
        (
            "flags",
            Value::list(vec![
                Value::Bool(true),
                Value::Bool(false),
                Value::None,
                Value::BigInt,
            ]),
        ),
        ("object", {
            let o = read::object(global("m", "C"), Value::tuple(vec![Value::int(1)]));
            if let Value::Object { state, .. } = &o {
                *state.borrow_mut() = Some(Value::dict(vec![("x", Value::int(2))]));
            }
            o
        }),
        ("global", global("builtins", "len")),
    ]);
    let bytes = to_vec(&v);
    // 1500 entries share one frames list: each is written as a memo reference, not a copy.
    assert!(bytes.len() < 1500 * 30, "{} bytes", bytes.len());
    let back = round_trip(&v);
    let first = list_rc(&back.get("again").unwrap());
    for e in back.get("entries").unwrap().as_list().unwrap() {
        assert!(Rc::ptr_eq(&first, &list_rc(&e.get("frames").unwrap())));
    }
    let frames = first.borrow();
    match (&frames[0], &frames[1]) {
        (Value::Dict(a), Value::Dict(b)) => assert!(Rc::ptr_eq(a, b)),
        other => panic!("{other:?}"),
    }
}

#[test]
fn ints_round_trip_at_every_boundary() {
    let mut ints: Vec<i128> = vec![0, 1, 255, 256, 65535, 65536, -1, -128, -129, -256, -257];
    for b in [
        i32::MIN as i128,
        i32::MAX as i128,
        i64::MIN as i128,
        i64::MAX as i128,
        u64::MAX as i128,
        i128::MIN,
        i128::MAX,
    ] {
        ints.extend(
            [b.checked_sub(1), Some(b), b.checked_add(1)]
                .into_iter()
                .flatten(),
        );
    }
    for shift in 0..127 {
        ints.extend([
            1i128 << shift,
            -(1i128 << shift),
            (1i128 << shift) - 1,
            -(1i128 << shift) - 1,
        ]);
    }
    for i in ints {
        round_trip(&Value::Int(i));
    }
    round_trip(&Value::BigInt);
    // As CPython writes them.
    assert_eq!(
        to_vec(&Value::int(-(1i128 << 70))),
        b"\x80\x04\x8a\x09\x00\x00\x00\x00\x00\x00\x00\x00\xc0."
    );
    assert_eq!(
        to_vec(&Value::int(u64::MAX)),
        b"\x80\x04\x8a\x09\xff\xff\xff\xff\xff\xff\xff\xff\x00."
    );
    assert_eq!(
        to_vec(&Value::int(1i128 << 31)),
        b"\x80\x04\x8a\x05\x00\x00\x00\x80\x00."
    );
    assert_eq!(to_vec(&Value::int(-1)), b"\x80\x04J\xff\xff\xff\xff.");
    assert_eq!(to_vec(&Value::int(300)), b"\x80\x04M\x2c\x01.");
    // Beyond i128, in every encoding.
    let mut beyond = b"\x80\x04\x8a\x11".to_vec();
    beyond.extend([0; 15]);
    beyond.extend([0x80, 0, b'.']);
    assert!(matches!(from_slice(&beyond), Ok(Value::BigInt)));
    assert!(matches!(
        from_slice(b"I170141183460469231731687303715884105728\n."),
        Ok(Value::BigInt)
    ));
    assert!(matches!(
        from_slice(b"L-170141183460469231731687303715884105729L\n."),
        Ok(Value::BigInt)
    ));
    assert_eq!(
        from_slice(b"L-170141183460469231731687303715884105728L\n.")
            .unwrap()
            .as_int(),
        Some(i128::MIN)
    );
    // Redundant sign bytes do not make an int big; LONG4 and an empty LONG1 too.
    let mut padded = b"\x80\x04\x8b\x14\x00\x00\x00".to_vec();
    padded.extend([0; 15]);
    padded.extend([0x80, 0xff, 0xff, 0xff, 0xff, b'.']);
    assert_eq!(from_slice(&padded).unwrap().as_int(), Some(i128::MIN));
    assert_eq!(from_slice(b"\x80\x02\x8a\x00.").unwrap().as_int(), Some(0));
    assert_eq!(from_slice(b"I-42\n.").unwrap().as_int(), Some(-42));
    assert_eq!(from_slice(b"I01\n.").unwrap().as_bool(), Some(true));
    assert_eq!(from_slice(b"I00\n.").unwrap().as_bool(), Some(false));
    assert_eq!(from_slice(b"I0\n.").unwrap().as_int(), Some(0));
    assert!(from_slice(b"I1x\n.").is_err());
}

// Generated with CPython 3.11: `pickle.dumps(obj, protocol=P)` for
// L = [1, 'a']; obj = {'frames': L, 'again': L, 'fs': frozenset({1}), 'f': 1.5, 't': True,
//   'n': None, 'big': -2**70, 'u': 'h\u00e9llo \u2713 \U0001F600', 'tup': (1, 2)}
const P0: &[u8] =
    b"(dp0\nVframes\np1\n(lp2\nI1\naVa\np3\nasVagain\np4\ng2\nsVfs\np5\nc__builtin__\nfrozense\
    t\np6\n((lp7\nI1\natp8\nRp9\nsVf\np10\nF1.5\nsVt\np11\nI01\nsVn\np12\nNsVbig\np13\nL-118\
    0591620717411303424L\nsVu\np14\nVh\xe9llo\x20\\u2713\x20\\U0001f600\np15\nsVtup\np16\n(I\
    1\nI2\ntp17\ns.";
const P2: &[u8] =
    b"\x80\x02}q\x00(X\x06\x00\x00\x00framesq\x01]q\x02(K\x01X\x01\x00\x00\x00aq\x03eX\x05\x00\
    \x00\x00againq\x04h\x02X\x02\x00\x00\x00fsq\x05c__builtin__\nfrozenset\nq\x06]q\x07K\x01\
    a\x85q\x08Rq\x09X\x01\x00\x00\x00fq\nG?\xf8\x00\x00\x00\x00\x00\x00X\x01\x00\x00\x00tq\
    \x0b\x88X\x01\x00\x00\x00nq\x0cNX\x03\x00\x00\x00bigq\x0d\x8a\x09\x00\x00\x00\x00\x00\
    \x00\x00\x00\xc0X\x01\x00\x00\x00uq\x0eX\x0f\x00\x00\x00h\xc3\xa9llo\x20\xe2\x9c\x93\x20\
    \xf0\x9f\x98\x80q\x0fX\x03\x00\x00\x00tupq\x10K\x01K\x02\x86q\x11u.";
const P4: &[u8] =
    b"\x80\x04\x95v\x00\x00\x00\x00\x00\x00\x00}\x94(\x8c\x06frames\x94]\x94(K\x01\x8c\x01a\
    \x94e\x8c\x05again\x94h\x02\x8c\x02fs\x94(K\x01\x91\x94\x8c\x01f\x94G?\xf8\x00\x00\x00\
    \x00\x00\x00\x8c\x01t\x94\x88\x8c\x01n\x94N\x8c\x03big\x94\x8a\x09\x00\x00\x00\x00\x00\
    \x00\x00\x00\xc0\x8c\x01u\x94\x8c\x0fh\xc3\xa9llo\x20\xe2\x9c\x93\x20\xf0\x9f\x98\x80\
    \x94\x8c\x03tup\x94K\x01K\x02\x86\x94u.";
const P5: &[u8] =
    b"\x80\x05\x95v\x00\x00\x00\x00\x00\x00\x00}\x94(\x8c\x06frames\x94]\x94(K\x01\x8c\x01a\
    \x94e\x8c\x05again\x94h\x02\x8c\x02fs\x94(K\x01\x91\x94\x8c\x01f\x94G?\xf8\x00\x00\x00\
    \x00\x00\x00\x8c\x01t\x94\x88\x8c\x01n\x94N\x8c\x03big\x94\x8a\x09\x00\x00\x00\x00\x00\
    \x00\x00\x00\xc0\x8c\x01u\x94\x8c\x0fh\xc3\xa9llo\x20\xe2\x9c\x93\x20\xf0\x9f\x98\x80\
    \x94\x8c\x03tup\x94K\x01K\x02\x86\x94u.";
const RECURSIVE_TUPLE: &[u8] =
    b"\x80\x04\x95\x0b\x00\x00\x00\x00\x00\x00\x00]\x94h\x00\x85\x94a0h\x01.";

fn expected(fs: Value) -> Value {
    let l = Value::list(vec![Value::int(1), Value::str("a")]);
    Value::dict(vec![
        ("frames", l.clone()),
        ("again", l),
        ("fs", fs),
        ("f", Value::Float(1.5)),
        ("t", Value::Bool(true)),
        ("n", Value::None),
        ("big", Value::int(-(1i128 << 70))),
        ("u", Value::str("héllo ✓ 😀")),
        ("tup", Value::tuple(vec![Value::int(1), Value::int(2)])),
    ])
}

#[test]
fn reads_cpython_pickles() {
    // Before protocol 4, a frozenset is pickled as a call of `frozenset([1])`.
    let call = read::object(
        global("__builtin__", "frozenset"),
        Value::tuple(vec![Value::list(vec![Value::int(1)])]),
    );
    let set = Value::Set(Rc::new(RefCell::new(vec![Value::int(1)])));
    for (bytes, fs) in [(P0, call.clone()), (P2, call), (P4, set.clone()), (P5, set)] {
        let v = from_slice(bytes).unwrap();
        let want = expected(fs);
        assert!(same(&v, &want), "{v:?} is not {want:?}");
        assert!(Rc::ptr_eq(
            &list_rc(&v.get("frames").unwrap()),
            &list_rc(&v.get("again").unwrap())
        ));
        round_trip(&v);
    }
    // ([(...)],): a tuple inside a list inside the tuple.
    let t = from_slice(RECURSIVE_TUPLE).unwrap();
    let Value::Tuple(items) = &t else {
        panic!("{t:?}")
    };
    let inner = list_rc(&items[0]);
    assert!(matches!(&inner.borrow()[0], Value::Tuple(again) if Rc::ptr_eq(items, again)));
    let back = from_slice(&to_vec(&t)).unwrap();
    let Value::Tuple(back_items) = &back else {
        panic!("{back:?}")
    };
    let back_inner = list_rc(&back_items[0]);
    assert!(
        matches!(&back_inner.borrow()[0], Value::Tuple(again) if Rc::ptr_eq(back_items, again))
    );
    // Break the cycles so the test does not leak.
    inner.borrow_mut().clear();
    back_inner.borrow_mut().clear();
}

#[test]
fn reads_protocol_0_and_1_details() {
    let v = from_slice(b"S'a\\n\\x41\\101\\'\\q'\n.").unwrap();
    assert_eq!(v.as_str().as_deref(), Some("a\nAA'\\q"));
    assert!(
        matches!(from_slice(b"U\x02\xff\xfe."), Ok(Value::Bytes(ref b)) if **b == [0xff, 0xfe])
    );
    assert_eq!(
        from_slice(b"V\\u00e9\\\\u\xe9\\U0001f600\n.")
            .unwrap()
            .as_str()
            .as_deref(),
        Some("é\\\\u\u{e9}😀")
    );
    assert!(from_slice(b"V\\ud800\n.").is_err(), "a lone surrogate");
    assert!(from_slice(b"V\\u12\n.").is_err());
    assert!(from_slice(b"Sabc\n.").is_err(), "unquoted");
    assert_eq!(from_slice(b"F-2.5\n.").unwrap().as_f64(), Some(-2.5));
    assert!(from_slice(b"Finf\n.")
        .unwrap()
        .as_f64()
        .unwrap()
        .is_infinite());
    let o = from_slice(b"(I1\nimod\nCls\n(dS'k'\nI2\nsb.").unwrap();
    let Value::Object { class, args, state } = &o else {
        panic!("{o:?}")
    };
    assert!(same(class, &global("mod", "Cls")));
    assert!(same(args, &Value::tuple(vec![Value::int(1)])));
    assert_eq!(
        state
            .borrow()
            .as_ref()
            .and_then(|s| s.get("k"))
            .and_then(|v| v.as_int()),
        Some(2)
    );
    // BUILD after memoizing (as Python writes it) sets the state seen through the memo.
    let v = from_slice(b"\x80\x02(cm\nC\nq\x00)\x81q\x01}b0h\x01N\x86.").unwrap();
    let items = v.as_list().unwrap();
    assert!(matches!(&items[0], Value::Object { state, .. } if state.borrow().is_some()));
    // Bytes after STOP are ignored, as pickle.loads does; STOP inside a MARK is fine.
    assert!(from_slice(b"N.garbage").unwrap().is_none());
    assert!(from_slice(b"(((N.").unwrap().is_none());
    assert!(from_slice(b"\x80\x06N.").is_err());
    // Dicts: the later duplicate wins, bytes keys match too.
    let d = from_slice(b"}(X\x01\x00\x00\x00kK\x01C\x01kK\x02C\x01bK\x03u.").unwrap();
    assert_eq!(d.get("k").and_then(|v| v.as_int()), Some(2));
    assert_eq!(d.get("b").and_then(|v| v.as_int()), Some(3));
    assert!(d.get("x").is_none() && Value::None.get("k").is_none());
    assert_eq!(
        (d.kind(), Value::BigInt.kind(), Value::int(1).kind()),
        ("a dict", "an int beyond i128", "an int")
    );
    // Memo indexes far apart, then MEMOIZE counting them.
    let v =
        from_slice(b"K\x07p4000000000\n0K\x08\x940K\x09p0\n0(g4000000000\ng1\nj\x00\x00\x00\x00l.")
            .unwrap();
    let ints: Vec<_> = v
        .as_list()
        .unwrap()
        .iter()
        .map(|v| v.as_int().unwrap())
        .collect();
    assert_eq!(ints, [7, 8, 9]);
}

#[test]
fn cpython_reads_the_output() {
    let python = std::process::Command::new("python3")
        .args(["-c", "import sys; print(sys.version_info >= (3, 8))"])
        .output();
    if !matches!(&python, Ok(o) if o.stdout.starts_with(b"True")) {
        eprintln!("skipped: python3 (3.8 or newer) is not on PATH");
        return;
    }
    let shared = Value::list(vec![Value::int(1), Value::str("a")]);
    let selfref = Value::list(Vec::new());
    list_rc(&selfref).borrow_mut().push(selfref.clone());
    let l2 = Value::list(Vec::new());
    let rt = Value::tuple(vec![l2.clone()]);
    list_rc(&l2).borrow_mut().push(rt.clone());
    let ints = [
        0i128,
        255,
        256,
        65535,
        65536,
        -1,
        -(1 << 31),
        (1 << 31) - 1,
        1 << 31,
        -(1 << 31) - 1,
        1 << 63,
    ];
    let mut ints: Vec<Value> = ints.into_iter().map(Value::int).collect();
    ints.extend([
        Value::int(u64::MAX),
        Value::int(-(1i128 << 70)),
        Value::int(i128::MIN),
        Value::int(i128::MAX),
    ]);
    let v = Value::dict(vec![
        ("ints", Value::list(ints)),
        ("s", Value::str("héllo ✓ 😀")),
        ("f", Value::Float(1.5)),
        ("t", Value::Bool(true)),
        ("n", Value::None),
        ("tup", Value::tuple(vec![Value::int(1), Value::str("a")])),
        ("tup5", Value::tuple((1..=5).map(Value::int).collect())),
        ("b", Value::bytes(&[0, 255])),
        (
            "set",
            Value::Set(Rc::new(RefCell::new(vec![Value::int(7)]))),
        ),
        ("shared", Value::list(vec![shared.clone(), shared])),
        ("selfref", selfref.clone()),
        ("rt", rt),
        ("big", Value::BigInt),
        ("many", Value::list((0..2500).map(Value::int).collect())),
        ("long", Value::str(&"x".repeat(70_000))),
        (
            "bigdict",
            Value::Dict(Rc::new(RefCell::new(
                (0..1500).map(|i| (Value::int(i), Value::int(i))).collect(),
            ))),
        ),
    ]);
    let script = "import pickle, sys\n\
        v = pickle.loads(sys.stdin.buffer.read())\n\
        many, long, bigdict = v.pop('many'), v.pop('long'), v.pop('bigdict')\n\
        print(repr(v))\n\
        print(len(many), sum(many), len(long), len(bigdict), sum(bigdict.values()))\n\
        print(v['shared'][0] is v['shared'][1], v['selfref'][0] is v['selfref'], v['rt'][0][0] is v['rt'])\n";
    let mut child = std::process::Command::new("python3")
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let bytes = to_vec(&v);
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), &bytes).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let want = "{'ints': [0, 255, 256, 65535, 65536, -1, -2147483648, 2147483647, 2147483648, -2147483649, \
        9223372036854775808, 18446744073709551615, -1180591620717411303424, \
        -170141183460469231731687303715884105728, 170141183460469231731687303715884105727], \
        's': 'héllo ✓ 😀', 'f': 1.5, 't': True, 'n': None, 'tup': (1, 'a'), 'tup5': (1, 2, 3, 4, 5), \
        'b': b'\\x00\\xff', 'set': {7}, 'shared': [[1, 'a'], [1, 'a']], 'selfref': [[...]], 'rt': ([(...)],), \
        'big': 170141183460469231731687303715884105728}\n\
        2500 3123750 70000 1500 1124250\n\
        True True True\n";
    assert_eq!(String::from_utf8_lossy(&out.stdout), want);
    list_rc(&selfref).borrow_mut().clear();
    list_rc(&l2).borrow_mut().clear();
}

fn all_valid() -> Vec<Vec<u8>> {
    let mut all: Vec<Vec<u8>> = [P0, P2, P4, P5, RECURSIVE_TUPLE]
        .iter()
        .map(|b| b.to_vec())
        .collect();
    all.push(b"(I1\nimod\nCls\n(dS'k'\nI2\nsb.".to_vec());
    all.push(b"\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00cm\nC\n)\x81}b\x8e\x01\x00\x00\x00\x00\x00\x00\x00x.".to_vec());
    all.push(to_vec(&expected(Value::None)));
    all
}

#[test]
fn every_truncation_is_an_error() {
    for bytes in all_valid() {
        assert!(from_slice(&bytes).is_ok());
        for n in 0..bytes.len() {
            assert!(
                from_slice(&bytes[..n]).is_err(),
                "{:?} read",
                bytes[..n].escape_ascii().to_string()
            );
        }
    }
}

#[test]
fn huge_declared_lengths_are_errors() {
    let cases: [&[u8]; 9] = [
        b"\x80\x04X\xff\xff\xff\xffab.",
        b"\x80\x04\x8d\xff\xff\xff\xff\xff\xff\xff\xffab.",
        b"\x80\x04\x8e\xff\xff\xff\xff\xff\xff\xff\x7fab.",
        b"\x80\x05\x96\x00\x00\x00\x00\x01\x00\x00\x00ab.",
        b"\x80\x04B\xff\xff\xff\xffab.",
        b"T\xff\xff\xff\x7fab.",
        b"\x80\x02\x8b\xff\xff\xff\x7fab.",
        b"\x80\x02\x8b\xff\xff\xff\xffab.",
        b"\x80\x04\x95\x00\x00\x00\x00\x00\x00\x00\x01N.",
    ];
    for bytes in cases {
        let e = from_slice(bytes).unwrap_err();
        assert!(
            e.message.contains("truncated") || e.message.contains("negative"),
            "{e}"
        );
    }
}

#[test]
fn deep_nesting_neither_overflows_nor_loops() {
    const N: usize = 1_000_000;
    // A million lists on the stack, then each appended into the one below.
    let mut bytes = vec![b']'; N];
    bytes.extend(std::iter::repeat_n(b'a', N - 1));
    bytes.push(b'.');
    let deep = from_slice(&bytes).unwrap();
    assert_eq!(deep.kind(), "a list");
    assert!(format!("{deep:?}").contains('…'));
    let written = to_vec(&deep);
    let back = from_slice(&written).unwrap();
    drop((deep, back));
    // A chain through the memo: the stack stays one deep.
    let mut bytes = b"\x80\x04]\x94".to_vec();
    for i in 0..N as u32 {
        bytes.push(b']');
        bytes.push(b'j');
        bytes.extend(i.to_le_bytes());
        bytes.extend(b"a\x940");
    }
    bytes.push(b'j');
    bytes.extend((N as u32).to_le_bytes());
    bytes.push(b'.');
    let chain = from_slice(&bytes).unwrap();
    assert_eq!(to_vec(&chain).len(), 3 * N + 5);
    drop(chain);
    // Objects whose class is the object before, and a bomb of marks.
    let mut bytes = b"cm\nn\n".to_vec();
    for _ in 0..300_000 {
        bytes.extend(b")R");
    }
    bytes.push(b'.');
    let objects = from_slice(&bytes).unwrap();
    assert!(format!("{objects:?}").len() < 10_000);
    assert!(from_slice(&to_vec(&objects)).is_ok());
    drop(objects);
    let mut marks = vec![b'('; N];
    marks.extend(b"N.");
    assert!(from_slice(&marks).unwrap().is_none());
    marks.truncate(N);
    marks.push(b'.');
    assert!(from_slice(&marks).is_err());
}

#[test]
fn cycles_end() {
    // A list appended into itself, and a dict holding itself.
    let v = from_slice(b"\x80\x04]\x94h\x00a}\x94(K\x01h\x01u\x86.").unwrap();
    assert!(format!("{v:?}").len() < 1_000_000);
    let back = from_slice(&to_vec(&v)).unwrap();
    for v in [&v, &back] {
        let items = v.as_list().unwrap();
        let l = list_rc(&items[0]);
        assert!(Rc::ptr_eq(&l, &list_rc(&l.borrow()[0])));
        let Value::Dict(d) = &items[1] else { panic!() };
        assert!(matches!(&d.borrow()[0].1, Value::Dict(inner) if Rc::ptr_eq(d, inner)));
        assert!(items[1].get("k").is_none());
        l.borrow_mut().clear();
        d.borrow_mut().clear();
    }
}

#[test]
fn missing_memo_and_underflow_are_errors() {
    for bytes in [
        &b"\x80\x04h\x05."[..],
        b"\x80\x04j\x00\x00\x00\x01.",
        b"g5\n.",
        b"g-1\n.",
        b"N\x94h\x01.",
        b"Np-1\n.",
    ] {
        assert!(
            from_slice(bytes).is_err(),
            "{:?}",
            bytes.escape_ascii().to_string()
        );
    }
    let popping: [&[u8]; 27] = [
        b"0",
        b"1",
        b"2",
        b"a",
        b"e",
        b"l",
        b"t",
        b"\x85",
        b"\x86",
        b"\x87",
        b"d",
        b"s",
        b"u",
        b"\x90",
        b"\x91",
        b"\x93",
        b"R",
        b"\x81",
        b"\x92",
        b"b",
        b"q\x00",
        b"r\x00\x00\x00\x00",
        b"p0\n",
        b"\x94",
        b".",
        b"o",
        b"imod\nname\n",
    ];
    for op in popping {
        for prefix in [&b"\x80\x04"[..], b"\x80\x04]N("] {
            let mut bytes = prefix.to_vec();
            bytes.extend(op);
            bytes.push(b'.');
            // POP and POP_MARK take the mark itself, and list/tuple/set/INST/OBJ of nothing are fine.
            let fine_after_mark =
                [&b"0"[..], b"1", b"l", b"t", b"d", b"\x91", b"imod\nname\n"].contains(&op);
            if prefix.len() > 2 && fine_after_mark {
                continue;
            }
            let r = from_slice(&bytes);
            assert!(
                r.is_err(),
                "{:?} read as {r:?}",
                bytes.escape_ascii().to_string()
            );
        }
    }
    // Wrong types under the opcode.
    for bytes in [
        &b"Na."[..],
        b"N(Ne.",
        b"NNNs.",
        b"N(NNu.",
        b"N(\x90.",
        b"NNb.",
        b"K\x01K\x02\x93.",
        b"N(NNNd.",
    ] {
        assert!(
            from_slice(bytes).is_err(),
            "{:?}",
            bytes.escape_ascii().to_string()
        );
    }
}

#[test]
fn unsupported_opcodes_are_named() {
    for (bytes, name, at) in [
        (&b"\x80\x04P1\n."[..], "0x50 (PERSID)", 2),
        (b"\x80\x04NQ.", "0x51 (BINPERSID)", 3),
        (b"\x80\x04\x82\x01.", "0x82 (EXT1)", 2),
        (b"\x80\x04\x84\x01\x00\x00\x00.", "0x84 (EXT4)", 2),
        (b"\x80\x05\x97.", "0x97 (NEXT_BUFFER)", 2),
        (b"\x80\x05N\x98.", "0x98 (READONLY_BUFFER)", 3),
        (b"NN\xff.", "0xff (unknown)", 2),
    ] {
        let e = from_slice(bytes).unwrap_err();
        assert!(e.message.contains(name), "{e}");
        assert_eq!(e.offset, at, "{e}");
        assert!(e.to_string().starts_with(&format!("at byte {at}: opcode")));
    }
}

/// The fuzz loops' seeded generator (the crate's `rand`).
struct Rng(rand::rngs::SmallRng);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(rand::SeedableRng::seed_from_u64(seed))
    }

    fn next(&mut self) -> u64 {
        rand::RngCore::next_u64(&mut self.0)
    }

    fn below(&mut self, n: usize) -> usize {
        rand::Rng::random_range(&mut self.0, 0..n)
    }
}

/// Reads `bytes`; what reads must write, read back, and print.
fn exercise(bytes: &[u8]) {
    if let Ok(v) = from_slice(bytes) {
        let _ = format!("{v:?}");
        let _ = (v.kind(), v.get("a"), v.as_list(), v.as_str(), v.as_int());
        let again = to_vec(&v);
        assert!(
            from_slice(&again).is_ok(),
            "{:?} wrote {:?}",
            bytes.escape_ascii().to_string(),
            again.escape_ascii().to_string()
        );
    }
}

#[test]
fn random_and_mutated_inputs_never_panic() {
    let mut rng = Rng::new(0x9e37_79b9_7f4a_7c15);
    let opcodes: Vec<u8> = (0..=255u8)
        .filter(|&b| opcode_name(b) != "unknown")
        .collect();
    for _ in 0..20_000 {
        let len = rng.below(65);
        let bytes: Vec<u8> = (0..len)
            .map(|_| {
                if rng.below(4) == 0 {
                    rng.next() as u8
                } else {
                    opcodes[rng.below(opcodes.len())]
                }
            })
            .collect();
        exercise(&bytes);
    }
    let valid = all_valid();
    for _ in 0..20_000 {
        let mut bytes = valid[rng.below(valid.len())].clone();
        for _ in 0..=rng.below(4) {
            let at = rng.below(bytes.len());
            match rng.below(3) {
                0 => bytes[at] = rng.next() as u8,
                1 => bytes.insert(at, opcodes[rng.below(opcodes.len())]),
                _ => {
                    bytes.remove(at);
                }
            }
            if bytes.is_empty() {
                break;
            }
        }
        exercise(&bytes);
    }
    // Well-formed opcodes in random order, each kept only if the pickle still reads with a
    // value pushed on top, so that all read: cycles, sharing, objects. `~` separates them.
    let pieces: Vec<&[u8]> = b"]~}~\x8f~)~(~N~\x88~K\x05~\x8c\x01a~C\x01b~G\0\0\0\0\0\0\0\0~cm\nn\n~\
        \x8a\x11\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\x80\0~h\x00~h\x01~h\x02~\x94~a~e~s~u~\x90~t~\x85~\x86~2~0~1~R~b"
        .split(|&b| b == b'~')
        .collect();
    for _ in 0..5_000 {
        let mut bytes = b"\x80\x04".to_vec();
        for _ in 0..rng.below(60) {
            let n = bytes.len();
            bytes.extend(pieces[rng.below(pieces.len())]);
            bytes.extend(b"N.");
            let reads = from_slice(&bytes).is_ok();
            bytes.truncate(if reads { bytes.len() - 2 } else { n });
        }
        bytes.push(b'.');
        if from_slice(&bytes).is_err() {
            bytes.insert(bytes.len() - 1, b'N');
        }
        assert!(from_slice(&bytes).is_ok());
        exercise(&bytes);
    }
}

/// How fast a snapshot-sized pickle reads: `cargo test --release --lib pickle -- --ignored --nocapture`.
#[test]
#[ignore]
fn speed() {
    let frames: Vec<Value> = (0..40)
        .map(|i| {
            Value::dict(vec![
                ("filename", Value::str("/a/long/path/to/model.py")),
                ("line", Value::int(i)),
                ("name", Value::str("forward")),
            ])
        })
        .collect();
    let entries: Vec<Value> = (0..1_000_000)
        .map(|i: i64| {
            let frames = Value::list(frames[(i % 7) as usize..(i % 7 + 20) as usize].to_vec());
            Value::dict(vec![
                ("action", Value::str("alloc")),
                ("addr", Value::int(i * 4096 + (1 << 40))),
                ("size", Value::int(i)),
                ("stream", Value::int(0)),
                ("frames", frames),
            ])
        })
        .collect();
    let v = Value::dict(vec![(
        "device_traces",
        Value::list(vec![Value::list(entries)]),
    )]);
    let t = std::time::Instant::now();
    let bytes = to_vec(&v);
    eprintln!("wrote {} MB in {:?}", bytes.len() >> 20, t.elapsed());
    let t = std::time::Instant::now();
    let back = from_slice(&bytes).unwrap();
    eprintln!("read in {:?}", t.elapsed());
    let t = std::time::Instant::now();
    drop(back);
    eprintln!("dropped in {:?}", t.elapsed());
}
