//! Generation on the real default model: greedy, seeded sampling, stop strings, EOS, and the
//! agreement of the inference and differentiable paths.

mod common;

use candle_core::{Device, Tensor};
use tokenscope::engine::{self, FinishReason, GenerateParams, GenerateResponse, LogprobsMode};

const FRANCE: &str = "The capital of France is";
const CHAT: &str = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n";

fn run(prompt: &str, params: &GenerateParams) -> GenerateResponse {
    let m = common::smollm();
    let ids = engine::tokenize(m, prompt).unwrap();
    engine::generate(m, prompt, &ids, params, &|| false).unwrap()
}

fn greedy(max_tokens: usize) -> GenerateParams {
    GenerateParams {
        temperature: 0.0,
        max_tokens,
        ..Default::default()
    }
}

#[test]
fn paris_is_rank_one_with_the_reference_probability() {
    let r = run(FRANCE, &greedy(1));
    let top = &r.tokens[0];
    assert_eq!(top.token, " Paris");
    assert_eq!(top.token_id, 7042);
    assert_eq!(top.bytes, b" Paris");
    assert_eq!(top.rank, 1);
    assert!(
        (top.probability - 0.7725).abs() < 0.005,
        "{}",
        top.probability
    );
    assert_eq!(top.percentage, top.probability * 100.0);
    assert_eq!(top.probability, top.logprob.exp());
    assert_eq!(r.generated_text, " Paris");
    assert_eq!(r.metadata.prompt_tokens, 5);
    assert_eq!(r.metadata.prompt_length, FRANCE.len());
    assert_eq!(r.metadata.completion_tokens, 1);
    assert_eq!(r.metadata.dtype, "f32");
    assert_eq!(r.finish_reason, FinishReason::Length);
}

#[test]
fn top_k_is_ranked_and_consistent_with_steps() {
    let params = GenerateParams {
        temperature: 0.0,
        top_k: 50,
        max_tokens: 3,
        ..Default::default()
    };
    let r = run(FRANCE, &params);
    assert_eq!(r.tokens.len(), 50);
    assert_eq!(r.steps.len(), 3);
    assert_eq!(r.tokens, r.steps[0].top);
    for (i, t) in r.tokens.iter().enumerate() {
        assert_eq!(t.rank, i + 1);
        if i > 0 {
            assert!(t.logprob <= r.tokens[i - 1].logprob);
        }
    }
    for s in &r.steps {
        // Greedy: the chosen token is rank 1 of its position and equals top[0].
        assert_eq!(s.rank, 1);
        assert_eq!(s.token_id, s.top[0].token_id);
        assert!(s.entropy > 0.0 && s.entropy < (49152f64).ln());
    }
    let text: String = r.steps.iter().map(|s| s.token.clone()).collect();
    assert_eq!(text, r.generated_text);
}

#[test]
fn temperature_changes_the_processed_distribution_only() {
    let base = GenerateParams {
        temperature: 0.5,
        seed: Some(7),
        ..Default::default()
    };
    let processed = run(FRANCE, &base);
    let raw = run(
        FRANCE,
        &GenerateParams {
            logprobs_mode: LogprobsMode::Raw,
            ..base.clone()
        },
    );
    let greedy = run(FRANCE, &greedy(1));
    // Raw = the model's own distribution = what greedy reports.
    assert_eq!(raw.tokens[0].logprob, greedy.tokens[0].logprob);
    // T = 0.5 sharpens: p(Paris) grows.
    assert!(processed.tokens[0].probability > raw.tokens[0].probability);
    assert_eq!(processed.metadata.logprobs_mode, LogprobsMode::Processed);
    assert_eq!(raw.metadata.logprobs_mode, LogprobsMode::Raw);
    assert_eq!(processed.metadata.temperature_used, 0.5);
}

