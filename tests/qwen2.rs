//! Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF: Q4_K, Q5_0, Q6_K, Q8_0 and F32 tensors, q/k/v
//! biases, untied head) against candle-transformers' independent `quantized_qwen2` run on the
//! same file with every weight dequantized: full-vocabulary log-probs within what f32
//! rounding explains in two f32 evaluations (`common::f32_logprob_bound`).

mod common;

use std::sync::OnceLock;

use candle_core::quantized::gguf_file;
use candle_core::Device;
use tokenscope::model::{self, LoadOptions, LoadedModel, ModelSource};

fn qwen_path() -> std::path::PathBuf {
    common::test_asset("qwen2.5-coder-0.5b-instruct-q4_k_m.gguf")
}

fn qwen() -> &'static LoadedModel {
    static MODEL: OnceLock<LoadedModel> = OnceLock::new();
    MODEL.get_or_init(|| {
        model::load(&ModelSource::Gguf(qwen_path()), &LoadOptions::default()).unwrap()
    })
}

fn reference_logprobs(ids: &[u32]) -> Vec<f32> {
    // Must be set before this thread builds its first QMatMul (the flag is read once).
    std::env::set_var("CANDLE_DEQUANTIZE_ALL", "1");
    let path = qwen_path();
    let mut file = std::fs::File::open(&path).unwrap();
    let content = gguf_file::Content::read(&mut file).unwrap();
    let mut reference = candle_transformers::models::quantized_qwen2::ModelWeights::from_gguf(
        content,
        &mut file,
        &Device::Cpu,
    )
    .unwrap();
    common::logprobs_of(reference.forward(&common::batch(ids), 0).unwrap())
}

const CODE_PROMPT: &str = "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n    \
    if n < 2:\n        return n\n    a, b = 0, 1\n    for _ in range(n - 1):\n        a, b = b, a + b\n    \
    return b\n\n\ndef is_prime(n):\n    \"\"\"Return True when n is a prime number.\"\"\"\n    if n < 2:\n        \
    return False\n    for d in range(2, int(n ** 0.5) + 1):\n        if n % d == 0:\n            \
    return False\n    return True\n\n\ndef primes_below(limit):\n    \"\"\"All primes below limit, \
    in increasing order.\"\"\"\n    return [";

#[test]
fn matches_candle_quantized_qwen2_dequantized() {
    let m = qwen();
    assert_eq!(m.architecture, "qwen2");
    assert_eq!(m.model.config().vocab_size, 151936);
    assert!(
        !m.model.config().tie_word_embeddings,
        "this file has its own output.weight"
    );
    let short = m.tokenizer.encode("The capital of France is").unwrap();
    let long = m.tokenizer.encode(CODE_PROMPT).unwrap();
    assert!(long.len() >= 128, "long prompt has {} tokens", long.len());
    for ids in [&short, &long] {
        let ours = common::next_logprobs(&m.model, ids);
        let reference = reference_logprobs(ids);
        let diff = common::max_abs_diff(&ours, &reference) as f64;
        eprintln!("qwen2, {} tokens: max |Δ logprob| = {diff:e}", ids.len());
        let pass = common::pass_of(m.model.config(), ids.len());
        let bound = common::f32_logprob_bound(pass, &reference, 2);
        assert!(diff <= bound, "{} tokens: {diff} > {bound}", ids.len());
    }
}

