//! A bounded walk over a GGUF header, run before candle's reader sees the file. candle trusts
//! every length and count it reads (a string of 2^40 bytes is allocated before it is read; an
//! alignment of 0 divides by zero; a tensor count larger than the file is looped over), so a
//! crafted file in `--models-dir` could abort the whole server. Here each count and length is
//! checked against the bytes that remain before anything is allocated, every tensor's type
//! must be one candle knows and its data must lie inside the file; the reason names what is
//! wrong. A file that passes is then read by candle as before.

use std::io::{Read, Seek, SeekFrom};

use candle_core::quantized::GgmlDType;

/// Longest metadata key or tensor name (llama.cpp's names are under 100 bytes).
const MAX_NAME: u64 = 64 << 10;
/// Most elements in one metadata array, and in all of them together (the largest
/// vocabularies have 262,144 tokens, so tokens + scores + types + merges stay far below):
/// candle holds each element as a 32-byte value, so this bounds its memory whatever the
/// file declares.
const MAX_ARRAY: u64 = 4 << 20;
const MAX_ELEMENTS: u64 = 8 << 20;
/// Most metadata entries and tensors (real files: tens of entries, at most a few thousand
/// tensors).
const MAX_ENTRIES: u64 = 1 << 16;
/// Arrays of arrays are allowed (candle reads them), arrays of arrays of arrays are not.
const MAX_DEPTH: u32 = 2;
/// GGML_MAX_DIMS.
const MAX_DIMS: u32 = 4;
/// The largest `general.alignment` accepted (llama.cpp's default is 32).
const MAX_ALIGNMENT: u64 = 1 << 20;
const DEFAULT_ALIGNMENT: u64 = 32;

/// Checks the header of the GGUF file behind `reader` (`len` bytes long). The reader's
/// position afterwards is unspecified.
pub fn check<R: Read + Seek>(reader: &mut R, len: u64) -> Result<(), String> {
    reader.seek(SeekFrom::Start(0)).map_err(|e| e.to_string())?;
    let mut walk = Walk {
        reader,
        pos: 0,
        len,
        v1: false,
        elements: 0,
    };
    walk.header()
}

struct Walk<'a, R> {
    reader: &'a mut R,
    pos: u64,
    len: u64,
    /// GGUF v1 writes lengths and counts as u32 (v2 and v3: u64).
    v1: bool,
    /// Array elements seen so far.
    elements: u64,
}

/// A metadata value of a type candle reads as `general.alignment` (others are ignored there).
enum Alignment {
    Int(i64),
    Other,
}

