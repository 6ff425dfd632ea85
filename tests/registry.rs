//! The model registry's promises, through its library API on real models: a model serving a
//! request is never unloaded to make room for another, and loads of one id join.

mod common;

use std::path::Path;
use std::time::Duration;

use tokenscope::engine::registry::{ModelRegistry, Origin, RegistryError, RegistrySettings};
use tokenscope::engine::worker::ModelState;
use tokenscope::engine::GenerateParams;
use tokenscope::model::ModelSource;

/// A tiny random-weight llama as a Hugging Face directory (SmolLM2's tokenizer).
fn tiny_dir(dir: &Path) -> std::path::PathBuf {
    let out = dir.join("tiny");
    std::fs::create_dir_all(&out).unwrap();
    common::write_tiny_llama(&out, 5);
    out
}

fn wait_loaded(registry: &ModelRegistry, id: &str) {
    common::wait_until(
        &format!("{id} loaded"),
        Duration::from_secs(120),
        || match registry.model_state(id) {
            ModelState::Ready(_) => true,
            ModelState::Failed(e) => panic!("{id} failed to load: {e}"),
            _ => false,
        },
    );
}

fn one_model_at_a_time() -> (tempfile::TempDir, ModelRegistry, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let registry = ModelRegistry::new(RegistrySettings {
        max_loaded: 1,
        ..Default::default()
    });
    let smol = registry.add(
        ModelSource::Gguf(common::default_gguf()),
        Origin::Configured,
    );
    let tiny = registry.add(ModelSource::HfDir(tiny_dir(dir.path())), Origin::Configured);
    (dir, registry, smol, tiny)
}

#[test]
fn a_model_in_use_is_not_unloaded_to_make_room() {
    let (_dir, registry, smol, tiny) = one_model_at_a_time();
    assert!(registry.load(&smol).unwrap());
    wait_loaded(&registry, &smol);

    // A request holds the model's handle from choosing it until its answer is sent.
    let request = registry.handle(&smol);
    let err = registry.load(&tiny).unwrap_err();
    assert!(
        matches!(err, RegistryError::TooManyLoaded { max: 1 }),
        "{err}"
    );
    assert!(matches!(registry.model_state(&smol), ModelState::Ready(_)));

    // A job queued or running keeps it too, even once the request's handle is gone.
    let ids = common::smollm()
        .tokenizer
        .encode("One, two, three,")
        .unwrap();
    let params = GenerateParams {
        max_tokens: 64,
        temperature: 0.0,
        ..Default::default()
    };
    let reply = request
        .submit_ids("One, two, three,".into(), ids, params)
        .unwrap();
    drop(request);
    assert!(
        registry.load(&tiny).is_err(),
        "unloaded while a job was queued or running"
    );
    let answer = reply.blocking_recv().unwrap().unwrap();
    assert!(!answer.generated_text.is_empty());

    // Idle now: the least recently used model goes, and the other loads.
    common::wait_until("the job's end", Duration::from_secs(60), || {
        !registry.in_use(&smol)
    });
    assert!(registry.load(&tiny).unwrap());
    assert!(matches!(registry.model_state(&smol), ModelState::Unloaded));
    wait_loaded(&registry, &tiny);
}

#[test]
fn concurrent_loads_of_one_model_start_one_worker() {
    let (_dir, registry, _smol, tiny) = one_model_at_a_time();
    let started: Vec<bool> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|_| s.spawn(|| registry.load(&tiny).unwrap()))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(
        started.iter().filter(|&&b| b).count(),
        1,
        "exactly one load starts a worker: {started:?}"
    );
    let (a, b) = (registry.handle(&tiny), registry.handle(&tiny));
    assert!(a.same_worker(&b));
    drop((a, b));
    wait_loaded(&registry, &tiny);
    assert!(
        !registry.load(&tiny).unwrap(),
        "loaded already: nothing to start"
    );
}
