//! PyTorch's `torch.save` files (a zip holding `data.pkl` and one entry per tensor storage),
//! read without running Python: the pickle through the bounded, allow-listed reader of
//! [`super::pickle`], the zip's central directory checked before the zip crate reads it, and
//! every tensor's extent checked against its storage before a byte is copied.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use candle_core::{Device, Tensor};

use super::pickle::{Id, Node, Pickle};

/// The names a `torch.save` of tensors, dicts, lists and Python scalars uses.
const TORCH_GLOBALS: &[(&str, &str)] = &[
    ("collections", "OrderedDict"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch", "FloatStorage"),
    ("torch", "HalfStorage"),
    ("torch", "BFloat16Storage"),
    ("torch", "DoubleStorage"),
    ("torch", "LongStorage"),
    ("torch", "IntStorage"),
    ("torch", "ShortStorage"),
    ("torch", "CharStorage"),
    ("torch", "ByteStorage"),
    ("torch", "BoolStorage"),
];

/// The largest `data.pkl` read (a GPT-2 checkpoint's is tens of kB; optimizer state adds a
/// few entries per parameter).
const MAX_PICKLE_BYTES: u64 = 64 << 20;
/// The most entries a checkpoint's zip may list.
const MAX_ZIP_ENTRIES: u64 = 1 << 20;

/// Where a tensor's numbers are: a storage (a zip entry) and a view of it.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorRef {
    /// The storage's element type (`FloatStorage` → `F32`, …).
    pub storage_type: String,
    pub storage: String,
    pub storage_numel: usize,
    pub offset: usize,
    pub shape: Vec<usize>,
    pub stride: Vec<usize>,
}

impl TensorRef {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// An open `torch.save` file.
pub struct TorchFile {
    archive: zip::ZipArchive<File>,
    /// The folder every entry sits in (`archive/`, or the file's stem).
    prefix: String,
    pub pickle: Pickle,
}

impl TorchFile {
    pub fn open(path: &Path) -> Result<Self, String> {
        let mut file = File::open(path).map_err(|e| e.to_string())?;
        check_zip_directory(&mut file)?;
        let mut archive = zip::ZipArchive::new(file).map_err(|e| {
            format!("not a PyTorch zip checkpoint ({e}); files from torch.save before PyTorch 1.6 (legacy format) are not supported")
        })?;
        let pkl = archive
            .file_names()
            .find(|n| n.ends_with("data.pkl") && n.matches('/').count() == 1)
            .map(str::to_string)
            .ok_or("the zip holds no <name>/data.pkl: not a torch.save file")?;
        let prefix = pkl.trim_end_matches("data.pkl").to_string();
        if let Ok(mut order) = archive.by_name(&format!("{prefix}byteorder")) {
            let mut s = String::new();
            order
                .by_ref()
                .take(16)
                .read_to_string(&mut s)
                .map_err(|e| e.to_string())?;
            if s.trim() != "little" {
                return Err(format!(
                    "byte order `{}` (only little-endian files are read)",
                    s.trim()
                ));
            }
        }
        let bytes = {
            let entry = archive.by_name(&pkl).map_err(|e| e.to_string())?;
            if entry.size() > MAX_PICKLE_BYTES {
                return Err(format!(
                    "its data.pkl is {} bytes (at most {MAX_PICKLE_BYTES})",
                    entry.size()
                ));
            }
            let mut buf = Vec::with_capacity(entry.size() as usize);
            entry
                .take(MAX_PICKLE_BYTES)
                .read_to_end(&mut buf)
                .map_err(|e| format!("reading data.pkl: {e}"))?;
            buf
        };
        let pickle = Pickle::parse(&bytes, TORCH_GLOBALS).map_err(|e| format!("data.pkl: {e}"))?;
        Ok(Self {
            archive,
            prefix,
            pickle,
        })
    }

