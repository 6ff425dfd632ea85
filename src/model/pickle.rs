//! A bounded reader of Python pickles that hold plain data: what PyTorch checkpoints
//! (`torch.save`), nanoGPT's `meta.pkl` and nanochat's `tokenizer.pkl` are made of.
//!
//! Pickles are programs: `pickle.load` imports any module the file names and calls any
//! function with any arguments. This reader runs none of that. It interprets the opcodes of
//! data (numbers, strings, bytes, lists, tuples, dicts, sets, the memo), and a `GLOBAL` is
//! accepted only when the caller's allow-list names it; calls (`REDUCE`, `NEWOBJ`, `BUILD`)
//! of an allowed name are recorded as nodes for the caller to interpret, never executed.
//! Every length is checked against the bytes left, the number of objects is capped, and the
//! memo holds references into one arena (no copies), so a crafted file cannot make it allocate
//! more than a small multiple of its own size. candle's reader (`candle_core::pickle`) is not
//! used: it allocates a string's declared length before reading it and deep-copies memoized
//! objects, and it reads neither protocol 4's framing nor short strings (Python's default).

use std::collections::HashMap;

/// An object of the pickle, in [`Pickle`]'s arena.
pub type Id = usize;

/// The most objects one pickle may hold (a GPT-2 checkpoint has a few thousand; a 65,536-token
/// tiktoken vocabulary about 200,000).
const MAX_OBJECTS: usize = 8 << 20;
/// The largest integer a pickle may hold here, in bytes (`i64`).
const MAX_INT_BYTES: usize = 8;

#[derive(Debug, Clone, PartialEq)]
pub enum Node {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    List(Vec<Id>),
    Tuple(Vec<Id>),
    /// Also sets and frozensets (as a list of their items).
    Set(Vec<Id>),
    /// Key/value pairs in the order they were set (Python's dict order).
    Dict(Vec<(Id, Id)>),
    /// A name from the allow-list (`module`, `name`).
    Global(String, String),
    /// `callable(*args)`, recorded (REDUCE, NEWOBJ).
    Call(Id, Id),
    /// `obj.__setstate__(state)`, recorded (BUILD).
    Build(Id, Id),
    /// A persistent id: PyTorch's reference to a tensor storage outside the pickle.
    Persistent(Id),
}

/// Why a pickle was refused.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct PickleError(pub String);

type Result<T> = std::result::Result<T, PickleError>;

fn err<T>(msg: impl Into<String>) -> Result<T> {
    Err(PickleError(msg.into()))
}

/// A parsed pickle: its objects and the one it returned.
#[derive(Debug)]
pub struct Pickle {
    nodes: Vec<Node>,
    pub root: Id,
}

enum Item {
    Mark,
    Obj(Id),
}

struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if n > self.data.len() - self.pos {
            return err(format!(
                "truncated: an item of {n} bytes at offset {} runs past the end ({} bytes)",
                self.pos,
                self.data.len()
            ));
        }
        let s = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<usize> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().unwrap_or_default()) as usize)
    }
    fn u32(&mut self) -> Result<usize> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap_or_default()) as usize)
    }
    fn u64(&mut self) -> Result<usize> {
        let v = u64::from_le_bytes(self.take(8)?.try_into().unwrap_or_default());
        usize::try_from(v).or_else(|_| err("a length does not fit this machine"))
    }
    fn line(&mut self) -> Result<String> {
        let rest = &self.data[self.pos..];
        let Some(end) = rest.iter().take(256).position(|&b| b == b'\n') else {
            return err("a GLOBAL name is unterminated or longer than 256 bytes");
        };
        self.pos += end + 1;
        String::from_utf8(rest[..end].to_vec()).or_else(|_| err("a GLOBAL name is not UTF-8"))
    }
}

impl Pickle {
    /// Parses `data`. `allowed` names the globals (`module`, `name`) the caller interprets;
    /// any other makes the whole pickle refused, naming it.
    pub fn parse(data: &[u8], allowed: &[(&str, &str)]) -> Result<Self> {
        let mut p = Parser {
            r: Reader { data, pos: 0 },
            nodes: Vec::new(),
            stack: Vec::new(),
            memo: HashMap::new(),
            allowed,
        };
        let root = p.run()?;
        Ok(Pickle {
            nodes: p.nodes,
            root,
        })
    }

    pub fn node(&self, id: Id) -> &Node {
        &self.nodes[id]
    }

