//! What a model source is, read without loading it: architecture, parameter count, storage
//! type and size on disk (GGUF header and tensor table; config.json and safetensors headers).
//! The model list shows this for models that are not loaded, and the memory guard uses the
//! size on disk as its estimate before a load.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::gguf::GgufFile;
use super::{hf_dir, ModelSource};

/// A model's sizes, as far as the estimate needs them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ModelShape {
    pub layers: u64,
    pub hidden: u64,
    pub ffn: u64,
    pub heads: u64,
    pub vocab: u64,
    /// The longest context (positions) it was made for.
    pub context: u64,
}

impl From<&crate::model::Config> for ModelShape {
    fn from(c: &crate::model::Config) -> Self {
        Self {
            layers: c.num_hidden_layers as u64,
            hidden: c.hidden_size as u64,
            ffn: c.intermediate_size as u64,
            heads: c.num_attention_heads as u64,
            vocab: c.vocab_size as u64,
            context: c.max_position_embeddings as u64,
        }
    }
}

/// A model's description before (or without) loading it. Fields are `None` when the source
/// cannot be read (the load then reports why) or is a hub id not yet in the local cache.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ModelCard {
    pub architecture: Option<String>,
    pub parameters: Option<u64>,
    /// The storage type holding most of the weights: `Q4_1`, `Q8_0`, `F16`, `BF16`, `F32`, …
    pub quantization: Option<String>,
    /// Bytes of the weight files.
    pub file_bytes: Option<u64>,
    /// Its sizes (layers, widths, vocabulary): what a training job's memory estimate needs.
    pub shape: Option<ModelShape>,
    /// Why the source cannot be read (a corrupt or crafted file): the model list shows it as
    /// failed with this reason, and every other model keeps working.
    pub error: Option<String>,
    /// What a training checkpoint says of its run (step, validation loss); `None` for a
    /// format that carries none (GGUF, Hugging Face directories).
    pub training: Option<super::nanogpt::TrainingInfo>,
    /// Its decoder config (family and shapes): what a LoRA job's settings are checked against
    /// before the job is accepted.
    pub config: Option<crate::model::Config>,
}

/// Reads what `source` holds. Never fails: what cannot be read stays `None`, with the reason
/// in `error`. A panic in a reader (a file no check foresaw) is caught and reported the same
/// way: one bad file must not take the model list down.
pub fn probe(source: &ModelSource) -> ModelCard {
    let read = std::panic::catch_unwind(|| match source {
        ModelSource::Gguf(path) => probe_gguf(path),
        ModelSource::HfDir(dir) => probe_hf_dir(dir),
        ModelSource::NanoGpt(path) => probe_nanogpt(path),
        ModelSource::Nanochat { dir, step } => probe_nanochat(dir, *step),
        ModelSource::Hub { .. } => Ok(ModelCard::default()),
        ModelSource::Adapter { dir, base } => probe_adapter(dir, base.as_deref()),
    });
    let reason = match read {
        Ok(Ok(card)) => return card,
        Ok(Err(reason)) => reason,
        Err(_) => "reading it failed unexpectedly (the file is malformed)".to_string(),
    };
    ModelCard {
        error: Some(reason),
        ..ModelCard::default()
    }
}

fn probe_gguf(path: &Path) -> Result<ModelCard, String> {
    let file = GgufFile::open(path).map_err(|e| e.to_string())?;
    let mut parameters = 0u64;
    let mut bytes_by_type: BTreeMap<String, u64> = BTreeMap::new();
    for info in file.content.tensor_infos.values() {
        let elems = info.shape.elem_count() as u64;
        parameters = parameters.saturating_add(elems);
        let dtype = info.ggml_dtype;
        let bytes = elems / dtype.block_size() as u64 * dtype.type_size() as u64;
        let sum = bytes_by_type.entry(format!("{dtype:?}")).or_default();
        *sum = sum.saturating_add(bytes);
    }
    Ok(ModelCard {
        architecture: file.architecture().ok(),
        parameters: Some(parameters),
        quantization: dominant(bytes_by_type).map(|t| t.to_uppercase()),
        file_bytes: std::fs::metadata(path).ok().map(|m| m.len()),
        shape: file.config().ok().map(|c| (&c).into()),
        error: None,
        training: None,
        config: file.config().ok(),
    })
}

fn probe_hf_dir(dir: &Path) -> Result<ModelCard, String> {
    let parts = hf_dir::inspect(dir).map_err(|e| e.to_string())?;
    let mut parameters = 0u64;
    let mut file_bytes = 0u64;
    let mut bytes_by_type: BTreeMap<String, u64> = BTreeMap::new();
    for f in &parts.weights {
        file_bytes += std::fs::metadata(f).map(|m| m.len()).unwrap_or(0);
        let name = f.file_name().unwrap_or_default().to_string_lossy();
        let header =
            safetensors_header(f).ok_or_else(|| format!("{name}: not a valid safetensors file"))?;
        for (_, dtype, shape) in header {
            let elems = shape
                .iter()
                .try_fold(1u64, |n, &d| n.checked_mul(d))
                .ok_or_else(|| format!("{name}: a tensor's element count overflows"))?;
            parameters = parameters.saturating_add(elems);
            let sum = bytes_by_type.entry(dtype).or_default();
            *sum = sum.saturating_add(elems);
        }
    }
    Ok(ModelCard {
        architecture: Some(parts.config.family.arch.name().to_string()),
        parameters: Some(parameters),
        quantization: dominant(bytes_by_type),
        file_bytes: Some(file_bytes),
        shape: Some((&parts.config).into()),
        error: None,
        training: None,
        config: Some(parts.config),
    })
}

