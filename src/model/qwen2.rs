//! Qwen2 (Qwen2, Qwen2.5, Qwen2.5-Coder): llama's layers with biases on the q/k/v projections
//! (none on o), NeoX rope whose q/k rows llama.cpp's converter leaves unpermuted, and a
//! byte-level BPE tokenizer with its own pre-tokenizer (`pre = qwen2`).

use super::config::{Config, Family};

/// A `model_type: qwen2` config.json as a decoder [`Config`]. Qwen2's sliding window is only
/// used with `use_sliding_window: true` (refused: not implemented); otherwise its
/// `sliding_window`/`max_window_layers` fields are inert and dropped.
pub fn config_from_hf(mut json: serde_json::Value) -> Result<Config, String> {
    let obj = json.as_object_mut().ok_or("config.json is not an object")?;
    if obj.get("use_sliding_window").and_then(|v| v.as_bool()) == Some(true) {
        return Err(
            "use_sliding_window = true (Qwen2 sliding-window attention) is not supported".into(),
        );
    }
    for inert in ["use_sliding_window", "sliding_window", "max_window_layers"] {
        obj.remove(inert);
    }
    let mut cfg: Config = serde_json::from_value(json).map_err(|e| e.to_string())?;
    cfg.family = Family::qwen2();
    Ok(cfg)
}
