//! Hub ids resolve from a pre-populated local hf-hub cache with HF_HUB_OFFLINE=1 (no network).

mod common;

use tokenscope::model::{self, LoadOptions, ModelSource};

#[test]
fn hub_id_loads_from_the_local_cache_offline() {
    let home = tempfile::tempdir().unwrap();
    let repo_dir = home.path().join("hub").join("models--tiny-org--tiny-llama");
    let snapshot = repo_dir.join("snapshots").join("0123456789abcdef");
    common::write_tiny_llama(&snapshot, 9);
    std::fs::create_dir_all(repo_dir.join("refs")).unwrap();
    std::fs::write(repo_dir.join("refs").join("main"), "0123456789abcdef").unwrap();
    std::fs::write(repo_dir.join("refs").join("v1"), "0123456789abcdef").unwrap();
    // This test binary holds only this test, so changing the environment is safe.
    std::env::set_var("HF_HOME", home.path());
    std::env::set_var("HF_HUB_OFFLINE", "1");

    for id in ["tiny-org/tiny-llama", "tiny-org/tiny-llama@v1"] {
        let source = ModelSource::parse(id).unwrap();
        let m = model::load(&source, &LoadOptions::default()).unwrap();
        assert_eq!(m.model.config().hidden_size, 64);
        assert_eq!(m.name, id.trim_end_matches("@main"));
    }

    let err = model::load(
        &ModelSource::parse("tiny-org/absent").unwrap(),
        &LoadOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("tiny-org/absent") && err.contains("HF_HUB_OFFLINE"),
        "{err}"
    );
}
