//! A model loads exactly or not at all: Llama 3's rope scaling (config.json `rope_scaling`,
//! GGUF `rope_freqs.weight`) checked against candle-transformers' independent `llama`; every
//! config feature or tensor the implementation lacks is a load error that names it; the final
//! norm and head run in f32 whatever the weights' dtype.

mod common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde_json::json;
use tokenscope::model::{self, Config, LoadOptions, ModelSource};

/// Llama 3.1's scaling, shrunk to the tiny model: with head_dim 16 and base 10 000 the eight
/// wavelengths are 6.3 … 19 869 positions, so with an original context of 64 (high/low
/// wavelength bounds 16 and 64) one frequency is kept, two are on the smooth ramp and five are
/// divided by the factor: every branch of the formula is used.
fn llama3_scaling() -> serde_json::Value {
    json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
           "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
}

fn tiny_config() -> Config {
    let mut cfg = Config::tiny(49152);
    cfg.max_position_embeddings = 512;
    cfg
}

fn prompt_ids() -> Vec<u32> {
    let text = "Rope scaling changes how far apart positions look to attention: with a factor \
                of eight, the low frequencies turn slower, so that a model trained on short \
                contexts can read long ones. This prompt is long enough for that to matter, \
                running well past the original context of sixty-four positions.";
    let ids = common::smollm().tokenizer.encode(&text.repeat(2)).unwrap();
    assert!(ids.len() > 64, "{} tokens", ids.len());
    ids
}

/// candle-transformers' llama on the same directory: the last position's log-probs.
/// candle-transformers' llama on the directory's weights, in f32 (its RmsNorm has no f64
/// kernel): the two f32 evaluations agree within `common::f32_logprob_bound`.
fn reference_logprobs(dir: &Path, ids: &[u32]) -> Vec<f32> {
    use candle_transformers::models::llama as reference;
    let raw = std::fs::read_to_string(dir.join("config.json")).unwrap();
    let cfg: reference::LlamaConfig = serde_json::from_str(&raw).unwrap();
    let cfg = cfg.into_config(false);
    let weights = dir.join("model.safetensors");
    // SAFETY: a temporary file this test wrote and nobody modifies.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[weights], DType::F32, &Device::Cpu) }
        .unwrap();
    let model = reference::Llama::load(vb, &cfg).unwrap();
    let mut cache = reference::Cache::new(true, DType::F32, &cfg, &Device::Cpu).unwrap();
    common::logprobs_of(model.forward(&common::batch(ids), 0, &mut cache).unwrap())
}

fn load(path: &Path) -> Result<model::LoadedModel, model::ModelError> {
    let source = if path.is_dir() {
        ModelSource::HfDir(path.into())
    } else {
        ModelSource::Gguf(path.into())
    };
    model::load(&source, &LoadOptions::default())
}

#[test]
fn llama3_rope_scaling_matches_candle_transformers() {
    let ids = prompt_ids();
    let scaled_dir = tempfile::tempdir().unwrap();
    let mut cfg = tiny_config();
    cfg.rope_scaling = Some(llama3_scaling());
    common::write_llama(scaled_dir.path(), &cfg, 31);
    let ours = load(scaled_dir.path()).unwrap();
    let got = common::next_logprobs(&ours.model, &ids);
    let want = reference_logprobs(scaled_dir.path(), &ids);
    let diff = common::max_abs_diff(&got, &want) as f64;
    eprintln!("llama3 rope scaling: max |Δ logprob| vs candle-transformers = {diff:e}");
    let bound = common::f32_logprob_bound(common::pass_of(&cfg, ids.len()), &want, 2);
    assert!(diff <= bound, "{diff} > {bound}");

    // The same weights without the scaling give other numbers: the test can see it.
    let plain_dir = tempfile::tempdir().unwrap();
    common::write_llama(plain_dir.path(), &tiny_config(), 31);
    let plain = load(plain_dir.path()).unwrap();
    let unscaled = common::next_logprobs(&plain.model, &ids);
    let gap = common::max_abs_diff(&unscaled, &want) as f64;
    eprintln!("without the scaling: {gap:e}");
    // Far outside what rounding explains: the comparison can see the scaling.
    assert!(
        gap > 10.0 * bound,
        "scaling changed little: {gap} vs {bound}"
    );
}