    /// The value of `key` (a string key) in the dict `id`, if it is a dict holding it.
    pub fn get(&self, id: Id, key: &str) -> Option<Id> {
        match self.node(id) {
            Node::Dict(items) => items
                .iter()
                .rev()
                .find(|(k, _)| matches!(self.node(*k), Node::Str(s) if s == key))
                .map(|(_, v)| *v),
            _ => None,
        }
    }
    pub fn int(&self, id: Id) -> Option<i64> {
        match self.node(id) {
            Node::Int(v) => Some(*v),
            Node::Bool(b) => Some(*b as i64),
            _ => None,
        }
    }
    pub fn float(&self, id: Id) -> Option<f64> {
        match self.node(id) {
            Node::Float(v) => Some(*v),
            Node::Int(v) => Some(*v as f64),
            _ => None,
        }
    }
    pub fn bool(&self, id: Id) -> Option<bool> {
        match self.node(id) {
            Node::Bool(b) => Some(*b),
            Node::Int(v) => Some(*v != 0),
            _ => None,
        }
    }
    pub fn str(&self, id: Id) -> Option<&str> {
        match self.node(id) {
            Node::Str(s) => Some(s),
            _ => None,
        }
    }
    /// The items of a list, tuple or set.
    pub fn items(&self, id: Id) -> Option<&[Id]> {
        match self.node(id) {
            Node::List(v) | Node::Tuple(v) | Node::Set(v) => Some(v),
            _ => None,
        }
    }
    pub fn dict(&self, id: Id) -> Option<&[(Id, Id)]> {
        match self.node(id) {
            Node::Dict(v) => Some(v),
            _ => None,
        }
    }
    /// The (`module`, `name`) of an allowed global.
    pub fn global(&self, id: Id) -> Option<(&str, &str)> {
        match self.node(id) {
            Node::Global(m, n) => Some((m, n)),
            _ => None,
        }
    }
}

struct Parser<'a, 'b> {
    r: Reader<'a>,
    nodes: Vec<Node>,
    stack: Vec<Item>,
    memo: HashMap<usize, Id>,
    allowed: &'b [(&'b str, &'b str)],
}

impl Parser<'_, '_> {
    fn new_node(&mut self, n: Node) -> Result<Id> {
        if self.nodes.len() >= MAX_OBJECTS {
            return err(format!("more than {MAX_OBJECTS} objects"));
        }
        self.nodes.push(n);
        Ok(self.nodes.len() - 1)
    }
    fn push(&mut self, n: Node) -> Result<()> {
        let id = self.new_node(n)?;
        self.stack.push(Item::Obj(id));
        Ok(())
    }
    fn pop(&mut self) -> Result<Id> {
        match self.stack.pop() {
            Some(Item::Obj(id)) => Ok(id),
            Some(Item::Mark) => err("a MARK where an object was expected"),
            None => err("the stack is empty where an object was expected"),
        }
    }
    fn top(&self) -> Result<Id> {
        match self.stack.last() {
            Some(Item::Obj(id)) => Ok(*id),
            _ => err("no object on the stack"),
        }
    }
    fn pop_mark(&mut self) -> Result<Vec<Id>> {
        let Some(at) = self.stack.iter().rposition(|i| matches!(i, Item::Mark)) else {
            return err("no MARK on the stack");
        };
        let items = self
            .stack
            .split_off(at + 1)
            .into_iter()
            .filter_map(|i| match i {
                Item::Obj(id) => Some(id),
                Item::Mark => None,
            })
            .collect();
        self.stack.pop();
        Ok(items)
    }
    fn text(&mut self, len: usize) -> Result<()> {
        let bytes = self.r.take(len)?;
        let s = std::str::from_utf8(bytes)
            .map_err(|_| PickleError("a string is not valid UTF-8".into()))?;
        self.push(Node::Str(s.to_string()))
    }
    fn bytes(&mut self, len: usize) -> Result<()> {
        let b = self.r.take(len)?.to_vec();
        self.push(Node::Bytes(b))
    }
    fn long(&mut self, n: usize) -> Result<()> {
        if n > MAX_INT_BYTES {
            return err(format!("an integer of {n} bytes (at most {MAX_INT_BYTES})"));
        }
        let b = self.r.take(n)?;
        let mut buf = [if b.last().is_some_and(|&x| x & 0x80 != 0) {
            0xff
        } else {
            0
        }; 8];
        buf[..n].copy_from_slice(b);
        self.push(Node::Int(i64::from_le_bytes(buf)))
    }
    fn global(&mut self, module: String, name: String) -> Result<()> {
        if !self.allowed.iter().any(|(m, n)| *m == module && *n == name) {
            return err(format!(
                "it names `{module}.{name}`, which this kind of file does not contain \
                 (pickled code is never run; refusing the file)"
            ));
        }
        self.push(Node::Global(module, name))
    }
    fn append(&mut self, items: Vec<Id>) -> Result<()> {
        let target = self.top()?;
        match &mut self.nodes[target] {
            Node::List(v) | Node::Set(v) => {
                v.extend(items);
                Ok(())
            }
            _ => err("APPEND to an object that is not a list"),
        }
    }
    fn set_items(&mut self, items: Vec<Id>) -> Result<()> {
        if !items.len().is_multiple_of(2) {
            return err("SETITEMS with an odd number of objects");
        }
        let target = self.top()?;
        let pairs = items.chunks(2).map(|c| (c[0], c[1]));
        match &mut self.nodes[target] {
            Node::Dict(v) => {
                v.extend(pairs);
                Ok(())
            }
            // `OrderedDict()` recorded as a call: its items go into an empty dict in its place.
            Node::Call(..) => {
                let dict = Node::Dict(pairs.collect());
                self.nodes[target] = dict;
                Ok(())
            }
            _ => err("SETITEM on an object that is not a dict"),
        }
    }

