//! Mistral: llama's layers, with a sliding window on every layer in v0.1 (`sliding_window`;
//! null from v0.2 on). llama.cpp converts Mistral to its `llama` architecture, which has no
//! window: such GGUFs load as llama.

use super::config::{Config, Family};

/// A `model_type: mistral` config.json as a decoder [`Config`].
pub fn config_from_hf(mut json: serde_json::Value) -> Result<Config, String> {
    let obj = json.as_object_mut().ok_or("config.json is not an object")?;
    let window = super::config::take_sliding_window(obj)?;
    let mut cfg: Config = serde_json::from_value(json).map_err(|e| e.to_string())?;
    cfg.family = Family::mistral(window, cfg.rope_theta);
    Ok(cfg)
}