/// llama.cpp's converter turns `rope_scaling` (llama3) into per-frequency divisors, stored as
/// `rope_freqs.weight` (`convert_hf_to_gguf.py`, LlamaModel.generate_extra_tensors).
fn llama3_freq_factors(cfg: &Config) -> Vec<f32> {
    let (factor, low, high, old) = (8.0f64, 1.0f64, 4.0f64, 64.0f64);
    let hd = cfg.head_dim();
    (0..hd / 2)
        .map(|i| {
            let freq = 1.0 / cfg.rope_theta.powf(2.0 * i as f64 / hd as f64);
            let wavelen = std::f64::consts::TAU / freq;
            let f = if wavelen < old / high {
                1.0
            } else if wavelen > old / low {
                factor
            } else {
                let smooth = (old / wavelen - low) / (high - low);
                1.0 / ((1.0 - smooth) / factor + smooth)
            };
            f as f32
        })
        .collect()
}

/// HF name → GGUF name (the inverse of the loader's mapping).
fn gguf_name(hf: &str) -> String {
    let simple = [
        ("model.embed_tokens.weight", "token_embd.weight"),
        ("model.norm.weight", "output_norm.weight"),
        ("lm_head.weight", "output.weight"),
    ];
    if let Some((_, g)) = simple.iter().find(|(h, _)| *h == hf) {
        return g.to_string();
    }
    let rest = hf.strip_prefix("model.layers.").unwrap();
    let (layer, rest) = rest.split_once('.').unwrap();
    let part = match rest.trim_end_matches(".weight") {
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        other => panic!("unexpected tensor {other}"),
    };
    format!("blk.{layer}.{part}.weight")
}

/// Writes `tensors` (HF names) as an F32 GGUF the way llama.cpp's converter lays out a llama,
/// with the default model's tokenizer metadata, plus `extra` tensors under their own names.
fn write_gguf(
    path: &Path,
    cfg: &Config,
    tensors: &HashMap<String, Tensor>,
    extra: &[(&str, Tensor)],
) {
    let mut src = std::fs::File::open(common::default_gguf()).unwrap();
    let content = gguf_file::Content::read(&mut src).unwrap();
    let mut md: Vec<(String, gguf_file::Value)> = content
        .metadata
        .iter()
        .filter(|(k, _)| k.starts_with("tokenizer."))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let u = |v: usize| gguf_file::Value::U32(v as u32);
    md.extend([
        (
            "general.architecture".into(),
            gguf_file::Value::String("llama".into()),
        ),
        ("llama.embedding_length".into(), u(cfg.hidden_size)),
        ("llama.feed_forward_length".into(), u(cfg.intermediate_size)),
        ("llama.block_count".into(), u(cfg.num_hidden_layers)),
        (
            "llama.attention.head_count".into(),
            u(cfg.num_attention_heads),
        ),
        ("llama.attention.head_count_kv".into(), u(cfg.n_kv_heads())),
        (
            "llama.context_length".into(),
            u(cfg.max_position_embeddings),
        ),
        ("llama.rope.dimension_count".into(), u(cfg.head_dim())),
        (
            "llama.rope.freq_base".into(),
            gguf_file::Value::F32(cfg.rope_theta as f32),
        ),
        (
            "llama.attention.layer_norm_rms_epsilon".into(),
            gguf_file::Value::F32(cfg.rms_norm_eps as f32),
        ),
    ]);
    let mut qt: Vec<(String, QTensor)> = tensors
        .iter()
        .map(|(name, t)| {
            let t = if name.ends_with("q_proj.weight") {
                common::permute_qk(t, cfg.num_attention_heads)
            } else if name.ends_with("k_proj.weight") {
                common::permute_qk(t, cfg.n_kv_heads())
            } else {
                t.clone()
            };
            (
                gguf_name(name),
                QTensor::quantize(&t, GgmlDType::F32).unwrap(),
            )
        })
        .collect();
    for (name, t) in extra {
        qt.push((
            name.to_string(),
            QTensor::quantize(t, GgmlDType::F32).unwrap(),
        ));
    }
    let md_refs: Vec<(&str, &gguf_file::Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = qt.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut out = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut out, &md_refs, &t_refs).unwrap();
}