    /// The tensor object `id` is (a `_rebuild_tensor_v2` or `_rebuild_parameter` call), or
    /// `None` when it is something else.
    pub fn tensor_ref(&self, id: Id) -> Option<Result<TensorRef, String>> {
        let p = &self.pickle;
        let Node::Call(f, args) = p.node(id) else {
            return None;
        };
        match p.global(*f)? {
            ("torch._utils", "_rebuild_tensor_v2") => Some(rebuild_args(p, *args)),
            // Parameter(tensor, requires_grad, hooks): the tensor is its first argument.
            ("torch._utils", "_rebuild_parameter") => {
                let inner = *p.items(*args)?.first()?;
                self.tensor_ref(inner)
            }
            _ => None,
        }
    }

    /// Reads `t` as f32 (from f32, f16 or bf16 storage), `cache` holding storages already
    /// read (tied weights share one).
    pub fn load(
        &mut self,
        t: &TensorRef,
        cache: &mut HashMap<String, std::sync::Arc<Vec<f32>>>,
    ) -> Result<Tensor, String> {
        let data = match cache.get(&t.storage) {
            Some(d) => d.clone(),
            None => {
                let d = std::sync::Arc::new(self.read_storage(t)?);
                cache.insert(t.storage.clone(), d.clone());
                d
            }
        };
        let n = t.numel();
        let values = if n == 0 {
            Vec::new()
        } else {
            // The last element the view reaches must lie inside the storage.
            let mut last = t.offset;
            for (&d, &s) in t.shape.iter().zip(&t.stride) {
                last = (d - 1)
                    .checked_mul(s)
                    .and_then(|x| x.checked_add(last))
                    .ok_or("a tensor's strides overflow")?;
            }
            if last >= data.len() {
                return Err(format!(
                    "a tensor of shape {:?} reaches element {last} of a storage of {}",
                    t.shape,
                    data.len()
                ));
            }
            if is_contiguous(&t.shape, &t.stride) {
                data[t.offset..t.offset + n].to_vec()
            } else {
                gather(&data, t)
            }
        };
        Tensor::from_vec(values, t.shape.as_slice(), &Device::Cpu).map_err(|e| e.to_string())
    }

    fn read_storage(&mut self, t: &TensorRef) -> Result<Vec<f32>, String> {
        let elem = match t.storage_type.as_str() {
            "FloatStorage" => 4,
            "HalfStorage" | "BFloat16Storage" => 2,
            other => return Err(format!("a weight in {other} (f32, f16 or bf16 are read)")),
        };
        let name = format!("{}data/{}", self.prefix, t.storage);
        let entry = self
            .archive
            .by_name(&name)
            .map_err(|_| format!("the storage `{}` is missing from the zip", t.storage))?;
        if entry.compression() != zip::CompressionMethod::Stored {
            return Err(format!(
                "the storage `{}` is compressed (torch.save stores them uncompressed)",
                t.storage
            ));
        }
        let want = t
            .storage_numel
            .checked_mul(elem)
            .ok_or("a storage size overflows")?;
        if entry.size() < want as u64 {
            return Err(format!(
                "the storage `{}` holds {} bytes where its {} elements need {want}",
                t.storage,
                entry.size(),
                t.storage_numel
            ));
        }
        let mut bytes = Vec::with_capacity(want);
        entry
            .take(want as u64)
            .read_to_end(&mut bytes)
            .map_err(|e| format!("reading storage `{}`: {e}", t.storage))?;
        if bytes.len() != want {
            return Err(format!("the storage `{}` is truncated", t.storage));
        }
        Ok(match t.storage_type.as_str() {
            "FloatStorage" => bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            "HalfStorage" => bytes
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            _ => bytes
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
        })
    }
}

/// `_rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks, ...)`, where the
/// storage is a persistent id `('storage', torch.XStorage, key, location, numel)`.
fn rebuild_args(p: &Pickle, args: Id) -> Result<TensorRef, String> {
    let bad = || "a tensor record that is not _rebuild_tensor_v2's".to_string();
    let a = p.items(args).ok_or_else(bad)?;
    if a.len() < 4 {
        return Err(bad());
    }
    let Node::Persistent(pid) = p.node(a[0]) else {
        return Err(bad());
    };
    let s = p.items(*pid).ok_or_else(bad)?;
    if s.len() != 5 || p.str(s[0]) != Some("storage") {
        return Err(bad());
    }
    let (_, storage_type) = p.global(s[1]).ok_or_else(bad)?;
    let key = p.str(s[2]).ok_or_else(bad)?;
    if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(format!("a storage key `{key}` that is not a plain name"));
    }
    let size = |id: Id| -> Result<usize, String> {
        p.int(id)
            .and_then(|v| usize::try_from(v).ok())
            .ok_or_else(bad)
    };
    let dims = |id: Id| -> Result<Vec<usize>, String> {
        p.items(id)
            .ok_or_else(bad)?
            .iter()
            .map(|&d| size(d))
            .collect()
    };
    let (shape, stride) = (dims(a[2])?, dims(a[3])?);
    if shape.len() != stride.len() || shape.len() > 8 {
        return Err(bad());
    }
    shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or("a tensor's element count overflows")?;
    Ok(TensorRef {
        storage_type: storage_type.to_string(),
        storage: key.to_string(),
        storage_numel: size(s[4])?,
        offset: size(a[1])?,
        shape,
        stride,
    })
}

