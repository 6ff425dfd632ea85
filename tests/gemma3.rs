//! Gemma 3 270M (Q4_K_M GGUF: Q8_0 tied embedding, Q5_0, Q4_K, Q6_K, F32 norms) against
//! candle-transformers' independent `gemma3` (the Hugging Face-style model) run on the same
//! weights, dequantized, in float64: full-vocabulary log-probs within what f32 rounding
//! explains (`common::f32_logprob_bound`: derived from depth, width, length and the logits'
//! spread, so it holds on any CPU), on a short prompt and on one longer than the 512-token
//! sliding window. Against float64 the whole difference is our own rounding: an f32 reference
//! would add its own, which depends on the CPU's kernels as much as ours does.
//!
//! Two facts about the references, checked against HF's modeling_gemma3.py and llama.cpp:
//! - candle-transformers' `quantized_gemma3` (the GGUF reader) uses SiLU in the MLP where
//!   Gemma uses GELU-tanh (`hidden_activation: gelu_pytorch_tanh`; candle issue #3745), so it
//!   cannot be the reference; its HF-style `gemma3` has the right activation.
//! - That `gemma3` masks a key only when it is more than `sliding_window` positions back, so a
//!   query sees `window + 1` keys; HF (`sliding_window_overlay`: `q - kv < window`) and
//!   llama.cpp (`p0 <= p1 - n_swa` masked) see exactly `window`. The reference is therefore
//!   given `sliding_window = 511`, which makes its mask HF's for the file's 512.
//!
//! The tensor names are mapped here from llama.cpp's table (gguf-py tensor_mapping.py), not
//! with the loader's own mapping, and the GGUF's norm weights (which llama.cpp's converter
//! stores as 1 + w) are given back to the reference as w, the form HF checkpoints hold.

mod common;

use std::collections::HashMap;
use std::sync::OnceLock;

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use tokenscope::model;

/// llama.cpp's GGUF names → HF's, for Gemma 3 (gguf-py/gguf/tensor_mapping.py).
fn hf_name(gguf: &str) -> String {
    match gguf {
        "token_embd.weight" => return "model.embed_tokens.weight".into(),
        "output_norm.weight" => return "model.norm.weight".into(),
        _ => {}
    }
    let rest = gguf.strip_prefix("blk.").unwrap();
    let (layer, part) = rest.split_once('.').unwrap();
    let hf = match part.trim_end_matches(".weight") {
        "attn_norm" => "input_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "attn_q_norm" => "self_attn.q_norm",
        "attn_k_norm" => "self_attn.k_norm",
        "post_attention_norm" => "post_attention_layernorm",
        "ffn_norm" => "pre_feedforward_layernorm",
        "post_ffw_norm" => "post_feedforward_layernorm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        other => panic!("unexpected tensor {other}"),
    };
    format!("model.layers.{layer}.{hf}.weight")
}

struct Reference {
    model: candle_transformers::models::gemma3::Model,
}

fn reference() -> &'static std::sync::Mutex<Reference> {
    static R: OnceLock<std::sync::Mutex<Reference>> = OnceLock::new();
    R.get_or_init(|| {
        let path = common::gemma3_path();
        let mut file = std::fs::File::open(&path).unwrap();
        let content = gguf_file::Content::read(&mut file).unwrap();
        let mut tensors = HashMap::new();
        for name in content.tensor_infos.keys() {
            let t = content
                .tensor(&mut file, name, &Device::Cpu)
                .unwrap()
                .dequantize(&Device::Cpu)
                .unwrap();
            let t = if name.ends_with("norm.weight") {
                (t - 1.0).unwrap()
            } else {
                t
            };
            tensors.insert(hf_name(name), t);
        }
        let md = |k: &str| content.metadata[k].to_u32().unwrap() as usize;
        let cfg: candle_transformers::models::gemma3::Config =
            serde_json::from_value(serde_json::json!({
                "attention_bias": false,
                "head_dim": md("gemma3.attention.key_length"),
                "hidden_activation": "gelu_pytorch_tanh",
                "hidden_size": md("gemma3.embedding_length"),
                "intermediate_size": md("gemma3.feed_forward_length"),
                "num_attention_heads": md("gemma3.attention.head_count"),
                "num_hidden_layers": md("gemma3.block_count"),
                "num_key_value_heads": md("gemma3.attention.head_count_kv"),
                "rms_norm_eps": 1e-6,
                "rope_theta": 1_000_000.0,
                "rope_local_base_freq": 10_000.0,
                "vocab_size": 262_144,
                "final_logit_softcapping": null,
                "attn_logit_softcapping": null,
                "query_pre_attn_scalar": 256,
                // The file's 512, made HF's window for candle's one-longer mask (module comment).
                "sliding_window": md("gemma3.attention.sliding_window") - 1,
                "sliding_window_pattern": 6,
                "max_position_embeddings": 2048,
            }))
            .unwrap();
        // The dequantized weights are exact in f32; the reference computes with them in f64.
        let vb = VarBuilder::from_tensors(tensors, DType::F64, &Device::Cpu);
        let model = candle_transformers::models::gemma3::Model::new(false, &cfg, vb).unwrap();
        std::sync::Mutex::new(Reference { model })
    })
}