#[test]
fn gguf_rope_freqs_give_the_same_model_as_llama3_scaling() {
    let ids = prompt_ids();
    let cfg = tiny_config();
    let tensors = model::init::random_weights(&cfg, 32, &Device::Cpu).unwrap();
    // The reference: the HF directory with rope_scaling, checked against candle-transformers
    // by the test above.
    let dir = tempfile::tempdir().unwrap();
    let mut scaled_cfg = cfg.clone();
    scaled_cfg.rope_scaling = Some(llama3_scaling());
    model::hf_dir::save(
        dir.path(),
        &scaled_cfg,
        &tensors,
        &common::smollm().tokenizer,
        DType::F32,
    )
    .unwrap();
    let want = reference_logprobs(dir.path(), &ids);

    let factors = llama3_freq_factors(&cfg);
    let n = factors.len();
    let rope_freqs = Tensor::from_vec(factors, n, &Device::Cpu).unwrap();
    let gguf = dir.path().join("tiny-llama3.gguf");
    write_gguf(&gguf, &cfg, &tensors, &[("rope_freqs.weight", rope_freqs)]);
    let ours = load(&gguf).unwrap();
    let got = common::next_logprobs(&ours.model, &ids);
    let diff = common::max_abs_diff(&got, &want) as f64;
    eprintln!("GGUF rope_freqs: max |Δ logprob| vs candle-transformers (llama3) = {diff:e}");
    let bound = common::f32_logprob_bound(common::pass_of(&cfg, ids.len()), &want, 2);
    assert!(diff <= bound, "{diff} > {bound}");

    // Without rope_freqs.weight the same file is a plain llama: far from the reference.
    let plain = dir.path().join("tiny-plain.gguf");
    write_gguf(&plain, &cfg, &tensors, &[]);
    let unscaled = common::next_logprobs(&load(&plain).unwrap().model, &ids);
    assert!(common::max_abs_diff(&unscaled, &want) as f64 > 10.0 * bound);

    // A GGUF with rope factors cannot become a config.json: converting it is refused.
    let err = model::hf_dir::save(
        &dir.path().join("converted"),
        ours.model.config(),
        &tensors,
        &common::smollm().tokenizer,
        DType::F32,
    )
    .unwrap_err();
    assert!(err.to_string().contains("rope_freqs"), "{err}");
}

#[test]
fn unknown_gguf_tensors_and_rope_types_are_refused_by_name() {
    let cfg = tiny_config();
    let tensors = model::init::random_weights(&cfg, 33, &Device::Cpu).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let bias = Tensor::zeros(cfg.hidden_size, DType::F32, &Device::Cpu).unwrap();
    let path = dir.path().join("biased.gguf");
    write_gguf(&path, &cfg, &tensors, &[("blk.0.attn_q.bias", bias)]);
    let err = load(&path).unwrap_err().to_string();
    assert!(err.contains("blk.0.attn_q.bias"), "{err}");

    // The same in a Hugging Face directory: a bias tensor the config does not announce.
    let hf = dir.path().join("hf");
    let mut with_bias = tensors.clone();
    let bias = Tensor::zeros(cfg.hidden_size, DType::F32, &Device::Cpu).unwrap();
    with_bias.insert("model.layers.1.self_attn.q_proj.bias".into(), bias);
    model::hf_dir::save(
        &hf,
        &cfg,
        &with_bias,
        &common::smollm().tokenizer,
        DType::F32,
    )
    .unwrap();
    let err = load(&hf).unwrap_err().to_string();
    assert!(
        err.contains("model.layers.1.self_attn.q_proj.bias"),
        "{err}"
    );
}