impl<R: Read + Seek> Walk<'_, R> {
    fn remaining(&self) -> u64 {
        self.len.saturating_sub(self.pos)
    }

    fn bytes<const N: usize>(&mut self, what: &str) -> Result<[u8; N], String> {
        if self.remaining() < N as u64 {
            return Err(format!(
                "the file ends inside {what} (at byte {})",
                self.pos
            ));
        }
        let mut b = [0u8; N];
        self.reader
            .read_exact(&mut b)
            .map_err(|e| format!("reading {what} at byte {}: {e}", self.pos))?;
        self.pos += N as u64;
        Ok(b)
    }

    fn u32(&mut self, what: &str) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.bytes(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.bytes(what)?))
    }

    /// A length or count: u32 in v1, u64 after.
    fn count(&mut self, what: &str) -> Result<u64, String> {
        if self.v1 {
            self.u32(what).map(u64::from)
        } else {
            self.u64(what)
        }
    }

    fn skip(&mut self, n: u64, what: &str) -> Result<(), String> {
        if n > self.remaining() {
            return Err(format!(
                "{what} of {n} bytes at byte {} passes the end of the file ({} bytes)",
                self.pos, self.len
            ));
        }
        self.reader
            .seek(SeekFrom::Current(n as i64))
            .map_err(|e| e.to_string())?;
        self.pos += n;
        Ok(())
    }

    /// A string's length, checked against the file (and `limit`), then skipped.
    fn string(&mut self, what: &str, limit: u64) -> Result<(), String> {
        let n = self.count(what)?;
        if n > limit {
            return Err(format!("{what} of {n} bytes is longer than {limit}"));
        }
        self.skip(n, what)
    }

    /// A string read into memory (a metadata key: bounded by [`MAX_NAME`]).
    fn name(&mut self, what: &str) -> Result<String, String> {
        let n = self.count(what)?;
        if n > MAX_NAME || n > self.remaining() {
            return Err(format!(
                "{what} of {n} bytes at byte {} is longer than the file or {MAX_NAME} bytes",
                self.pos
            ));
        }
        let mut v = vec![0u8; n as usize];
        self.reader
            .read_exact(&mut v)
            .map_err(|e| format!("reading {what}: {e}"))?;
        self.pos += n;
        Ok(String::from_utf8_lossy(&v).into_owned())
    }

    fn header(&mut self) -> Result<(), String> {
        let magic = self.u32("the magic number")?;
        if magic != 0x4655_4747 && magic != 0x4747_5546 {
            return Err(format!("not a GGUF file (magic 0x{magic:08x})"));
        }
        let version = self.u32("the version")?;
        if !(1..=3).contains(&version) {
            return Err(format!("GGUF version {version} is not supported (1 to 3)"));
        }
        self.v1 = version == 1;
        let tensors = self.count("the tensor count")?;
        let kvs = self.count("the metadata count")?;
        // The smallest entry of each kind: a key (length + 1 byte) + type + 1-byte value; a
        // tensor's name (length + 1) + dimension count + type + offset.
        let len_size = if self.v1 { 4 } else { 8 };
        let min_kv = len_size + 1 + 4 + 1;
        let min_tensor = len_size + 1 + 4 + 4 + 8;
        for (n, what) in [(kvs, "metadata entries"), (tensors, "tensors")] {
            if n > MAX_ENTRIES {
                return Err(format!(
                    "the header declares {n} {what} (at most {MAX_ENTRIES})"
                ));
            }
        }
        if kvs > self.remaining() / min_kv {
            return Err(format!(
                "the header declares {kvs} metadata entries; the file holds at most {}",
                self.remaining() / min_kv
            ));
        }
        if tensors > self.remaining() / min_tensor {
            return Err(format!(
                "the header declares {tensors} tensors; the file holds at most {}",
                self.remaining() / min_tensor
            ));
        }
        let mut alignment = DEFAULT_ALIGNMENT;
        for _ in 0..kvs {
            let key = self.name("a metadata key")?;
            let value_type = self.u32("a metadata type")?;
            let what = format!("metadata `{key}`");
            let value = self.value(value_type, &what, 0)?;
            if key == "general.alignment" {
                if let Alignment::Int(a) = value {
                    // candle ignores a negative value (default alignment) and divides by any
                    // other: it must be a power of two, as llama.cpp requires.
                    if a >= 0 {
                        let a = a as u64;
                        if !a.is_power_of_two() || a > MAX_ALIGNMENT {
                            return Err(format!(
                                "general.alignment {a} is not a power of two up to {MAX_ALIGNMENT}"
                            ));
                        }
                        alignment = a;
                    }
                }
            }
        }
        let mut extents = Vec::with_capacity(tensors as usize);
        for i in 0..tensors {
            self.string("a tensor name", MAX_NAME)?;
            let dims = self.u32("a tensor's dimension count")?;
            if dims > MAX_DIMS {
                return Err(format!(
                    "tensor {i} has {dims} dimensions (at most {MAX_DIMS})"
                ));
            }
            let mut elems: u64 = 1;
            for _ in 0..dims {
                let d = self.count("a tensor dimension")?;
                elems = elems
                    .checked_mul(d)
                    .ok_or_else(|| format!("tensor {i}'s element count overflows"))?;
            }
            let dtype = dtype_of(self.u32("a tensor type")?)
                .ok_or_else(|| format!("tensor {i} has a type this reader does not know"))?;
            let offset = self.u64("a tensor offset")?;
            let block = dtype.block_size() as u64;
            if !elems.is_multiple_of(block) {
                return Err(format!(
                    "tensor {i} has {elems} elements, not a whole number of {dtype:?} blocks"
                ));
            }
            let bytes = (elems / block)
                .checked_mul(dtype.type_size() as u64)
                .ok_or_else(|| format!("tensor {i}'s size overflows"))?;
            extents.push((i, offset, bytes));
        }
        let data_start = self.pos.div_ceil(alignment).saturating_mul(alignment);
        for (i, offset, bytes) in extents {
            let end = data_start
                .checked_add(offset)
                .and_then(|s| s.checked_add(bytes));
            if end.is_none_or(|end| end > self.len) {
                return Err(format!(
                    "tensor {i}'s data ({bytes} bytes at offset {offset}) lies outside the file"
                ));
            }
        }
        Ok(())
    }

    /// Walks one metadata value of `value_type` (GGUF's type ids).
    fn value(&mut self, value_type: u32, what: &str, depth: u32) -> Result<Alignment, String> {
        let int = |b: &[u8], signed: bool| -> i64 {
            let mut full = [0u8; 8];
            full[..b.len()].copy_from_slice(b);
            if signed && b[b.len() - 1] & 0x80 != 0 {
                for x in &mut full[b.len()..] {
                    *x = 0xff;
                }
            }
            i64::from_le_bytes(full)
        };
        Ok(match value_type {
            0 => Alignment::Int(int(&self.bytes::<1>(what)?, false)),
            1 => Alignment::Int(int(&self.bytes::<1>(what)?, true)),
            2 => Alignment::Int(int(&self.bytes::<2>(what)?, false)),
            3 => Alignment::Int(int(&self.bytes::<2>(what)?, true)),
            4 => Alignment::Int(int(&self.bytes::<4>(what)?, false)),
            5 => Alignment::Int(int(&self.bytes::<4>(what)?, true)),
            6 => {
                self.bytes::<4>(what)?;
                Alignment::Other
            }
            7 => {
                let b = self.bytes::<1>(what)?;
                if b[0] > 1 {
                    return Err(format!("{what}: {} is not a boolean", b[0]));
                }
                Alignment::Other
            }
            8 => {
                self.string(what, u64::MAX)?;
                Alignment::Other
            }
            9 => {
                if depth >= MAX_DEPTH {
                    return Err(format!("{what}: arrays nested deeper than {MAX_DEPTH}"));
                }
                let item_type = self.u32(what)?;
                let n = self.count(what)?;
                let min_item = match item_type {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    10..=12 => 8,
                    8 => {
                        if self.v1 {
                            4
                        } else {
                            8
                        }
                    }
                    9 => 12,
                    t => return Err(format!("{what}: unknown array type {t}")),
                };
                if n > MAX_ARRAY || n > self.remaining() / min_item {
                    return Err(format!(
                        "{what}: an array of {n} elements is longer than the file or {MAX_ARRAY}"
                    ));
                }
                self.elements += n;
                if self.elements > MAX_ELEMENTS {
                    return Err(format!(
                        "{what}: the arrays hold more than {MAX_ELEMENTS} elements in all"
                    ));
                }
                for _ in 0..n {
                    self.value(item_type, what, depth + 1)?;
                }
                Alignment::Other
            }
            10..=12 => {
                self.bytes::<8>(what)?;
                Alignment::Other
            }
            t => return Err(format!("{what}: unknown value type {t}")),
        })
    }
}

/// candle's `GgmlDType::from_u32` (not public): the tensor types it reads.
fn dtype_of(id: u32) -> Option<GgmlDType> {
    Some(match id {
        0 => GgmlDType::F32,
        1 => GgmlDType::F16,
        2 => GgmlDType::Q4_0,
        3 => GgmlDType::Q4_1,
        6 => GgmlDType::Q5_0,
        7 => GgmlDType::Q5_1,
        8 => GgmlDType::Q8_0,
        9 => GgmlDType::Q8_1,
        10 => GgmlDType::Q2K,
        11 => GgmlDType::Q3K,
        12 => GgmlDType::Q4K,
        13 => GgmlDType::Q5K,
        14 => GgmlDType::Q6K,
        15 => GgmlDType::Q8K,
        30 => GgmlDType::BF16,
        _ => return None,
    })
}
