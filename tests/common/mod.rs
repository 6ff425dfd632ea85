//! Shared helpers for integration tests: the real models, loaded once per test binary; waits
//! on a condition with a deadline; the router in-process ([`http`]).
#![allow(dead_code)]

pub mod http;
pub mod server;

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use tokenscope::model::{self, LoadOptions, LoadedModel, ModelSource};

/// Path of the default GGUF; `scripts/setup.sh` (run by the README's test command) fetches it.
pub fn default_gguf() -> PathBuf {
    model::default_model_path()
        .expect("default model missing: run ./scripts/setup.sh (the README's test command does)")
}

/// The default model in f32 on CPU, shared by the tests of one binary.
pub fn smollm() -> &'static LoadedModel {
    static MODEL: OnceLock<LoadedModel> = OnceLock::new();
    MODEL.get_or_init(|| {
        model::load(&ModelSource::Gguf(default_gguf()), &LoadOptions::default())
            .expect("default model loads")
    })
}

/// Writes a tiny random-weight llama (SmolLM2's tokenizer, 2 layers, hidden 64) as a
/// Hugging Face directory and returns the in-memory model it was saved from.
pub fn write_tiny_llama(dir: &std::path::Path, seed: u64) -> tokenscope::model::Decoder {
    let mut cfg = tokenscope::model::Config::tiny(49152);
    cfg.eos_token_id = Some(tokenscope::model::EosTokenId::One(2));
    write_llama(dir, &cfg, seed)
}

/// Writes a random-weight llama of any shape as a Hugging Face directory.
pub fn write_llama(
    dir: &std::path::Path,
    cfg: &tokenscope::model::Config,
    seed: u64,
) -> tokenscope::model::Decoder {
    use candle_core::{DType, Device};
    use candle_nn::VarBuilder;
    use tokenscope::model::{hf_dir, Decoder};

    let cfg = cfg.clone();
    let tensors = tokenscope::model::init::random_weights(&cfg, seed, &Device::Cpu).unwrap();
    let vb = VarBuilder::from_tensors(tensors.clone(), DType::F32, &Device::Cpu);
    let model = Decoder::load(vb, &cfg).unwrap();
    hf_dir::save(dir, &cfg, &tensors, &smollm().tokenizer, DType::F32).unwrap();
    model
}

/// Full-vocabulary log-probs of the next token after `ids` (one forward pass, T = 1).
pub fn next_logprobs(model: &tokenscope::model::Decoder, ids: &[u32]) -> Vec<f32> {
    let logits = model.next_logits(ids, &mut model.new_cache()).unwrap();
    tokenscope::engine::distribution::log_softmax(&logits)
}

/// Largest element-wise difference of two tensors of the same shape.
pub fn max_abs_diff_tensors(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap()
}

/// Largest element-wise difference of two equally long vectors.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// llama.cpp's converter's q/k row order for llama: (heads, 2, head_dim/2) → (heads,
/// head_dim/2, 2) — the inverse of the loader's un-permutation.
pub fn permute_qk(w: &candle_core::Tensor, n_head: usize) -> candle_core::Tensor {
    let (rows, cols) = w.dims2().unwrap();
    w.reshape((n_head, 2, rows / n_head / 2, cols))
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .reshape((rows, cols))
        .unwrap()
}

/// A model file that `scripts/setup.sh --test-assets` fetched into `models/`.
pub fn test_asset(name: &str) -> PathBuf {
    let path = default_gguf().parent().unwrap().join(name);
    assert!(
        path.is_file(),
        "{} missing: run ./scripts/setup.sh --test-assets",
        path.display()
    );
    path
}

/// Gemma 3 270M (Q4_K_M), a `--test-assets` file.
pub fn gemma3_path() -> PathBuf {
    test_asset("gemma-3-270m-q4_k_m.gguf")
}

/// Gemma 3 270M in f32 on CPU, shared by the tests of one binary.
pub fn gemma3() -> &'static LoadedModel {
    static MODEL: OnceLock<LoadedModel> = OnceLock::new();
    MODEL.get_or_init(|| {
        model::load(&ModelSource::Gguf(gemma3_path()), &LoadOptions::default()).unwrap()
    })
}

/// A (1, t) batch of token ids, as the reference implementations take them.
pub fn batch(ids: &[u32]) -> candle_core::Tensor {
    candle_core::Tensor::new(ids, &candle_core::Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap()
}

/// Log-probs of a reference's last-position logits (any shape holding one vocabulary row).
pub fn logprobs_of(logits: candle_core::Tensor) -> Vec<f32> {
    let logits: Vec<f32> = logits.flatten_all().unwrap().to_vec1().unwrap();
    tokenscope::engine::distribution::log_softmax(&logits)
}

/// A loopback port nobody listens on (for the tests that start the real binary).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A blocking HTTP client that returns every status as a response (for the tests that start
/// the real binary), with a limit on each whole request when `timeout` is given.
pub fn http_agent(timeout: Option<Duration>) -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        // Below the server's idle keep-alive limit (`--header-timeout`, 10 s by default), so
        // that a pooled connection is never reused as the server closes it.
        .max_idle_age(Duration::from_secs(5))
        .timeout_global(timeout)
        .build()
        .into()
}

