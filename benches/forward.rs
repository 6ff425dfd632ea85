//! Forward passes of the default model (f32, CPU) and the distribution step over its vocabulary.
//! Run: `cargo bench --bench forward` (after ./scripts/setup.sh).

use candle_core::{Device, Tensor};
use criterion::{criterion_group, criterion_main, Criterion};
use tokenscope::engine::{Distribution, GenerateParams};
use tokenscope::model::{self, LoadOptions, ModelSource};

fn load() -> model::LoadedModel {
    let path = model::default_model_path().expect("run ./scripts/setup.sh first");
    model::load(&ModelSource::Gguf(path), &LoadOptions::default()).expect("model loads")
}

fn prompt_of(m: &model::LoadedModel, tokens: usize) -> Vec<u32> {
    let text = "The quick brown fox jumps over the lazy dog while the farmer counts his sheep. "
        .repeat(40);
    let ids = m.tokenizer.encode(&text).unwrap();
    ids[..tokens].to_vec()
}

fn forward(c: &mut Criterion) {
    let m = load();
    let mut group = c.benchmark_group("forward_f32");
    group.sample_size(10);
    for n in [5usize, 32, 128] {
        let ids = prompt_of(&m, n);
        let x = Tensor::new(ids.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        group.bench_function(format!("prompt_{n}_tokens"), |b| {
            b.iter(|| {
                let mut cache = m.model.new_cache();
                m.model.forward(&x, &mut cache).unwrap()
            })
        });
    }
    // The same prompts through candle's ops instead of the fused CPU path (which takes inputs
    // of up to 48 tokens).
    let candle_path = m.model.clone().without_fused_path();
    for n in [5usize, 32] {
        let ids = prompt_of(&m, n);
        group.bench_function(format!("prompt_{n}_tokens_candle_ops"), |b| {
            b.iter(|| {
                candle_path
                    .next_logits(&ids, &mut candle_path.new_cache())
                    .unwrap()
            })
        });
    }
    // 16 decoding steps after a 64- and a 512-token context (the context is cached once; each
    // iteration continues a copy-on-write clone of it).
    for context_len in [64usize, 512] {
        let mut context = m.model.new_cache();
        let mut ops_context = candle_path.new_cache();
        let ids = prompt_of(&m, context_len);
        m.model.next_logits(&ids, &mut context).unwrap();
        candle_path.next_logits(&ids, &mut ops_context).unwrap();
        for (name, model, context) in [
            (
                format!("decode_16_tokens_at_{context_len}"),
                &m.model,
                &context,
            ),
            (
                format!("decode_16_tokens_at_{context_len}_candle_ops"),
                &candle_path,
                &ops_context,
            ),
        ] {
            group.bench_function(name, |b| {
                b.iter(|| {
                    let mut cache = context.clone();
                    for step in 0..16u32 {
                        model.next_logits(&[279 + step], &mut cache).unwrap();
                    }
                })
            });
        }
    }
    group.finish();

    let logits = m
        .model
        .next_logits(&prompt_of(&m, 5), &mut m.model.new_cache())
        .unwrap();
    c.bench_function("distribution_49152/log_softmax+top5+entropy", |b| {
        b.iter(|| {
            let d = Distribution::from_logits(std::hint::black_box(&logits), 1.0).unwrap();
            (d.top_k(5), d.entropy())
        })
    });
    c.bench_function("distribution_49152/log_softmax+top50+rank", |b| {
        b.iter(|| {
            let d = Distribution::from_logits(std::hint::black_box(&logits), 0.7).unwrap();
            (d.top_k(50), d.rank(7042))
        })
    });
    let prompt = "The capital of France is";
    let ids = m.tokenizer.encode(prompt).unwrap();
    let params = GenerateParams {
        temperature: 0.0,
        max_tokens: 16,
        ..Default::default()
    };
    let mut group = c.benchmark_group("generate_f32");
    group.sample_size(10);
    group.bench_function("greedy_16_tokens", |b| {
        b.iter(|| tokenscope::engine::generate(&m, prompt, &ids, &params, &|| false).unwrap())
    });
    group.finish();
}

criterion_group!(benches, forward);
criterion_main!(benches, kernels);

/// The packed kernels alone, on the default model's shapes (one input row, or 16) and, for the
/// K-quant and Q5_0 formats of the Gemma 3 / Qwen2.5 files, a 640×2048 matrix; plus the tiled
/// GEMM of long prompts (128 input rows); each also with 8-bit activations (`/q8`).
fn packed(c: &mut Criterion) {
    use candle_core::quantized::{GgmlDType, QTensor};
    use tokenscope::model::packed::PackedMatrix;
    use tokenscope::model::quant::Format;
    let mut group = c.benchmark_group("packed_matvec");
    for (name, dtype, rows, cols, n) in [
        (
            "q4_1_1536x576",
            GgmlDType::Q4_1,
            1536usize,
            576usize,
            1usize,
        ),
        ("q4_1_1536x576_16_inputs", GgmlDType::Q4_1, 1536, 576, 16),
        ("q4_1_576x1536_16_inputs", GgmlDType::Q4_1, 576, 1536, 16),
        ("q8_0_49152x576_lm_head", GgmlDType::Q8_0, 49152, 576, 1),
        ("q4_1_49152x576", GgmlDType::Q4_1, 49152, 576, 1),
        ("q5_0_2048x640", GgmlDType::Q5_0, 2048, 640, 1),
        ("q4k_640x2048", GgmlDType::Q4K, 640, 2048, 1),
        ("q6k_640x2048", GgmlDType::Q6K, 640, 2048, 1),
        ("q4k_640x2048_2_inputs", GgmlDType::Q4K, 640, 2048, 2),
        ("q4k_640x2048_4_inputs", GgmlDType::Q4K, 640, 2048, 4),
        ("q4k_640x2048_8_inputs", GgmlDType::Q4K, 640, 2048, 8),
        ("q4k_640x2048_16_inputs", GgmlDType::Q4K, 640, 2048, 16),
        (
            "q4_1_1536x576_128_inputs_tiled",
            GgmlDType::Q4_1,
            1536,
            576,
            128,
        ),
        (
            "q4k_640x2048_128_inputs_tiled",
            GgmlDType::Q4K,
            640,
            2048,
            128,
        ),
    ] {
        let values: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919 % 1013) as f32 / 1013.0 - 0.5) * 0.1)
            .collect();
        let dense =
            candle_core::Tensor::from_vec(values, (rows, cols), &candle_core::Device::Cpu).unwrap();
        let q = QTensor::quantize(&dense, dtype).unwrap();
        let format = Format::from_ggml(dtype).unwrap();
        let m = PackedMatrix::from_blocks(format, rows, cols, q.data().unwrap().into_owned(), None)
            .unwrap();
        let x: Vec<f32> = (0..n * cols).map(|i| (i % 7) as f32 * 0.1).collect();
        group.bench_function(name, |b| b.iter(|| m.matmul(std::hint::black_box(&x), n)));
        // The same product in llama.cpp's arithmetic (`--activations q8`).
        let m = m.with_activations(tokenscope::model::q8::Activations::Q8);
        group.bench_function(format!("{name}/q8"), |b| {
            b.iter(|| m.matmul(std::hint::black_box(&x), n))
        });
    }
    group.finish();
}

criterion_group!(kernels, packed);