    fn run(&mut self) -> Result<Id> {
        loop {
            let op = self.r.u8()?;
            match op {
                0x80 => {
                    let proto = self.r.u8()?;
                    if proto > 5 {
                        return err(format!("pickle protocol {proto} (at most 5)"));
                    }
                }
                0x95 => {
                    self.r.u64()?; // FRAME: a length hint
                }
                b'.' => return self.pop(),
                b'(' => self.stack.push(Item::Mark),
                b'0' => {
                    self.stack.pop();
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let id = self.top()?;
                    self.stack.push(Item::Obj(id));
                }
                b'N' => self.push(Node::None)?,
                0x88 => self.push(Node::Bool(true))?,
                0x89 => self.push(Node::Bool(false))?,
                b'J' => {
                    let v = i32::from_le_bytes(self.r.take(4)?.try_into().unwrap_or_default());
                    self.push(Node::Int(v as i64))?
                }
                b'K' => {
                    let v = self.r.u8()?;
                    self.push(Node::Int(v as i64))?
                }
                b'M' => {
                    let v = self.r.u16()?;
                    self.push(Node::Int(v as i64))?
                }
                0x8a => {
                    let n = self.r.u8()? as usize;
                    self.long(n)?
                }
                0x8b => {
                    let n = self.r.u32()?;
                    self.long(n)?
                }
                b'G' => {
                    let v = f64::from_be_bytes(self.r.take(8)?.try_into().unwrap_or_default());
                    self.push(Node::Float(v))?
                }
                b'X' => {
                    let n = self.r.u32()?;
                    self.text(n)?
                }
                0x8c => {
                    let n = self.r.u8()? as usize;
                    self.text(n)?
                }
                0x8d => {
                    let n = self.r.u64()?;
                    self.text(n)?
                }
                b'B' => {
                    let n = self.r.u32()?;
                    self.bytes(n)?
                }
                b'C' => {
                    let n = self.r.u8()? as usize;
                    self.bytes(n)?
                }
                0x8e | 0x96 => {
                    let n = self.r.u64()?;
                    self.bytes(n)?
                }
                b']' => self.push(Node::List(Vec::new()))?,
                b'l' => {
                    let items = self.pop_mark()?;
                    self.push(Node::List(items))?
                }
                b'a' => {
                    let v = self.pop()?;
                    self.append(vec![v])?
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    self.append(items)?
                }
                b')' => self.push(Node::Tuple(Vec::new()))?,
                b't' => {
                    let items = self.pop_mark()?;
                    self.push(Node::Tuple(items))?
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    let mut items = (0..n).map(|_| self.pop()).collect::<Result<Vec<_>>>()?;
                    items.reverse();
                    self.push(Node::Tuple(items))?
                }
                b'}' => self.push(Node::Dict(Vec::new()))?,
                b'd' => {
                    let items = self.pop_mark()?;
                    if !items.len().is_multiple_of(2) {
                        return err("DICT with an odd number of objects");
                    }
                    let pairs = items.chunks(2).map(|c| (c[0], c[1])).collect();
                    self.push(Node::Dict(pairs))?
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    self.set_items(vec![k, v])?
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    self.set_items(items)?
                }
                0x8f => self.push(Node::Set(Vec::new()))?,
                0x90 => {
                    let items = self.pop_mark()?;
                    self.append(items)?
                }
                0x91 => {
                    let items = self.pop_mark()?;
                    self.push(Node::Set(items))?
                }
                b'q' => {
                    let i = self.r.u8()? as usize;
                    let id = self.top()?;
                    self.memo.insert(i, id);
                }
                b'r' => {
                    let i = self.r.u32()?;
                    let id = self.top()?;
                    self.memo.insert(i, id);
                }
                0x94 => {
                    let id = self.top()?;
                    let i = self.memo.len();
                    self.memo.insert(i, id);
                }
                b'h' | b'j' => {
                    let i = if op == b'h' {
                        self.r.u8()? as usize
                    } else {
                        self.r.u32()?
                    };
                    let Some(&id) = self.memo.get(&i) else {
                        return err(format!("memo entry {i} is read before it is written"));
                    };
                    self.stack.push(Item::Obj(id));
                }
                b'c' => {
                    let module = self.r.line()?;
                    let name = self.r.line()?;
                    self.global(module, name)?
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (&self.nodes[module], &self.nodes[name]) {
                        (Node::Str(m), Node::Str(n)) => {
                            let (m, n) = (m.clone(), n.clone());
                            self.global(m, n)?
                        }
                        _ => return err("STACK_GLOBAL without two strings"),
                    }
                }
                b'R' | 0x81 => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    if !matches!(self.nodes[callable], Node::Global(..)) {
                        return err("a call of something that is not an allowed name");
                    }
                    self.push(Node::Call(callable, args))?
                }
                b'b' => {
                    let state = self.pop()?;
                    let obj = self.pop()?;
                    self.push(Node::Build(obj, state))?
                }
                b'Q' => {
                    let pid = self.pop()?;
                    self.push(Node::Persistent(pid))?
                }
                other => {
                    return err(format!(
                        "opcode 0x{other:02x} at offset {} is not one of plain data's",
                        self.r.pos - 1
                    ))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_protocol_2_and_4_data() {
        // pickle.dumps({'a': [1, -2, 3.5, 'x', b'y', None, True]}, protocol=4)
        let p4 = b"\x80\x04\x95&\x00\x00\x00\x00\x00\x00\x00}\x94\x8c\x01a\x94]\x94(K\x01J\xfe\xff\xff\xffG@\x0c\x00\x00\x00\x00\x00\x00\x8c\x01x\x94C\x01y\x94N\x88es.";
        let p = Pickle::parse(p4, &[]).unwrap();
        let list = p.get(p.root, "a").unwrap();
        let items = p.items(list).unwrap();
        assert_eq!(p.int(items[0]), Some(1));
        assert_eq!(p.int(items[1]), Some(-2));
        assert_eq!(p.float(items[2]), Some(3.5));
        assert_eq!(p.str(items[3]), Some("x"));
        assert_eq!(p.node(items[4]), &Node::Bytes(b"y".to_vec()));
        assert_eq!(p.node(items[5]), &Node::None);
        assert_eq!(p.bool(items[6]), Some(true));
        // pickle.dumps({'n': 2**40, 'm': -(2**40)}, protocol=2)
        let p2 = b"\x80\x02}q\x00(X\x01\x00\x00\x00nq\x01\x8a\x06\x00\x00\x00\x00\x00\x01X\x01\x00\x00\x00mq\x02\x8a\x06\x00\x00\x00\x00\x00\xffu.";
        let p = Pickle::parse(p2, &[]).unwrap();
        assert_eq!(p.int(p.get(p.root, "n").unwrap()), Some(1 << 40));
        assert_eq!(p.int(p.get(p.root, "m").unwrap()), Some(-(1 << 40)));
    }

    #[test]
    fn refuses_code_and_malformed_input() {
        // pickle.dumps(os.system) style: GLOBAL posix system, then a call.
        let code = b"\x80\x02cposix\nsystem\nq\x00X\x02\x00\x00\x00lsq\x01\x85q\x02Rq\x03.";
        let e = Pickle::parse(code, &[]).unwrap_err().to_string();
        assert!(e.contains("posix.system"), "{e}");
        // A string that declares 4 GiB with 3 bytes left: refused, nothing allocated.
        let e = Pickle::parse(b"\x80\x02X\xff\xff\xff\xffabc.", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("truncated"), "{e}");
        for bad in [
            &b""[..],
            b"\x80\x02",
            b"\x80\x02(",
            b"\x80\x02h\x05.",
            b"\x80\x02a.",
            b"\xff",
        ] {
            assert!(Pickle::parse(bad, &[]).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn memo_references_share_one_object() {
        // A list memoized, then fetched 200 times into a new list, and that list 200 times:
        // 40,000 references, a few hundred objects (no copies).
        let mut data = b"\x80\x02]q\x00(K\x01K\x02e".to_vec();
        data.extend(b"(");
        data.extend(std::iter::repeat_n(&b"h\x00"[..], 200).flatten());
        data.extend(b"lq\x01(");
        data.extend(std::iter::repeat_n(&b"h\x01"[..], 200).flatten());
        data.extend(b"l.");
        let p = Pickle::parse(&data, &[]).unwrap();
        assert!(p.nodes.len() < 10, "{}", p.nodes.len());
        assert_eq!(p.items(p.root).unwrap().len(), 200);
    }
}
