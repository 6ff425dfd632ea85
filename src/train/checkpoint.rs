//! Resumable checkpoints: weights, optimizer moments, step and data position (the batch order
//! is a pure function of the seed and the number of windows consumed, so that position plus
//! the seed is the whole RNG state).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::TrainError;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Optimizer steps completed.
    pub step: usize,
    /// Training windows consumed so far (the data position).
    pub consumed: usize,
    pub seed: u64,
    pub total_steps: usize,
}

pub struct Checkpoint {
    pub dir: PathBuf,
    pub state: TrainState,
    pub weights: HashMap<String, Tensor>,
    pub optimizer: HashMap<String, Tensor>,
}

pub fn checkpoints_dir(output: &Path) -> PathBuf {
    output.join("checkpoints")
}

pub fn save(
    output: &Path,
    state: &TrainState,
    weights: &HashMap<String, Tensor>,
    optimizer: &HashMap<String, Tensor>,
) -> Result<PathBuf, TrainError> {
    let root = checkpoints_dir(output);
    let dir = root.join(format!("step-{:07}", state.step));
    let tmp = root.join(format!(".step-{:07}.tmp", state.step));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp)?;
    candle_core::safetensors::save(weights, tmp.join("model.safetensors"))?;
    candle_core::safetensors::save(optimizer, tmp.join("optimizer.safetensors"))?;
    std::fs::write(
        tmp.join("state.json"),
        serde_json::to_string_pretty(state).map_err(|e| TrainError::Config(e.to_string()))?,
    )?;
    // On disk before the rename, so that a power cut cannot leave a renamed directory whose
    // files are still only in the page cache.
    for f in ["model.safetensors", "optimizer.safetensors", "state.json"] {
        std::fs::File::open(tmp.join(f))?.sync_all()?;
    }
    let _ = std::fs::remove_dir_all(&dir);
    // Written under a temporary name and renamed, so a crash never leaves a half checkpoint
    // that --resume would pick.
    std::fs::rename(&tmp, &dir)?;
    sync_dir(&root);
    // Keep the two newest.
    let mut all = list(output);
    while all.len() > 2 {
        let old = all.remove(0);
        let _ = std::fs::remove_dir_all(old);
    }
    Ok(dir)
}

/// Removes every checkpoint but the newest (and any half-written one).
pub fn keep_latest_only(output: &Path) {
    let mut all = list(output);
    all.pop();
    for old in all {
        let _ = std::fs::remove_dir_all(old);
    }
    if let Ok(rd) = std::fs::read_dir(checkpoints_dir(output)) {
        for e in rd.filter_map(Result::ok) {
            if e.file_name().to_string_lossy().starts_with('.') {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

/// Complete checkpoints, oldest first.
fn list(output: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(checkpoints_dir(output))
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("step-"))
                        && p.join("state.json").is_file()
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

pub fn load_latest(output: &Path, device: &Device) -> Result<Option<Checkpoint>, TrainError> {
    let Some(dir) = list(output).pop() else {
        return Ok(None);
    };
    let state: TrainState = serde_json::from_str(&std::fs::read_to_string(dir.join("state.json"))?)
        .map_err(|e| TrainError::Config(format!("{}: {e}", dir.display())))?;
    let weights = candle_core::safetensors::load(dir.join("model.safetensors"), device)?;
    let optimizer = candle_core::safetensors::load(dir.join("optimizer.safetensors"), device)?;
    Ok(Some(Checkpoint {
        dir,
        state,
        weights,
        optimizer,
    }))
}

/// Makes a rename in `dir` durable (a no-op where directories cannot be opened).
fn sync_dir(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}
