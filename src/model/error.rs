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
