//! Turning a prompt into distributions: the maths, the generation loop, the response types.

pub mod batch;
pub mod compare;
pub mod detokenize;
pub mod distribution;
pub mod generate;
pub mod lens;
pub mod output;
pub mod prefix_cache;
pub mod registry;
pub mod scoring;
pub mod worker;

pub use distribution::Distribution;
pub use generate::{generate, tokenize, EngineError, GenerateParams};
pub use output::{
    Decoding, FinishReason, GenerateResponse, LogprobsMode, Metadata, PromptToken, Step,
    TargetScore, TokenProbability,
};
