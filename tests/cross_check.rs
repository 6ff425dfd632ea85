//! Independent check of the maths: our llama (dequantized GGUF, un-permuted q/k, HF-style rope)
//! against candle-transformers' `quantized_llama` on the same file with every weight
//! dequantized (`CANDLE_DEQUANTIZE_ALL=1`, interleaved rope on the permuted weights).
//! Full-vocabulary log-probs must agree within what f32 rounding explains in two f32
//! evaluations (`common::f32_logprob_bound`).

mod common;

use candle_core::quantized::gguf_file;
use candle_core::Device;

const LONG_PROMPT: &str = "The history of the printing press begins in the fifteenth century, \
when Johannes Gutenberg combined movable metal type, oil-based ink and a wooden press adapted \
from wine making. Before that, books in Europe were copied by hand, usually by monks working in \
scriptoria, and a single Bible could take years to finish. Gutenberg's workshop in Mainz produced \
about one hundred and eighty copies of the Bible around 1455, and within fifty years printing \
shops had opened in more than two hundred European cities. The spread of cheap books changed \
religion, science and politics: pamphlets carried new ideas faster than any messenger, and \
scholars could compare identical copies of the same text for the first time. Today historians";

fn reference_logprobs(prompt_ids: &[u32]) -> Vec<f32> {
    let path = common::default_gguf();
    let mut file = std::fs::File::open(&path).unwrap();
    let content = gguf_file::Content::read(&mut file).unwrap();
    let mut model = candle_transformers::models::quantized_llama::ModelWeights::from_gguf(
        content,
        &mut file,
        &Device::Cpu,
    )
    .unwrap();
    common::logprobs_of(model.forward(&common::batch(prompt_ids), 0).unwrap())
}

fn ours_logprobs(prompt_ids: &[u32]) -> Vec<f32> {
    common::next_logprobs(&common::smollm().model, prompt_ids)
}

#[test]
fn matches_candle_quantized_llama_dequantized() {
    // Must be set before this thread builds its first QMatMul (the flag is read once per thread).
    std::env::set_var("CANDLE_DEQUANTIZE_ALL", "1");
    let tk = &common::smollm().tokenizer;
    let short = tk.encode("The capital of France is").unwrap();
    let long = tk.encode(LONG_PROMPT).unwrap();
    assert_eq!(short.len(), 5);
    assert!(long.len() >= 128, "long prompt has {} tokens", long.len());
    for ids in [&short, &long] {
        let reference = reference_logprobs(ids);
        let ours = ours_logprobs(ids);
        assert_eq!(ours.len(), 49152);
        let diff = common::max_abs_diff(&ours, &reference) as f64;
        eprintln!("smollm2, {} tokens: max |Δ logprob| = {diff:e}", ids.len());
        let cfg = common::smollm().model.config();
        let bound = common::f32_logprob_bound(common::pass_of(cfg, ids.len()), &reference, 2);
        assert!(
            diff <= bound,
            "{} tokens: max |Δ logprob| = {diff} > {bound}",
            ids.len()
        );
        // Same winner, and a real distribution (not a degenerate one that trivially agrees).
        let argmax = |v: &[f32]| {
            v.iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .map(|(i, _)| i)
                .unwrap()
        };
        assert_eq!(argmax(&ours), argmax(&reference));
        assert!(ours.iter().any(|&l| l > -4.0));
        eprintln!("{} tokens: max |Δ logprob| = {diff:e}", ids.len());
    }
}

/// Guards the guard: the same GGUF loaded with q/k left in llama.cpp's permuted row order
/// (everything else identical, dense f32) is far from the reference, so the match above holds
/// because of the un-permutation, not by accident.
#[test]
fn without_unpermute_the_model_would_be_wrong() {
    use candle_core::DType;
    use candle_nn::VarBuilder;
    use tokenscope::model::gguf::GgufFile;

    std::env::set_var("CANDLE_DEQUANTIZE_ALL", "1");
    let mut file = GgufFile::open(&common::default_gguf()).unwrap();
    let cfg = file.config().unwrap();
    let (mut tensors, _) = file.tensors(&cfg, DType::F32, &Device::Cpu, false).unwrap();
    // Undo our un-permutation: back to the file's (heads, head_dim/2, 2) row order.
    let permute = common::permute_qk;
    for (name, t) in tensors.iter_mut() {
        if name.ends_with("q_proj.weight") {
            *t = permute(t, cfg.num_attention_heads);
        } else if name.ends_with("k_proj.weight") {
            *t = permute(t, cfg.n_kv_heads());
        }
    }
    let vb = VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
    let permuted = tokenscope::model::Decoder::load(vb, &cfg).unwrap();

    let tk = &common::smollm().tokenizer;
    let ids = tk.encode("The capital of France is").unwrap();
    let reference = reference_logprobs(&ids);
    let wrong = common::next_logprobs(&permuted, &ids);
    let right = ours_logprobs(&ids);
    let d_wrong = common::max_abs_diff(&reference, &wrong);
    let d_right = common::max_abs_diff(&reference, &right);
    assert!(d_right < 1e-4, "un-permuted: {d_right}");
    assert!(
        d_wrong > 0.5,
        "without the un-permutation the error is only {d_wrong}"
    );
    let paris = tk.encode(" Paris").unwrap()[0] as usize;
    assert!((right[paris].exp() - 0.7725).abs() < 0.01);
}
