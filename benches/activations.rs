//! The two arithmetic modes side by side on the three real test models (CPU, f32
//! activations vs `--activations q8`): a ~450-token prompt, eight 12-token prompts batched,
//! and a decoding step after 64 tokens. Run: `cargo bench --bench activations` (after
//! ./scripts/setup.sh --test-assets; TOKENSCOPE_BENCH_MODELS=SmolLM2,gemma picks models by
//! name). Server-level figures against llama.cpp: benches/load.py.

use criterion::{criterion_group, criterion_main, Criterion};
use tokenscope::model::q8::Activations;
use tokenscope::model::{self, LoadOptions, ModelSource};

const MODELS: [&str; 3] = [
    "SmolLM2-135M-Instruct.Q4_1.gguf",
    "gemma-3-270m-q4_k_m.gguf",
    "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
];

fn modes(c: &mut Criterion) {
    let dir = model::default_model_path()
        .expect("run ./scripts/setup.sh first")
        .parent()
        .unwrap()
        .to_path_buf();
    let only = std::env::var("TOKENSCOPE_BENCH_MODELS").unwrap_or_default();
    for file in MODELS
        .iter()
        .filter(|f| only.is_empty() || only.split(',').any(|o| f.contains(o)))
    {
        let mut group = c.benchmark_group(file.split('.').next().unwrap_or(file).to_string());
        group.sample_size(10);
        for activations in [Activations::F32, Activations::Q8] {
            let m = model::load(
                &ModelSource::Gguf(dir.join(file)),
                &LoadOptions {
                    activations,
                    ..Default::default()
                },
            )
            .expect("model loads");
            let text = "The quick brown fox jumps over the lazy dog while the farmer counts \
                        his sheep. "
                .repeat(40);
            let ids = m.tokenizer.encode(&text).unwrap();
            let long = &ids[..450];
            group.bench_function(format!("{activations}/prompt_450"), |b| {
                b.iter(|| m.model.next_logits(long, &mut m.model.new_cache()).unwrap())
            });
            let prompts: Vec<&[u32]> = (0..8).map(|i| &ids[i * 13..i * 13 + 12]).collect();
            group.bench_function(format!("{activations}/8_prompts_of_12"), |b| {
                b.iter(|| m.model.prefill_fused(&prompts).unwrap())
            });
            let mut context = m.model.new_cache();
            m.model.next_logits(&ids[..64], &mut context).unwrap();
            group.bench_function(format!("{activations}/decode_step_after_64"), |b| {
                b.iter(|| {
                    m.model
                        .next_logits(&ids[64..65], &mut context.clone())
                        .unwrap()
                })
            });
        }
        group.finish();
    }
}

criterion_group!(benches, modes);
criterion_main!(benches);