#[test]
fn seeded_sampling_is_reproducible() {
    let params = GenerateParams {
        temperature: 1.5,
        max_tokens: 12,
        seed: Some(1234),
        ..Default::default()
    };
    let a = run(FRANCE, &params);
    let b = run(FRANCE, &params);
    assert_eq!(a.generated_text, b.generated_text);
    assert_eq!(a.steps, b.steps);
    assert_eq!(a.metadata.seed, Some(1234));
    // Another seed goes elsewhere for at least one of several seeds.
    let differs = (0..5u64).any(|s| {
        run(
            FRANCE,
            &GenerateParams {
                seed: Some(s),
                ..params.clone()
            },
        )
        .generated_text
            != a.generated_text
    });
    assert!(differs);
}

#[test]
fn eos_ends_generation() {
    let r = run(CHAT, &greedy(60));
    assert_eq!(r.finish_reason, FinishReason::Eos);
    assert_eq!(r.generated_text, "The capital of France is Paris.");
    let last = r.steps.last().unwrap();
    assert_eq!(last.token, "<|im_end|>");
    assert!(r.steps.len() < 60);
}

#[test]
fn stop_string_ends_generation_and_is_not_returned() {
    // Greedy continuation is " Paris.\n\nThe answer is: ..."
    let params = GenerateParams {
        stop: vec!["\n".into(), "zzz".into()],
        ..greedy(20)
    };
    let r = run(FRANCE, &params);
    assert_eq!(r.finish_reason, FinishReason::Stop);
    assert_eq!(r.generated_text, " Paris.");
    assert!(r.steps.len() < 20);
    // A stop string that never appears changes nothing.
    let r = run(
        FRANCE,
        &GenerateParams {
            stop: vec!["zzz".into()],
            ..greedy(4)
        },
    );
    assert_eq!(r.finish_reason, FinishReason::Length);
    assert_eq!(r.steps.len(), 4);
}

#[test]
fn cancellation_stops_between_steps() {
    let m = common::smollm();
    let ids = engine::tokenize(m, FRANCE).unwrap();
    let err = engine::generate(m, FRANCE, &ids, &greedy(5), &|| true).unwrap_err();
    assert!(matches!(err, engine::EngineError::Cancelled));
}

#[test]
fn too_long_prompt_is_refused() {
    let m = common::smollm();
    let ids = vec![504u32; m.context_length()];
    let err = engine::generate(m, "x", &ids, &greedy(1), &|| false).unwrap_err();
    assert!(matches!(err, engine::EngineError::TooLong { .. }), "{err}");
}

#[test]
fn kv_cache_steps_equal_one_full_pass() {
    let m = common::smollm();
    let ids = m
        .tokenizer
        .encode("One, two, three, four, five, six")
        .unwrap();
    let full = m.model.next_logits(&ids, &mut m.model.new_cache()).unwrap();
    let stepped = {
        let mut cache = m.model.new_cache();
        let (head, tail) = ids.split_at(ids.len() - 3);
        m.model.next_logits(head, &mut cache).unwrap();
        let mut last = Vec::new();
        for &t in tail {
            last = m.model.next_logits(&[t], &mut cache).unwrap();
        }
        assert_eq!(cache.len(), ids.len());
        last
    };
    use tokenscope::engine::distribution::log_softmax;
    common::assert_smollm_close(
        "KV-cache steps vs one pass",
        &log_softmax(&stepped),
        &log_softmax(&full),
        ids.len(),
    );
}

