//! Shared helpers for integration tests: the real default model, loaded once per test binary.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::OnceLock;

use tokenscope::model::{self, LoadOptions, LoadedModel, ModelSource};

/// Path of the default GGUF; `scripts/setup.sh` (run by the README's test command) fetches it.
pub fn default_gguf() -> PathBuf {
    model::default_model_path()
        .expect("default model missing: run ./scripts/setup.sh (the README's test command does)")
}

/// The default model in f32 on CPU, shared by the tests of one binary.
pub fn smollm() -> &'static LoadedModel {
    static MODEL: OnceLock<LoadedModel> = OnceLock::new();
    MODEL.get_or_init(|| {
        model::load(&ModelSource::Gguf(default_gguf()), &LoadOptions::default())
            .expect("default model loads")
    })
}
