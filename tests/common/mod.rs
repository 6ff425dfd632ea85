//! Shared helpers for integration tests: the real models, loaded once per test binary; waits
//! on a condition with a deadline; the router in-process ([`http`]).
#![allow(dead_code)]

pub mod http;

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
    let tensors = tokenscope::model::llama::random_weights(&cfg, seed, &Device::Cpu).unwrap();
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
        .timeout_global(timeout)
        .build()
        .into()
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