/// An adapter is its base's card, with the adapter's own parameters added.
fn probe_adapter(dir: &Path, base: Option<&ModelSource>) -> Result<ModelCard, String> {
    let cfg = super::lora::read_config(dir).map_err(|e| e.to_string())?;
    let Some(base) = base else {
        return Err(format!(
            "its base `{}` is neither a model path nor a model id of this server",
            cfg.base_model.unwrap_or_default()
        ));
    };
    let mut card = probe(base);
    if let Some(e) = card.error.take() {
        return Err(format!("its base: {e}"));
    }
    let file = dir.join("adapter_model.safetensors");
    let header = safetensors_header(&file)
        .ok_or_else(|| "adapter_model.safetensors: not a valid safetensors file".to_string())?;
    if let Some(base_cfg) = &card.config {
        let shapes: Vec<(String, Vec<u64>)> = header
            .iter()
            .map(|(n, _, s)| (n.clone(), s.clone()))
            .collect();
        super::lora::check_shapes(base_cfg, &shapes)?;
    }
    let own: u64 = header
        .iter()
        .map(|(_, _, shape)| shape.iter().product::<u64>())
        .sum();
    card.parameters = card.parameters.map(|p| p.saturating_add(own));
    card.file_bytes = std::fs::metadata(&file).ok().map(|m| m.len());
    Ok(card)
}

fn probe_nanogpt(path: &Path) -> Result<ModelCard, String> {
    let ck = super::nanogpt::Checkpoint::open(path).map_err(|e| e.to_string())?;
    let dtype = ck
        .tensors
        .get("transformer.wte.weight")
        .map(|t| match t.storage_type.as_str() {
            "HalfStorage" => "F16",
            "BFloat16Storage" => "BF16",
            _ => "F32",
        });
    Ok(ModelCard {
        architecture: Some(super::nanogpt::ARCHITECTURE.to_string()),
        parameters: Some(ck.parameters()),
        quantization: dtype.map(str::to_string),
        file_bytes: std::fs::metadata(path).ok().map(|m| m.len()),
        shape: Some((&ck.config(ck.args.vocab_size, None)).into()),
        error: None,
        training: Some(ck.info.clone()),
        config: Some(ck.config(ck.args.vocab_size, None)),
    })
}

fn probe_nanochat(dir: &Path, step: u64) -> Result<ModelCard, String> {
    let ck = super::nanochat::Checkpoint::open(dir, step).map_err(|e| e.to_string())?;
    let model = dir.join(format!("model_{step:06}.pt"));
    Ok(ModelCard {
        architecture: Some(super::nanochat::ARCHITECTURE.to_string()),
        parameters: Some(ck.parameters()),
        quantization: ck.embedding_dtype().map(str::to_string),
        file_bytes: std::fs::metadata(model).ok().map(|m| m.len()),
        // Rows as the file holds them, padding included (as nanoGPT's are listed).
        shape: Some(ModelShape {
            vocab: ck.config.padded_vocab() as u64,
            ..(&ck.decoder_config(None)).into()
        }),
        error: None,
        training: Some(ck.info.clone()),
        config: Some(ck.decoder_config(None)),
    })
}

/// (name, dtype, shape) of every tensor in a safetensors file, from its JSON header alone.
fn safetensors_header(path: &PathBuf) -> Option<Vec<(String, String, Vec<u64>)>> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).ok()?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).ok()?;
    let len = u64::from_le_bytes(len);
    // The format caps the header at 100 MB; anything larger (or longer than the file) is not
    // a safetensors file.
    let file_len = f.metadata().ok()?.len();
    if len > 100 << 20 || len > file_len.saturating_sub(8) {
        return None;
    }
    let mut header = vec![0u8; len as usize];
    f.read_exact(&mut header).ok()?;
    let json: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&header).ok()?;
    Some(
        json.iter()
            .filter(|(k, _)| k.as_str() != "__metadata__")
            .filter_map(|(name, v)| {
                let dtype = v.get("dtype")?.as_str()?.to_string();
                let shape = v
                    .get("shape")?
                    .as_array()?
                    .iter()
                    .map(|d| d.as_u64())
                    .collect::<Option<Vec<u64>>>()?;
                Some((name.clone(), dtype, shape))
            })
            .collect(),
    )
}

fn dominant(bytes_by_type: BTreeMap<String, u64>) -> Option<String> {
    bytes_by_type
        .into_iter()
        .max_by_key(|(_, b)| *b)
        .map(|(t, _)| t)
}
