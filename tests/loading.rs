//! Model sources: Hugging Face directories (single and sharded), and clear errors for
//! everything that is not a loadable model.

mod common;

use candle_core::Device;
use tokenscope::engine::{self, GenerateParams};
use tokenscope::model::{self, LoadOptions, ModelError, ModelSource};

fn last_logits(m: &tokenscope::model::Decoder, ids: &[u32]) -> Vec<f32> {
    m.next_logits(ids, &mut m.new_cache()).unwrap()
}

fn load_str(s: &str) -> Result<model::LoadedModel, ModelError> {
    model::load(&ModelSource::parse(s)?, &LoadOptions::default())
}

#[test]
fn loads_a_hf_directory_with_the_weights_it_was_saved_with() {
    let dir = tempfile::tempdir().unwrap();
    let original = common::write_tiny_llama(dir.path(), 1);
    let loaded = load_str(dir.path().to_str().unwrap()).unwrap();
    assert_eq!(loaded.architecture, "llama");
    assert_eq!(loaded.model.config().num_hidden_layers, 2);
    assert_eq!(loaded.eos_ids, vec![2]);
    let ids = loaded.tokenizer.encode("The capital of France is").unwrap();
    assert_eq!(
        ids,
        [504, 3575, 282, 4649, 314],
        "tokenizer.json round-trips"
    );
    assert_eq!(
        last_logits(&original, &ids),
        last_logits(&loaded.model, &ids)
    );
    // And it generates through the engine.
    let r = engine::generate(&loaded, "x", &ids, &GenerateParams::default(), &|| false).unwrap();
    assert_eq!(r.tokens.len(), 5);
}

#[test]
fn loads_a_sharded_directory() {
    let dir = tempfile::tempdir().unwrap();
    let original = common::write_tiny_llama(dir.path(), 2);
    // Split model.safetensors into two shards plus an index.
    let all =
        candle_core::safetensors::load(dir.path().join("model.safetensors"), &Device::Cpu).unwrap();
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    let mut names: Vec<&String> = all.keys().collect();
    names.sort();
    let (a, b) = names.split_at(names.len() / 2);
    let mut weight_map = serde_json::Map::new();
    for (shard, part) in [
        ("model-00001-of-00002.safetensors", a),
        ("model-00002-of-00002.safetensors", b),
    ] {
        let tensors: std::collections::HashMap<_, _> = part
            .iter()
            .map(|n| ((*n).clone(), all[*n].clone()))
            .collect();
        candle_core::safetensors::save(&tensors, dir.path().join(shard)).unwrap();
        for n in part {
            weight_map.insert((*n).clone(), shard.into());
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    let loaded = load_str(dir.path().to_str().unwrap()).unwrap();
    let ids = [504u32, 3575, 282];
    assert_eq!(
        last_logits(&original, &ids),
        last_logits(&loaded.model, &ids)
    );

    // A missing shard is named.
    std::fs::remove_file(dir.path().join("model-00002-of-00002.safetensors")).unwrap();
    let err = load_str(dir.path().to_str().unwrap())
        .unwrap_err()
        .to_string();
    assert!(err.contains("model-00002-of-00002.safetensors"), "{err}");
}

#[test]
fn nonexistent_paths_are_clear_errors() {
    for s in [
        "./no/such/dir",
        "/nope/model.gguf",
        "models/missing.gguf",
        "not a model",
        "",
    ] {
        let err = load_str(s).unwrap_err();
        assert!(matches!(err, ModelError::NotFound(_)), "{s}: {err}");
    }
}

#[test]
fn hub_ids_parse_with_revisions() {
    assert_eq!(
        ModelSource::parse("HuggingFaceTB/SmolLM2-135M@main").unwrap(),
        ModelSource::Hub {
            repo: "HuggingFaceTB/SmolLM2-135M".into(),
            revision: "main".into()
        }
    );
    assert_eq!(
        ModelSource::parse("org/name@v1.0").unwrap(),
        ModelSource::Hub {
            repo: "org/name".into(),
            revision: "v1.0".into()
        }
    );
    assert!(ModelSource::parse("a/b/c").is_err());
    assert!(ModelSource::parse("org/name@").is_err());
}

#[test]
fn corrupt_files_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    // Not GGUF at all.
    let junk = dir.path().join("junk.gguf");
    std::fs::write(&junk, b"this is not a gguf file, just text").unwrap();
    let err = load_str(junk.to_str().unwrap()).unwrap_err();
    assert!(matches!(err, ModelError::Corrupt { .. }), "{err}");
    // A real GGUF cut short: the header parses, the tensors do not.
    let bytes = std::fs::read(common::default_gguf()).unwrap();
    let cut = dir.path().join("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() / 3]).unwrap();
    let err = load_str(cut.to_str().unwrap()).unwrap_err();
    assert!(matches!(err, ModelError::Corrupt { .. }), "{err}");
    // Header only.
    std::fs::write(&cut, &bytes[..64]).unwrap();
    assert!(load_str(cut.to_str().unwrap()).is_err());
    // Corrupt safetensors in a directory.
    let hf = dir.path().join("hf");
    common::write_tiny_llama(&hf, 3);
    std::fs::write(hf.join("model.safetensors"), b"garbage").unwrap();
    let err = load_str(hf.to_str().unwrap()).unwrap_err();
    assert!(matches!(err, ModelError::Corrupt { .. }), "{err}");
}

#[test]
fn unsupported_architecture_names_what_is_supported() {
    let dir = tempfile::tempdir().unwrap();
    common::write_tiny_llama(dir.path(), 4);
    let cfg = dir.path().join("config.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    json["model_type"] = "gpt_neox".into();
    std::fs::write(&cfg, json.to_string()).unwrap();
    let err = load_str(dir.path().to_str().unwrap())
        .unwrap_err()
        .to_string();
    assert!(err.contains("gpt_neox") && err.contains("llama"), "{err}");
}

#[test]
fn missing_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    common::write_tiny_llama(dir.path(), 5);
    std::fs::remove_file(dir.path().join("tokenizer.json")).unwrap();
    let err = load_str(dir.path().to_str().unwrap())
        .unwrap_err()
        .to_string();
    assert!(err.contains("tokenizer.json"), "{err}");
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    let err = load_str(dir.path().to_str().unwrap())
        .unwrap_err()
        .to_string();
    assert!(err.contains("model.safetensors"), "{err}");
    std::fs::remove_file(dir.path().join("config.json")).unwrap();
    let err = load_str(dir.path().to_str().unwrap())
        .unwrap_err()
        .to_string();
    assert!(err.contains("config.json"), "{err}");
}

#[test]
fn gguf_dtype_keeps_weights_quantized_and_stays_close() {
    let q = model::load(
        &ModelSource::Gguf(common::default_gguf()),
        &LoadOptions {
            dtype: model::DtypeChoice::Gguf,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(q.dtype_label, "gguf-q4_1");
    let ids = [504u32, 3575, 282, 4649, 314];
    let lq = engine::distribution::log_softmax(&last_logits(&q.model, &ids));
    let lf = engine::distribution::log_softmax(&last_logits(&common::smollm().model, &ids));
    // candle's Q4_1 matmul quantizes activations to Q8_1, so this path is approximate.
    let paris = 7042;
    assert!(
        (lq[paris] - lf[paris]).abs() < 0.1,
        "{} vs {}",
        lq[paris],
        lf[paris]
    );
}