fn is_contiguous(shape: &[usize], stride: &[usize]) -> bool {
    let mut expected = 1;
    for (&d, &s) in shape.iter().zip(stride).rev() {
        if d != 1 && s != expected {
            return false;
        }
        expected *= d;
    }
    true
}

/// The view's elements in row-major order (bounds checked by the caller).
fn gather(data: &[f32], t: &TensorRef) -> Vec<f32> {
    let n = t.numel();
    let mut out = Vec::with_capacity(n);
    let mut index = vec![0usize; t.shape.len()];
    for _ in 0..n {
        let at = t.offset
            + index
                .iter()
                .zip(&t.stride)
                .map(|(i, s)| i * s)
                .sum::<usize>();
        out.push(data[at]);
        for d in (0..index.len()).rev() {
            index[d] += 1;
            if index[d] < t.shape[d] {
                break;
            }
            index[d] = 0;
        }
    }
    out
}

/// Checks the zip's end-of-central-directory record before the zip crate sizes its entry
/// table from it: a crafted count must not become a giant allocation.
fn check_zip_directory(file: &mut File) -> Result<(), String> {
    let len = file.metadata().map_err(|e| e.to_string())?.len();
    let tail_len = len.min(65_557);
    let mut tail = vec![0u8; tail_len as usize];
    file.seek(SeekFrom::Start(len - tail_len))
        .and_then(|_| file.read_exact(&mut tail))
        .map_err(|e| e.to_string())?;
    let Some(at) = tail
        .windows(4)
        .rposition(|w| w == [0x50, 0x4b, 0x05, 0x06])
        .filter(|&at| at + 22 <= tail.len())
    else {
        return Err(
            "not a zip file (no end-of-central-directory record): not a torch.save checkpoint"
                .into(),
        );
    };
    let mut entries = u16::from_le_bytes([tail[at + 10], tail[at + 11]]) as u64;
    if entries == 0xffff && at >= 20 && tail[at - 20..at - 16] == [0x50, 0x4b, 0x06, 0x07] {
        // Zip64: the locator points at the zip64 record, which holds the real count.
        let off = u64::from_le_bytes(tail[at - 12..at - 4].try_into().unwrap_or_default());
        let mut rec = [0u8; 56];
        if off.checked_add(56).is_none_or(|end| end > len) {
            return Err("a zip64 directory record outside the file".into());
        }
        file.seek(SeekFrom::Start(off))
            .and_then(|_| file.read_exact(&mut rec))
            .map_err(|e| e.to_string())?;
        entries = u64::from_le_bytes(rec[32..40].try_into().unwrap_or_default());
    }
    if entries > MAX_ZIP_ENTRIES || entries.saturating_mul(46) > len {
        return Err(format!(
            "its zip directory claims {entries} entries in {len} bytes"
        ));
    }
    file.seek(SeekFrom::Start(0)).map_err(|e| e.to_string())?;
    Ok(())
}