#[test]
fn inference_and_differentiable_paths_agree() {
    let m = common::smollm();
    let ids = m
        .tokenizer
        .encode("Training and inference share one set of weights.")
        .unwrap();
    let x = Tensor::new(ids.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let mut cache = m.model.new_cache();
    let fast = m.model.forward_all(&x, &mut cache).unwrap();
    let slow = m.model.forward_train(&x).unwrap();
    assert_eq!(fast.dims(), &[1, ids.len(), 49152]);
    assert_eq!(fast.dims(), slow.dims());
    use tokenscope::engine::distribution::log_softmax;
    let rows = |t: &Tensor| -> Vec<Vec<f32>> { t.squeeze(0).unwrap().to_vec2().unwrap() };
    for (pos, (a, b)) in rows(&fast).iter().zip(rows(&slow)).enumerate() {
        common::assert_smollm_close(
            &format!("position {pos}: inference vs differentiable"),
            &log_softmax(a),
            &log_softmax(&b),
            pos + 1,
        );
    }
}

#[test]
fn chunked_prefill_matches_a_single_pass() {
    // A prompt longer than one prefill chunk goes through the cache in pieces.
    let m = common::smollm();
    let text = "The history of science is long and full of surprises. ".repeat(60);
    let ids = m.tokenizer.encode(&text).unwrap();
    assert!(ids.len() > tokenscope::engine::generate::PREFILL_CHUNK);
    let r = engine::generate(m, &text, &ids, &greedy(1), &|| false).unwrap();
    let logits = m.model.next_logits(&ids, &mut m.model.new_cache()).unwrap();
    let d = tokenscope::engine::Distribution::from_logits(&logits, 1.0).unwrap();
    let top = &r.tokens[0];
    assert_eq!(top.token_id, d.argmax());
    let bound = common::f32_logprob_bound(
        common::pass_of(m.model.config(), ids.len()),
        &tokenscope::engine::distribution::log_softmax(&logits),
        2,
    );
    assert!((top.logprob - d.logprob(top.token_id) as f64).abs() <= bound);
}

#[test]
fn prefix_cache_reuses_work_without_changing_results() {
    use tokenscope::engine::generate::generate_cached;
    use tokenscope::engine::prefix_cache::PrefixCache;
    let m = common::smollm();
    let mut prefix = PrefixCache::new(4096, 0);
    let params = GenerateParams {
        temperature: 0.0,
        max_tokens: 4,
        top_k: 10,
        ..Default::default()
    };
    let run_cached = |prompt: &str, prefix: &mut PrefixCache| {
        let ids = engine::tokenize(m, prompt).unwrap();
        generate_cached(
            m,
            prompt,
            &ids,
            &params,
            &|| false,
            Some(prefix),
            &mut tokenscope::engine::generate::no_events,
        )
        .unwrap()
    };
    // As a user types: each prompt extends the previous one.
    let prompts = [
        "The capital of France",
        "The capital of France is",
        "The capital of France is a city",
    ];
    for p in prompts {
        let cached = run_cached(p, &mut prefix);
        let fresh = run(p, &params);
        assert_eq!(cached.generated_text, fresh.generated_text, "{p}");
        for (a, b) in cached.steps.iter().zip(&fresh.steps) {
            assert_eq!(a.token_id, b.token_id);
            for (x, y) in a.top.iter().zip(&b.top) {
                assert_eq!(x.token_id, y.token_id);
                assert!(
                    (x.logprob - y.logprob).abs() < 1e-4,
                    "{p}: {} vs {}",
                    x.logprob,
                    y.logprob
                );
            }
        }
    }
    assert_eq!(prefix.hits, 2, "the 2nd and 3rd prompts reused the 1st/2nd");
    // The identical prompt again is answered from the cached logits: bit-identical.
    let again = run_cached(prompts[2], &mut prefix);
    let first_again = run_cached(prompts[2], &mut prefix);
    assert_eq!(again.steps, first_again.steps);
    assert_eq!(prefix.hits, 4);
    // A different prompt sharing no prefix is a miss.
    run_cached("Once upon a time", &mut prefix);
    assert!(prefix.misses >= 2);
}

/// The packed path (the file's blocks, no dense copy: the streaming kernels for short inputs,
/// the tiled GEMM for long ones, the fused path where the family has it) against the dense
/// f32 reference (every weight dequantized, candle's ops), over the full vocabulary, on the
/// three real models: Q4_1/Q8_0 (SmolLM2), Q4_K/Q5_0/Q6_K/Q8_0 (Gemma 3, Qwen2.5).
#[test]
fn packed_weights_match_the_dense_reference() {
    let long = "The history of the city goes back to Roman times, when a small settlement \
        grew up around the river crossing. Over the centuries it became a centre of trade, \
        and by the middle ages its markets drew merchants from far away. Today";
    for file in [
        common::default_gguf(),
        common::test_asset("gemma-3-270m-q4_k_m.gguf"),
        common::test_asset("qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"),
    ] {
        let load = |dense_reference| {
            tokenscope::model::load(
                &tokenscope::model::ModelSource::Gguf(file.clone()),
                &tokenscope::model::LoadOptions {
                    dense_reference,
                    ..Default::default()
                },
            )
            .unwrap()
        };
        let (packed, dense) = (load(false), load(true));
        for prompt in ["The capital of France is", "Hi", "1 2 3", long] {
            let ids = packed.tokenizer.encode(prompt).unwrap();
            let lp = |m: &tokenscope::model::LoadedModel| common::next_logprobs(&m.model, &ids);
            let (a, b) = (lp(&packed), lp(&dense));
            assert_eq!(a.len(), packed.model.config().vocab_size);
            common::assert_f32_close(
                &format!("{}: {prompt:?} ({} tokens)", file.display(), ids.len()),
                &a,
                &b,
                common::pass_of(packed.model.config(), ids.len()),
            );
        }
        // A decoding step after a context longer than Gemma 3's sliding window (512): the
        // context through the long-input path, the step through the short-input one.
        let ids = packed.tokenizer.encode(&long.repeat(16)).unwrap();
        assert!(ids.len() > 600, "{}", ids.len());
        let (context, last) = ids.split_at(ids.len() - 1);
        let m = &packed.model;
        let mut cache = m.new_cache();
        m.next_logits(context, &mut cache).unwrap();
        let stepped = engine::distribution::log_softmax(&m.next_logits(last, &mut cache).unwrap());
        let whole = common::next_logprobs(&dense.model, &ids);
        common::assert_f32_close(
            &format!("{}: {} tokens, then a step", file.display(), ids.len()),
            &stepped,
            &whole,
            common::pass_of(m.config(), ids.len()),
        );
    }
}

/// Prefills `prompts` as one batch and each alone (as the engine would unbatched); returns the
/// batch and, per prompt, the largest log-prob difference over the vocabulary. The f32 bound
/// of each prompt's comparison is in [`batch_bounds`].
fn batch_vs_alone(
    m: &tokenscope::model::LoadedModel,
    prompts: &[&str],
) -> (Vec<(tokenscope::model::Cache, Vec<f32>)>, Vec<f32>) {
    use tokenscope::engine::batch::prefill_batch;
    use tokenscope::engine::distribution::log_softmax;
    let ids: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| m.tokenizer.encode(p).unwrap())
        .collect();
    let refs: Vec<&[u32]> = ids.iter().map(|v| v.as_slice()).collect();
    let batched = prefill_batch(m, &refs).unwrap();
    let mut diffs = Vec::new();
    for (p, (cache, logits)) in ids.iter().zip(&batched) {
        assert_eq!(cache.len(), p.len());
        let alone = m.model.next_logits(p, &mut m.model.new_cache()).unwrap();
        diffs.push(common::max_abs_diff(
            &log_softmax(logits),
            &log_softmax(&alone),
        ));
    }
    (batched, diffs)
}

