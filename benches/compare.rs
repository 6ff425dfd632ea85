//! What a compare costs (issue 28 item 4): `POST /compare`'s engine on 1,000 tokens of text,
//! against scoring the same text on each model separately (prompt log-probs, one model after
//! the other). The two models here are two loads of the default model: the work is the same as
//! for two different models of its size. Run: `cargo bench --bench compare` (after
//! ./scripts/setup.sh); speed is measured here, never asserted in tests.

use criterion::{criterion_group, criterion_main, Criterion};
use tokenscope::engine::compare::compare_models;
use tokenscope::engine::scoring::score_prompt;
use tokenscope::model::{self, LoadOptions, ModelSource};

fn load() -> model::LoadedModel {
    let path = model::default_model_path().expect("run ./scripts/setup.sh first");
    model::load(&ModelSource::Gguf(path), &LoadOptions::default()).expect("model loads")
}

fn compare(c: &mut Criterion) {
    let (a, b) = (load(), load());
    let text = "The quick brown fox jumps over the lazy dog while the farmer counts his sheep. "
        .repeat(80);
    let ids: Vec<u32> = a.tokenizer.encode(&text).unwrap()[..1000].to_vec();
    let mut group = c.benchmark_group("compare_1000_tokens");
    group.sample_size(10);
    group.bench_function("score_on_each_model_separately", |bench| {
        bench.iter(|| {
            let sa = score_prompt(&a, &ids, 5, &|| false).unwrap();
            let sb = score_prompt(&b, &ids, 5, &|| false).unwrap();
            (sa.tokens.len(), sb.tokens.len())
        })
    });
    group.bench_function("compare", |bench| {
        bench.iter(|| compare_models(&a, &b, &ids, 0, 5).unwrap().1.positions)
    });
    group.finish();
}

criterion_group!(benches, compare);
criterion_main!(benches);
