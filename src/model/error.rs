//! Errors raised while locating, reading and running a model.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("model source `{0}` does not exist (expected a .gguf file, a Hugging Face model directory, or a hub id like `org/name[@revision]`)")]
    NotFound(String),
    #[error("model directory {dir} is missing {what}")]
    MissingFile { dir: PathBuf, what: String },
    #[error("could not read {path}: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("unsupported architecture `{found}`; supported: {supported}")]
    UnsupportedArchitecture { found: String, supported: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("hub: {0}")]
    Hub(String),
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("device: {0}")]
    Device(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

pub type Result<T> = std::result::Result<T, ModelError>;

/// A checkpoint with tensors the family's decoder would not use (a bias, an extra norm) is
/// refused, naming the first (in name order): loading would silently compute another model.
pub fn refuse_unknown_tensors(
    mut unknown: Vec<&str>,
    family: &super::config::Family,
) -> Result<()> {
    unknown.sort_unstable();
    match unknown.first() {
        None => Ok(()),
        Some(first) => Err(ModelError::Config(format!(
            "tensor `{first}` is not part of the {} architecture as implemented here \
             ({} unknown tensor(s)); refusing to load rather than ignore it",
            family.arch.name(),
            unknown.len()
        ))),
    }
}