/// Per prompt, what f32 rounding explains between two orders of work on it
/// (`common::f32_logprob_bound`).
fn batch_bounds(m: &tokenscope::model::LoadedModel, prompts: &[&str]) -> Vec<f64> {
    use tokenscope::engine::distribution::log_softmax;
    prompts
        .iter()
        .map(|p| {
            let ids = m.tokenizer.encode(p).unwrap();
            let alone = m.model.next_logits(&ids, &mut m.model.new_cache()).unwrap();
            let pass = common::pass_of(m.model.config(), ids.len());
            common::f32_logprob_bound(pass, &log_softmax(&alone), 2)
        })
        .collect()
}

fn worst(diffs: &[f32]) -> f32 {
    diffs.iter().copied().fold(0.0, f32::max)
}

const BATCH_PROMPTS: [&str; 4] = [
    "The capital of France is",
    "Hi",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "A much longer prompt that needs more tokens than any of the others in this batch, so the others are padded.",
];

#[test]
fn batched_prefill_equals_unbatched() {
    let m = common::smollm();
    // The fused CPU path (the default model's prompts of up to 48 tokens) concatenates the
    // prompts' tokens and computes every (row, input) dot product the same way whatever the
    // batch: bit-identical to each prompt alone.
    assert!(m.model.has_fused_path());
    let (batched, diffs) = batch_vs_alone(m, &BATCH_PROMPTS);
    eprintln!(
        "fused path, batched vs unbatched: max |Δ logprob| = {:e}",
        worst(&diffs)
    );
    assert_eq!(worst(&diffs), 0.0, "batch-invariance on the fused path");
    // A long prompt (> 48 tokens) joining the batch goes through candle's path on its own; the
    // short ones stay bit-identical.
    let long = "one two three four five six seven eight nine ten ".repeat(6);
    let mut mixed = BATCH_PROMPTS.to_vec();
    mixed.insert(1, &long);
    let (_, diffs) = batch_vs_alone(m, &mixed);
    eprintln!("mixed batch: max |Δ logprob| per prompt = {diffs:?}");
    let bound = batch_bounds(m, &mixed)[1];
    assert!(
        diffs[1] as f64 <= bound,
        "the long prompt: {} > {bound}",
        diffs[1]
    );
    diffs
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 1)
        .for_each(|(i, d)| {
            assert_eq!(*d, 0.0, "short prompt {i} in a mixed batch");
        });

    // candle's path (right-padded, dense GEMM): gemm's blocking, and so its summation order,
    // depends on the matrix shapes that batching changes: two orders of the same sums, within
    // what f32 rounding explains.
    let mut dense = m.clone();
    dense.model = dense.model.without_fused_path();
    let dense_diffs = batch_vs_alone(&dense, &BATCH_PROMPTS).1;
    eprintln!("candle path, batched vs unbatched: max |Δ logprob| = {dense_diffs:?}");
    for (d, bound) in dense_diffs.iter().zip(batch_bounds(&dense, &BATCH_PROMPTS)) {
        assert!(*d as f64 <= bound, "batch-invariance: {d} > {bound}");
    }

    // Generation continues correctly from a batch row's cache.
    let params = GenerateParams {
        temperature: 0.0,
        max_tokens: 8,
        ..Default::default()
    };
    let (cache, logits) = batched[0].clone();
    let ids0 = m.tokenizer.encode(BATCH_PROMPTS[0]).unwrap();
    let from_batch = tokenscope::engine::generate::decode_from(
        m,
        BATCH_PROMPTS[0],
        &ids0,
        &params,
        &|| false,
        cache,
        logits,
        std::time::Instant::now(),
        &mut tokenscope::engine::generate::no_events,
    )
    .unwrap();
    let alone = run(BATCH_PROMPTS[0], &params);
    assert_eq!(from_batch.generated_text, alone.generated_text);
    assert!(from_batch
        .generated_text
        .starts_with(" Paris.\n\nThe answer is"));
}