/// A file of little-endian f32s (what the reference scripts write).
pub fn read_f32(path: &std::path::Path) -> Vec<f32> {
    std::fs::read(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// How often [`wait_until`] and [`wait_until_async`] look again.
const POLL: Duration = Duration::from_millis(20);

/// Blocks until `cond` holds, looking every 20 ms; panics naming `what` once `timeout` has
/// passed without it. Tests wait on what they need this way, not with a sleep that hopes to
/// be long enough (too short on a loaded machine, too long everywhere else).
pub fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(POLL);
    }
}

/// [`wait_until`] for async tests: `cond` is awaited, and the runtime runs between looks
/// (a blocking sleep would stall a single-threaded test runtime).
pub async fn wait_until_async<F, Fut>(what: &str, timeout: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !cond().await {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// f32's unit roundoff, 2⁻²⁴: the largest relative error of one correctly rounded operation.
pub const F32_UNIT_ROUNDOFF: f64 = 1.0 / 16_777_216.0;

/// The shape of a forward pass, as far as rounding is concerned.
#[derive(Debug, Clone, Copy)]
pub struct Pass {
    pub layers: usize,
    pub hidden: usize,
    /// The MLP's inner width.
    pub ffn: usize,
    /// Tokens the last position attends to (the attention's weighted sum runs over them).
    pub tokens: usize,
}

impl Pass {
    /// The number of additions, summed over every stage, that a value of the last position's
    /// residual stream goes through on its way to the logits. One block is a chain of sums:
    /// its first norm (over `hidden`), a q/k/v projection (over `hidden`), the scores (over
    /// the head dimension, at most `hidden`), the attention's weighted sum (over `tokens`),
    /// the output projection and the second norm (over `hidden` each), gate/up (over
    /// `hidden`) and down (over `ffn`); the head adds one more sum over `hidden`.
    pub fn sums(&self) -> usize {
        self.layers * (6 * self.hidden + self.ffn + self.tokens) + self.hidden
    }
}

/// The largest |Δ log-prob| that f32 rounding explains in `pass`, derived, not tuned on a
/// machine, so that it holds whatever order a CPU's kernels sum in (AVX-512, AVX2, portable,
/// gemm's cache-dependent blocking):
/// - each of the `pass.sums()` additions a value goes through adds an independent relative
///   error of at most u = 2⁻²⁴; independent errors grow like their count's square root (the
///   probabilistic rounding bound of Higham & Mary, SIAM J. Sci. Comput. 2019, with λ = 1),
///   so the logits are off by about u·√sums relative to their size;
/// - the logits' size is their spread (max − min, which the vocabulary's log-probs show as
///   `-min(logprob)`), as they are a shift-invariant quantity;
/// - log-softmax at most doubles an absolute logit error (the token's own, and the
///   normaliser's weighted mean of the others);
/// - `f32_sides`: 1 against a float64 reference, 2 between two f32 evaluations (their errors
///   add).
///
/// Length, depth, width and vocabulary (through the spread) all enter; a real error in the
/// maths (a mask one position off, a norm's epsilon, f16 rounding of an activation) moves
/// log-probs by 1e-3 to 1e-1 and stays far above it.
pub fn f32_logprob_bound(pass: Pass, logprobs: &[f32], f32_sides: u32) -> f64 {
    let spread = logprobs
        .iter()
        .filter(|l| l.is_finite())
        .fold(0f64, |m, &l| m.max(-(l as f64)));
    let bound = 2.0 * f32_sides as f64 * F32_UNIT_ROUNDOFF * (pass.sums() as f64).sqrt() * spread;
    eprintln!(
        "  f32 bound: {} sums, logit spread {spread:.1}, {f32_sides} f32 side(s) → {bound:.2e}",
        pass.sums()
    );
    bound
}

/// Log-probs of a float64 reference's last-position logits, computed in f64.
pub fn logprobs_of_f64(logits: candle_core::Tensor) -> Vec<f64> {
    let z: Vec<f64> = logits
        .to_dtype(candle_core::DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let max = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let lse = max + z.iter().map(|v| (v - max).exp()).sum::<f64>().ln();
    z.iter().map(|v| v - lse).collect()
}

/// Largest difference between f32 log-probs and a float64 reference's.
pub fn max_abs_diff_f64(ours: &[f32], exact: &[f64]) -> f64 {
    assert_eq!(ours.len(), exact.len());
    ours.iter()
        .zip(exact)
        .map(|(&a, &b)| (a as f64 - b).abs())
        .fold(0.0, f64::max)
}

/// The [`Pass`] of a model of ours over `tokens` tokens.
pub fn pass_of(cfg: &tokenscope::model::Config, tokens: usize) -> Pass {
    Pass {
        layers: cfg.num_hidden_layers,
        hidden: cfg.hidden_size,
        ffn: cfg.intermediate_size,
        tokens,
    }
}

/// Asserts that two f32 evaluations of the same network's next-token log-probs (through
/// different kernels or orders of work) agree within [`f32_logprob_bound`] with two f32
/// sides; returns the difference.
pub fn assert_f32_close(what: &str, a: &[f32], b: &[f32], pass: Pass) -> f64 {
    let diff = max_abs_diff(a, b) as f64;
    let bound = f32_logprob_bound(pass, b, 2);
    eprintln!("{what}: max |Δ logprob| = {diff:.2e} (bound {bound:.2e})");
    assert!(diff <= bound, "{what}: max |Δ logprob| = {diff} > {bound}");
    diff
}

/// [`assert_f32_close`] on the default model after `tokens` tokens.
pub fn assert_smollm_close(what: &str, a: &[f32], b: &[f32], tokens: usize) -> f64 {
    assert_f32_close(what, a, b, pass_of(smollm().model.config(), tokens))
}

/// Log-probs (positions × vocab) of every position of `ids`, from one pass.
pub fn all_logprobs(m: &LoadedModel, ids: &[u32]) -> Vec<Vec<f32>> {
    let input = candle_core::Tensor::new(ids, &candle_core::Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let logits = m
        .model
        .forward_all(&input, &mut m.model.new_cache())
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    logits
        .iter()
        .map(|l| tokenscope::engine::distribution::log_softmax(l))
        .collect()
}

/// The machine's cache of reference environments (scripts/lib/cache.sh's rule:
/// TOKENSCOPE_CACHE, else $XDG_CACHE_HOME/tokenscope, else ~/.cache/tokenscope).
pub fn cache_dir() -> PathBuf {
    std::env::var_os("TOKENSCOPE_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("tokenscope")))
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/tokenscope")
        })
}

/// The largest |Δ log-prob| of `m` against a reference file (`{"prompts": [{"prompt", "ids",
/// "vocab", "file"}]}`, each file the f32 log-softmax at every position, in `reference`'s
/// folder), over every position and token: the text in one pass, and again prefilled to half
/// and then a token at a time. Tokens and vocabulary are checked first; `label` names the
/// model in failures.
pub fn against_reference(m: &LoadedModel, reference: &std::path::Path, label: &str) -> f32 {
    let dir = reference.parent().unwrap();
    let raw = std::fs::read_to_string(reference).unwrap();
    let json: serde_json::Value = serde_json::from_str(&raw).unwrap();
    let mut worst = 0f32;
    for p in json["prompts"].as_array().unwrap() {
        let prompt = p["prompt"].as_str().unwrap();
        let vocab = p["vocab"].as_u64().unwrap() as usize;
        let ids: Vec<u32> = p["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(
            m.tokenizer.encode(prompt).unwrap(),
            ids,
            "{label}: tokens of {prompt:?}"
        );
        assert_eq!(
            m.model.config().vocab_size,
            vocab,
            "{label}: real tokens only"
        );
        let theirs = read_f32(&dir.join(p["file"].as_str().unwrap()));
        assert_eq!(theirs.len(), ids.len() * vocab, "{label}: reference size");
        let at = |pos: usize| &theirs[pos * vocab..(pos + 1) * vocab];
        for (pos, ours) in all_logprobs(m, &ids).iter().enumerate() {
            let d = max_abs_diff(ours, at(pos));
            assert!(
                d <= 1e-4,
                "{label}: position {pos} of {prompt:?} differs by {d}"
            );
            worst = worst.max(d);
        }
        let half = ids.len() / 2;
        let mut cache = m.model.new_cache();
        m.model.next_logits(&ids[..half], &mut cache).unwrap();
        for (pos, &id) in ids.iter().enumerate().skip(half) {
            let l = m.model.next_logits(&[id], &mut cache).unwrap();
            let ours = tokenscope::engine::distribution::log_softmax(&l);
            let d = max_abs_diff(&ours, at(pos));
            assert!(
                d <= 1e-4,
                "{label}: incremental position {pos} differs by {d}"
            );
            worst = worst.max(d);
        }
    }
    worst
}