/// Writes the tiny llama with `key` set in config.json and returns the load error.
fn load_error_with(key: &str, value: serde_json::Value) -> String {
    let dir = tempfile::tempdir().unwrap();
    common::write_llama(dir.path(), &tiny_config(), 34);
    let path = dir.path().join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    cfg[key] = value;
    std::fs::write(&path, cfg.to_string()).unwrap();
    match load(dir.path()) {
        Ok(_) => panic!("{key} loaded"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn unimplemented_config_features_are_load_errors_naming_them() {
    let cases = [
        ("attention_bias", json!(true), "attention_bias"),
        ("mlp_bias", json!(true), "mlp_bias"),
        (
            "hidden_act",
            json!("gelu_pytorch_tanh"),
            "hidden_act `gelu_pytorch_tanh`",
        ),
        (
            "rope_scaling",
            json!({"rope_type": "yarn", "factor": 4.0}),
            "`yarn`",
        ),
        (
            "rope_scaling",
            json!({"type": "dynamic", "factor": 2.0}),
            "`dynamic`",
        ),
        (
            "rope_scaling",
            json!({"rope_type": "llama3", "factor": 8.0}),
            "low_freq_factor",
        ),
        ("partial_rotary_factor", json!(0.5), "partial_rotary_factor"),
        ("sliding_window", json!(4096), "sliding_window"),
        (
            "quantization_config",
            json!({"quant_method": "gptq"}),
            "quantization_config",
        ),
    ];
    for (key, value, expected) in cases {
        let err = load_error_with(key, value.clone());
        assert!(err.contains(expected), "{key} = {value}: {err}");
    }
    // The llama defaults spelled out are fine.
    let dir = tempfile::tempdir().unwrap();
    common::write_llama(dir.path(), &tiny_config(), 35);
    let path = dir.path().join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    cfg["hidden_act"] = json!("silu");
    cfg["attention_bias"] = json!(false);
    cfg["rope_scaling"] = json!(null);
    cfg["sliding_window"] = json!(null);
    std::fs::write(&path, cfg.to_string()).unwrap();
    load(dir.path()).unwrap();
}

/// With f16 weights the final norm and head run in f32: the logits equal the f32 model's on
/// the same hidden states (same f16-representable weights) to f32 rounding, where an f16 head
/// would round logits of ~16 in steps of 1/64.
#[test]
fn final_norm_and_head_run_in_f32_for_half_precision_weights() {
    let mut cfg = tiny_config();
    cfg.tie_word_embeddings = false;
    let mut tensors = model::init::random_weights(&cfg, 36, &Device::Cpu).unwrap();
    // Logits of realistic size (the random head alone gives ~0.2).
    let head = (tensors["lm_head.weight"].clone() * 400.0).unwrap();
    tensors.insert("lm_head.weight".into(), head);
    // Weights that f16 holds exactly, so both models have the very same values.
    let tensors: HashMap<String, Tensor> = tensors
        .into_iter()
        .map(|(k, t)| {
            (
                k,
                t.to_dtype(DType::F16)
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap(),
            )
        })
        .collect();
    let half = model::Decoder::load(
        VarBuilder::from_tensors(tensors.clone(), DType::F16, &Device::Cpu),
        &cfg,
    )
    .unwrap();
    let full = model::Decoder::load(
        VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu),
        &cfg,
    )
    .unwrap();
    let hidden = Tensor::randn(0f32, 1.0, (1, 3, cfg.hidden_size), &Device::Cpu)
        .unwrap()
        .to_dtype(DType::F16)
        .unwrap();
    let from_half = half.logits(&hidden).unwrap();
    assert_eq!(from_half.dtype(), DType::F32);
    let from_full = full.logits(&hidden.to_dtype(DType::F32).unwrap()).unwrap();
    let max_logit = from_full
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(
        max_logit > 8.0,
        "logits too small to show f16 rounding: {max_logit}"
    );
    let diff = common::max_abs_diff_tensors(&from_half, &from_full);
    assert!(
        diff < 1e-4,
        "f16-weight logits differ by {diff} (max logit {max_logit})"
    );
}