#[test]
fn fused_path_matches_candle_ops_through_prefill_and_decoding() {
    // Short inputs on the default model take the fused CPU path; the same weights through
    // candle's ops must give the same distributions, and each path must be able to continue
    // the other's KV cache.
    use tokenscope::engine::distribution::log_softmax;
    let m = common::smollm();
    assert!(
        m.model.has_fused_path(),
        "GGUF on CPU in f32 takes the fused path"
    );
    let fused = &m.model;
    let ops = m.model.clone().without_fused_path();
    let ids = m
        .tokenizer
        .encode("<|im_start|>user\nName the colours of the rainbow, please.<|im_end|>\n<|im_start|>assistant\n")
        .unwrap();
    let check = |a: &[f32], b: &[f32], what: &str| {
        // Bounded as after the whole prompt (the longest sums either path makes here).
        common::assert_smollm_close(what, &log_softmax(a), &log_softmax(b), ids.len() + 8);
    };
    // The prompt in pieces of at most 8 tokens (fused, each after the cached ones) vs in one
    // candle pass.
    let mut cache_f = fused.new_cache();
    let mut logits_f = Vec::new();
    for piece in ids.chunks(7) {
        logits_f = fused.next_logits(piece, &mut cache_f).unwrap();
    }
    let mut cache_o = ops.new_cache();
    let logits_o = ops.next_logits(&ids, &mut cache_o).unwrap();
    assert_eq!((cache_f.len(), cache_o.len()), (ids.len(), ids.len()));
    check(&logits_f, &logits_o, "prompt in pieces of 7");
    // The whole prompt in one call (the fused path splits it into pieces of 16 itself).
    assert!(ids.len() > 16 && ids.len() <= 48);
    let whole = fused.next_logits(&ids, &mut fused.new_cache()).unwrap();
    check(&whole, &logits_o, "prompt in one call");
    // Greedy decoding: fused on its own cache and on the candle-built one; candle ops on its
    // own cache and on the fused-built one.
    let (mut cache_fo, mut cache_of) = (cache_o.clone(), cache_f.clone());
    let mut next = tokenscope::engine::Distribution::from_logits(&logits_f, 1.0)
        .unwrap()
        .argmax();
    for step in 0..12 {
        let a = fused.next_logits(&[next], &mut cache_f).unwrap();
        let b = ops.next_logits(&[next], &mut cache_o).unwrap();
        let c = fused.next_logits(&[next], &mut cache_fo).unwrap();
        let d = ops.next_logits(&[next], &mut cache_of).unwrap();
        check(&a, &b, &format!("step {step}"));
        check(&c, &b, &format!("step {step}, fused after candle"));
        check(&d, &b, &format!("step {step}, candle after fused"));
        next = tokenscope::engine::Distribution::from_logits(&a, 1.0)
            .unwrap()
            .argmax();
    }
    // At a long context (attention over ~400 cached positions, the vectorised kernel's long
    // scans): fused steps after a candle prefill vs candle steps.
    let long: Vec<u32> = ids.iter().copied().cycle().take(400).collect();
    let mut cache_o = ops.new_cache();
    ops.next_logits(&long, &mut cache_o).unwrap();
    let mut cache_f = cache_o.clone();
    for (step, token) in [28u32, 1345, 314].into_iter().enumerate() {
        let a = fused.next_logits(&[token], &mut cache_f).unwrap();
        let b = ops.next_logits(&[token], &mut cache_o).unwrap();
        check(&a, &b, &format!("step {step} at 400 positions"));
    }
    // A token id outside the vocabulary is an error, not a panic.
    assert!(fused
        .next_logits(&[u32::MAX], &mut fused.new_cache())
        .is_err());
}

