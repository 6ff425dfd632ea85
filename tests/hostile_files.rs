//! Model files are untrusted input: a crafted or damaged GGUF must be refused with a reason,
//! never abort the process (candle's reader trusts the header's lengths; the bounded walk in
//! `model::gguf_header` runs first). Crafted headers for each length and count a file
//! declares, then a time-bounded mutation fuzz over real headers.

mod common;

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use tokenscope::model::gguf::GgufFile;
use tokenscope::model::probe::probe;
use tokenscope::model::ModelSource;

const MAGIC: &[u8] = b"GGUF";

/// GGUF v3 header writer: the pieces a crafted file is made of.
#[derive(Default)]
struct Header(Vec<u8>);

impl Header {
    fn start(tensors: u64, kvs: u64) -> Self {
        let mut h = Header::default();
        h.0.extend_from_slice(MAGIC);
        h.u32(3).u64(tensors).u64(kvs);
        h
    }
    fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn str(&mut self, s: &str) -> &mut Self {
        self.u64(s.len() as u64);
        self.0.extend_from_slice(s.as_bytes());
        self
    }
    fn kv_str(&mut self, key: &str, value: &str) -> &mut Self {
        self.str(key).u32(8).str(value)
    }
    /// The header and 64 bytes of room after it, so that each crafted file meets the check
    /// of its own defect rather than running out of bytes first.
    fn bytes(&self) -> Vec<u8> {
        let mut b = self.0.clone();
        b.extend([0u8; 64]);
        b
    }
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::File::create(&path)
        .unwrap()
        .write_all(bytes)
        .unwrap();
    path
}

/// Opens `bytes` as a GGUF and probes it: both must refuse it with a reason (and not abort).
fn refused(dir: &Path, name: &str, bytes: &[u8], says: &str) {
    let path = write(dir, name, bytes);
    let err = match GgufFile::open(&path) {
        Ok(_) => panic!("{name}: opened"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains(says), "{name}: {err}");
    let card = probe(&ModelSource::Gguf(path));
    assert!(
        card.error.as_deref().is_some_and(|e| e.contains(says)),
        "{name}: {card:?}"
    );
}

#[test]
fn crafted_headers_are_refused_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // A metadata string of 2^40 bytes (candle would allocate it: the process aborted).
    let mut h = Header::start(0, 1);
    h.str("general.name").u32(8).u64(1 << 40);
    refused(
        d,
        "long_string.gguf",
        &h.bytes(),
        "passes the end of the file",
    );
    // A key of 2^40 bytes.
    let mut h = Header::start(0, 1);
    h.u64(1 << 40);
    refused(d, "long_key.gguf", &h.bytes(), "longer than the file");
    // More tensors than the file could hold (/models answered [] and /status 500).
    let mut h = Header::start(1 << 40, 0);
    h.u64(0);
    refused(d, "many_tensors.gguf", &h.bytes(), "tensors");
    let mut h = Header::start(0, 1 << 40);
    h.u64(0);
    refused(d, "many_kvs.gguf", &h.bytes(), "metadata entries");
    // An array of 2^40 elements.
    let mut h = Header::start(0, 1);
    h.str("tokenizer.ggml.scores").u32(9).u32(6).u64(1 << 40);
    refused(d, "long_array.gguf", &h.bytes(), "array of");
    // Arrays nested too deep.
    let mut h = Header::start(0, 1);
    h.str("x").u32(9).u32(9).u64(1).u32(9).u64(1).u32(9).u64(1);
    refused(d, "nested.gguf", &h.bytes(), "nested");
    // An alignment of 0 (candle divides by it).
    let mut h = Header::start(0, 1);
    h.str("general.alignment").u32(4).u32(0);
    refused(d, "alignment.gguf", &h.bytes(), "general.alignment");
    // Unknown value and tensor types.
    let mut h = Header::start(0, 1);
    h.str("x").u32(77).u32(0);
    refused(d, "value_type.gguf", &h.bytes(), "unknown value type");
    let mut h = Header::start(1, 1);
    h.kv_str("general.architecture", "llama");
    h.str("w").u32(1).u64(32).u32(99).u64(0);
    refused(
        d,
        "tensor_type.gguf",
        &h.bytes(),
        "type this reader does not know",
    );
    // Too many dimensions, an element count that overflows, data past the end of the file.
    let mut h = Header::start(1, 0);
    h.str("w").u32(1000);
    refused(d, "dims.gguf", &h.bytes(), "dimensions");
    let mut h = Header::start(1, 0);
    h.str("w")
        .u32(4)
        .u64(u64::MAX)
        .u64(u64::MAX)
        .u64(2)
        .u64(2)
        .u32(0)
        .u64(0);
    refused(d, "overflow.gguf", &h.bytes(), "overflows");
    let mut h = Header::start(1, 0);
    h.str("w").u32(1).u64(1 << 20).u32(0).u64(0);
    refused(d, "outside.gguf", &h.bytes(), "outside the file");
    // Not GGUF at all, and cut short.
    refused(d, "text.gguf", b"hello, world", "not a GGUF file");
    refused(d, "short.gguf", b"GGUF\x03\x00", "ends inside");
}