#[test]
fn answers_sensibly_through_the_engine() {
    use tokenscope::engine::{self, GenerateParams};
    let m = qwen();
    // Qwen2 adds no BOS: the ids are the text's own.
    let ids = m.tokenizer.encode("The capital of France is").unwrap();
    assert_eq!(
        m.tokenizer.decode(&ids, false).unwrap(),
        "The capital of France is"
    );
    let params = GenerateParams {
        temperature: 0.0,
        max_tokens: 1,
        ..Default::default()
    };
    let r = engine::generate(m, "The capital of France is", &ids, &params, &|| false).unwrap();
    assert_eq!(r.tokens[0].token, " Paris", "{:?}", r.tokens);
    let code = engine::generate(
        m,
        CODE_PROMPT,
        &m.tokenizer.encode(CODE_PROMPT).unwrap(),
        &params,
        &|| false,
    )
    .unwrap();
    // After `return [` the model starts an expression (a comprehension's variable), not prose.
    let first = &code.tokens[0].token;
    assert!(
        first.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') && !first.is_empty(),
        "{:?}",
        code.tokens
    );
}

/// The Hugging Face directory path: a tiny random-weight Qwen2 (biases on q/k/v, GQA, untied
/// head) written with HF's names and a `model_type: qwen2` config.json, against
/// candle-transformers' independent `qwen2` on the same files.
#[test]
fn hf_directory_matches_candle_qwen2() {
    use candle_core::DType;
    use candle_nn::VarBuilder;
    use tokenscope::model::{Config, Family};

    let mut cfg = Config::tiny(49152);
    cfg.family = Family::qwen2();
    cfg.tie_word_embeddings = false;
    cfg.rope_theta = 1_000_000.0;
    cfg.rms_norm_eps = 1e-6;
    let tensors = tokenscope::model::init::random_weights(&cfg, 41, &Device::Cpu).unwrap();
    assert!(tensors.contains_key("model.layers.0.self_attn.k_proj.bias"));
    let dir = tempfile::tempdir().unwrap();
    candle_core::safetensors::save(&tensors, dir.path().join("model.safetensors")).unwrap();
    let config = serde_json::json!({
        "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"],
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads, "max_position_embeddings": 512,
        "sliding_window": 512, "max_window_layers": 2, "use_sliding_window": false,
        "tie_word_embeddings": false, "rope_theta": 1_000_000.0, "rms_norm_eps": 1e-6,
        "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2,
    });
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    common::smollm()
        .tokenizer
        .inner()
        .save(dir.path().join("tokenizer.json"), false)
        .unwrap();

    let ours = model::load(
        &ModelSource::HfDir(dir.path().into()),
        &LoadOptions::default(),
    )
    .unwrap();
    assert_eq!(ours.architecture, "qwen2");
    let ids = ours.tokenizer.encode(CODE_PROMPT).unwrap();
    let got = common::next_logprobs(&ours.model, &ids);

    use candle_transformers::models::qwen2 as reference;
    let rcfg: reference::Config = serde_json::from_value(config).unwrap();
    let weights = dir.path().join("model.safetensors");
    // SAFETY: a temporary file this test wrote and nobody modifies.
    // f32: candle's RmsNorm has no f64 kernel.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[weights], DType::F32, &Device::Cpu) }
        .unwrap();
    let mut r = reference::ModelForCausalLM::new(&rcfg, vb).unwrap();
    let want = common::logprobs_of(r.forward(&common::batch(ids.as_slice()), 0).unwrap());
    let diff = common::max_abs_diff(&got, &want) as f64;
    eprintln!(
        "qwen2 HF directory, {} tokens: max |Δ logprob| vs candle qwen2 = {diff:e}",
        ids.len()
    );
    let bound = common::f32_logprob_bound(common::pass_of(&cfg, ids.len()), &want, 2);
    assert!(diff <= bound, "{diff} > {bound}");

    // Qwen2's sliding window is refused rather than ignored.
    let mut sliding = serde_json::from_str::<serde_json::Value>(
        &std::fs::read_to_string(dir.path().join("config.json")).unwrap(),
    )
    .unwrap();
    sliding["use_sliding_window"] = true.into();
    std::fs::write(dir.path().join("config.json"), sliding.to_string()).unwrap();
    let err = model::load(
        &ModelSource::HfDir(dir.path().into()),
        &LoadOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("use_sliding_window"), "{err}");
}