fn reference_logprobs(ids: &[u32]) -> Vec<f64> {
    let mut r = reference().lock().unwrap();
    r.model.clear_kv_cache();
    common::logprobs_of_f64(r.model.forward(&common::batch(ids), 0).unwrap())
}

const STORY: &str = "The lighthouse keeper climbed the spiral stairs every evening at dusk, \
    counting the one hundred and twelve steps out of habit rather than need. ";

#[test]
fn matches_candle_transformers_gemma3() {
    let m = common::gemma3();
    assert_eq!(m.architecture, "gemma3");
    let short = m.tokenizer.encode("The capital of France is").unwrap();
    assert_eq!(short[0], 2, "Gemma adds BOS");
    let long = m.tokenizer.encode(&STORY.repeat(22)).unwrap();
    assert!(long.len() > 560, "long prompt has {} tokens", long.len());
    let cfg = m.model.config();
    for ids in [&short, &long] {
        let ours = common::next_logprobs(&m.model, ids);
        let exact = reference_logprobs(ids);
        let diff = common::max_abs_diff_f64(&ours, &exact);
        eprintln!(
            "gemma3, {} tokens: max |Δ logprob| vs candle gemma3 in f64 = {diff:e}",
            ids.len()
        );
        let bound = common::f32_logprob_bound(common::pass_of(cfg, ids.len()), &ours, 1);
        assert!(diff <= bound, "{} tokens: {diff} > {bound}", ids.len());
    }
}

/// The sliding window is what the long prompt exercises: without it (every layer global) the
/// last position's distribution is far from the reference.
#[test]
fn the_sliding_window_matters_on_long_prompts() {
    use tokenscope::model::Decoder;
    let m = common::gemma3();
    let long = m.tokenizer.encode(&STORY.repeat(22)).unwrap();
    let mut file = model::gguf::GgufFile::open(&common::gemma3_path()).unwrap();
    let mut cfg = file.config().unwrap();
    let (tensors, _) = file.tensors(&cfg, DType::F32, &Device::Cpu, false).unwrap();
    cfg.family.sliding = None;
    let global = Decoder::load(
        VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu),
        &cfg,
    )
    .unwrap();
    let diff = common::max_abs_diff(
        &common::next_logprobs(&global, &long),
        &common::next_logprobs(&m.model, &long),
    );
    assert!(
        diff > 1e-2,
        "no sliding window changes the result by only {diff}"
    );
}

/// Prefill in chunks (the engine's path: 256 tokens a pass, masks offset by the cache) and
/// token-by-token decoding agree with one pass over the whole sequence.
#[test]
fn chunked_prefill_and_decoding_agree_with_one_pass() {
    use tokenscope::engine::{self, GenerateParams};
    let m = common::gemma3();
    let long = m.tokenizer.encode(&STORY.repeat(22)).unwrap();
    let params = GenerateParams {
        temperature: 0.0,
        max_tokens: 4,
        top_k: 1,
        ..Default::default()
    };
    let r = engine::generate(m, "story", &long, &params, &|| false).unwrap();
    let mut ids = long.clone();
    for step in &r.steps {
        let one_pass = common::next_logprobs(&m.model, &ids);
        let diff = (one_pass[step.token_id as usize] as f64 - step.logprob).abs();
        assert!(diff < 1e-4, "step at {}: {diff}", ids.len());
        ids.push(step.token_id);
    }
}

/// Gemma's SentencePiece vocabulary from the GGUF: BOS added, no space prefix, spaces as `▁`,
/// and its user-defined whitespace pieces (runs of spaces and of newlines) taken whole from
/// the raw text, as llama.cpp's tokenizer_st_partition does before the SPM merges.
#[test]
fn tokenizes_like_llama_cpp_spm() {
    let tk = &common::gemma3().tokenizer;
    let ids = tk.encode("Hello  world\n\nThe end").unwrap();
    assert_eq!(ids[0], 2, "<bos>");
    assert!(
        ids.contains(&138),
        "two spaces are user-defined piece 138: {ids:?}"
    );
    assert!(
        ids.contains(&108),
        "two newlines are user-defined piece 108: {ids:?}"
    );
    assert_eq!(tk.decode(&ids, true).unwrap(), "Hello  world\n\nThe end");
    let plain = tk
        .encode_without_special("The capital of France is")
        .unwrap();
    assert_eq!(tk.token_text(plain[0]), "The", "no space prefix for Gemma");
    assert_eq!(tk.token_text(plain[1]), " capital");
    // A character outside the vocabulary falls back to its UTF-8 bytes' <0xNN> pieces.
    let rare = tk.encode_without_special("\u{10FFFD}").unwrap();
    let bytes: Vec<u8> = rare
        .iter()
        .flat_map(|&i| tk.token_bytes(i).to_vec())
        .collect();
    assert_eq!(bytes, "\u{10FFFD}".as_bytes());
}