#[test]
fn kv_cache_views_are_copy_on_write() {
    // The fused path appends to its KV cache in place; clones and truncated views (what the
    // prefix cache hands out) must never see each other's appends.
    let m = common::smollm();
    let lm = &m.model;
    let ids = m
        .tokenizer
        .encode("The capital of France is Paris. The capital of Italy is")
        .unwrap();
    let mut full = lm.new_cache();
    lm.next_logits(&ids, &mut full).unwrap();
    let probe =
        |cache: &tokenscope::model::Cache| lm.next_logits(&[7042], &mut cache.clone()).unwrap();
    let before = probe(&full);
    // A truncated view continued with other tokens, and a clone continued by several steps.
    let mut view = full.truncated(4).unwrap();
    lm.next_logits(&[100, 200, 300], &mut view).unwrap();
    let mut copy = full.clone();
    for t in [1u32, 2, 3, 4] {
        lm.next_logits(&[t], &mut copy).unwrap();
    }
    assert_eq!(probe(&full), before, "the original cache changed");
    // The view equals a fresh computation of its tokens.
    let mut fresh = lm.new_cache();
    let mut tokens = ids[..4].to_vec();
    tokens.extend([100, 200, 300]);
    lm.next_logits(&tokens, &mut fresh).unwrap();
    use tokenscope::engine::distribution::log_softmax;
    common::assert_smollm_close(
        "view vs fresh",
        &log_softmax(&probe(&view)),
        &log_softmax(&probe(&fresh)),
        tokens.len() + 1,
    );
}