/// A small valid GGUF (written by candle): metadata of every kind a model file has (strings,
/// arrays of strings and numbers, integers, floats) and tensors of two types.
fn small_gguf() -> Vec<u8> {
    use gguf_file::Value as V;
    let dev = Device::Cpu;
    let tokens: Vec<V> = (0..64).map(|i| V::String(format!("tok{i}"))).collect();
    let scores: Vec<V> = (0..64).map(|i| V::F32(i as f32)).collect();
    let metadata = [
        ("general.architecture", V::String("llama".into())),
        ("general.alignment", V::U32(32)),
        ("llama.block_count", V::U32(1)),
        ("llama.context_length", V::U32(64)),
        ("llama.embedding_length", V::U32(32)),
        ("llama.feed_forward_length", V::U32(64)),
        ("llama.attention.head_count", V::U32(4)),
        ("llama.attention.layer_norm_rms_epsilon", V::F32(1e-5)),
        ("tokenizer.ggml.model", V::String("llama".into())),
        ("tokenizer.ggml.tokens", V::Array(tokens)),
        ("tokenizer.ggml.scores", V::Array(scores)),
        ("tokenizer.ggml.bos_token_id", V::U32(1)),
    ];
    let a = Tensor::arange(0f32, 64.0 * 32.0, &dev)
        .unwrap()
        .reshape((64, 32))
        .unwrap();
    let q8 = QTensor::quantize(&a, GgmlDType::Q8_0).unwrap();
    let norm = Tensor::ones(32, candle_core::DType::F32, &dev).unwrap();
    let f32 = QTensor::quantize(&norm, GgmlDType::F32).unwrap();
    let meta: Vec<(&str, &V)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    let mut out = std::io::Cursor::new(Vec::new());
    gguf_file::write(
        &mut out,
        &meta,
        &[("token_embd.weight", &q8), ("output_norm.weight", &f32)],
    )
    .unwrap();
    out.into_inner()
}

/// One mutation of a header: a byte flipped, or a length/count field set to an extreme.
fn mutate(rng: &mut rand_chacha::ChaCha8Rng, bytes: &mut [u8], header_len: usize) {
    let header_len = header_len.min(bytes.len());
    for _ in 0..rng.random_range(1..4) {
        let at = rng.random_range(0..header_len);
        match rng.random_range(0..4) {
            0 => bytes[at] ^= 1 << rng.random_range(0..8),
            1 => bytes[at] = rng.random(),
            _ => {
                let extremes = [
                    0u64,
                    1,
                    u64::MAX,
                    1 << 40,
                    1 << 31,
                    u32::MAX as u64,
                    bytes.len() as u64,
                ];
                let v = extremes[rng.random_range(0..extremes.len())];
                let end = (at + 8).min(bytes.len());
                bytes[at..end].copy_from_slice(&v.to_le_bytes()[..end - at]);
            }
        }
    }
}

/// Mutated copies of `base` opened and probed for `budget`: every one opens or is refused,
/// none panics or aborts the process. `sparse_len`: each copy is extended to this length with
/// a hole (the real model's tensor data, without writing 100 MB per try).
fn fuzz(
    name: &str,
    base: &[u8],
    header_len: usize,
    sparse_len: Option<u64>,
    budget: Duration,
    seed: u64,
) -> usize {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(format!("{name}.gguf"));
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let start = Instant::now();
    let mut tried = 0;
    while start.elapsed() < budget {
        let mut bytes = base.to_vec();
        mutate(&mut rng, &mut bytes, header_len);
        if rng.random_range(0..8) == 0 {
            let cut = rng.random_range(0..bytes.len());
            bytes.truncate(cut);
        }
        std::fs::write(&path, &bytes).unwrap();
        if let Some(len) = sparse_len.filter(|_| bytes.len() == base.len()) {
            std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .unwrap()
                .set_len(len)
                .unwrap();
        }
        let opened = std::panic::catch_unwind(|| {
            if let Ok(file) = GgufFile::open(&path) {
                let _ = file.config();
            }
            probe(&ModelSource::Gguf(path.clone()))
        });
        if opened.is_err() {
            let keep = std::env::temp_dir().join(format!("tokenscope-fuzz-{name}.gguf"));
            std::fs::write(&keep, &bytes).unwrap();
            panic!(
                "{name}: mutation {tried} (seed {seed}) panicked; the file is kept at {}",
                keep.display()
            );
        }
        tried += 1;
    }
    tried
}

#[test]
fn mutated_headers_open_or_are_refused_never_crash() {
    // The seed changes from run to run (printed, so a failure can be replayed).
    let seed = std::env::var("TOKENSCOPE_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("fuzz seed {seed} (TOKENSCOPE_FUZZ_SEED replays it)");
    let small = small_gguf();
    let n = fuzz(
        "small",
        &small,
        small.len(),
        None,
        Duration::from_secs(8),
        seed,
    );
    assert!(n > 100, "only {n} mutations tried");
    // The real default model's header (its vocabulary is the bulk of it).
    let path = common::default_gguf();
    let header_len = GgufFile::open(&path).unwrap().content.tensor_data_offset as usize;
    let len = std::fs::metadata(&path).unwrap().len();
    let mut head = vec![0u8; header_len];
    std::io::Read::read_exact(&mut std::fs::File::open(&path).unwrap(), &mut head).unwrap();
    let n = fuzz(
        "smollm2",
        &head,
        header_len,
        Some(len),
        Duration::from_secs(8),
        seed,
    );
    assert!(n > 5, "only {n} mutations tried");
}
