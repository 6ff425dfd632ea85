//! Reading GGUF files of every supported architecture (the families of [`super::family`]
//! that name a `general.architecture`) into a [`Config`] (shapes from the shared metadata
//! keys, the switches from the family's file) and HF-named tensors: q/k rows un-permuted
//! where the family's converter permuted them, fused tensors split as the family says, and
//! matrices either dequantized, kept as [`QMatMul`]s, or kept packed in the file's own blocks.

use std::collections::HashMap;
use std::io::{Read, Seek};
use std::path::Path;

use std::sync::Arc;

use candle_core::quantized::{gguf_file, GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Tensor};

use super::config::{Config, EosTokenId, Family};
use super::error::{ModelError, Result};
use super::family::{ArchRef, Rows};
use super::packed::PackedMatrix;
use super::quant::Format;

/// llama.cpp's rope frequency factors (Llama 3.1+): read into [`Config::rope_freq_factors`].
const ROPE_FREQS: &str = "rope_freqs.weight";

pub use super::layers::PackedWeights;

/// An opened GGUF file: its metadata and a reader positioned anywhere.
pub struct GgufFile {
    pub content: gguf_file::Content,
    reader: std::io::BufReader<std::fs::File>,
    path: std::path::PathBuf,
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path)?;
        let len = file.metadata()?.len();
        let mut reader = std::io::BufReader::new(file);
        // candle's reader trusts the header's lengths: walk it with bounds first.
        super::gguf_header::check(&mut reader, len).map_err(|reason| ModelError::Corrupt {
            path: path.to_path_buf(),
            reason: format!("not a valid GGUF file: {reason}"),
        })?;
        reader.seek(std::io::SeekFrom::Start(0))?;
        let content = gguf_file::Content::read(&mut reader).map_err(|e| ModelError::Corrupt {
            path: path.to_path_buf(),
            reason: format!("not a valid GGUF file ({e})"),
        })?;
        Ok(Self {
            content,
            reader,
            path: path.to_path_buf(),
        })
    }

    pub fn metadata(&self) -> &HashMap<String, gguf_file::Value> {
        &self.content.metadata
    }

    /// `general.architecture`, when a family reads it.
    pub fn architecture(&self) -> Result<String> {
        Ok(self.arch()?.0)
    }

    /// `general.architecture` and the family that reads it.
    fn arch(&self) -> Result<(String, ArchRef)> {
        let name = self
            .metadata()
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .ok_or_else(|| self.corrupt("general.architecture is missing".into()))?;
        match super::family::by_gguf_architecture(&name) {
            Some(arch) => Ok((name, arch)),
            None => Err(ModelError::UnsupportedArchitecture {
                found: name,
                supported: super::family::gguf_architectures().join(", "),
            }),
        }
    }

    pub(crate) fn corrupt(&self, reason: String) -> ModelError {
        ModelError::Corrupt {
            path: self.path.clone(),
            reason,
        }
    }

    pub(crate) fn md_u32(&self, key: &str) -> Result<Option<u32>> {
        match self.metadata().get(key) {
            None => Ok(None),
            Some(v) => v
                .to_u32()
                .or_else(|_| v.to_u64().map(|x| x as u32))
                .or_else(|_| v.to_i32().map(|x| x as u32))
                .map(Some)
                .map_err(|e| self.corrupt(format!("{key}: {e}"))),
        }
    }

    pub(crate) fn md_f32(&self, key: &str) -> Result<Option<f32>> {
        match self.metadata().get(key) {
            None => Ok(None),
            Some(v) => v
                .to_f32()
                .or_else(|_| v.to_f64().map(|x| x as f32))
                .map(Some)
                .map_err(|e| self.corrupt(format!("{key}: {e}"))),
        }
    }

    fn require_u32(&self, key: &str) -> Result<usize> {
        self.md_u32(key)?
            .map(|v| v as usize)
            .ok_or_else(|| self.corrupt(format!("metadata `{key}` is missing")))
    }

    /// The HF-style config implied by the `{arch}.*` metadata, with the family's switches.
    pub fn config(&self) -> Result<Config> {
        let (arch, family) = self.arch()?;
        let k = |s: &str| format!("{arch}.{s}");
        let vocab_size = match self.md_u32(&k("vocab_size"))? {
            Some(v) => v as usize,
            None => match self.metadata().get("tokenizer.ggml.tokens") {
                Some(v) => v.to_vec().map(|v| v.len()).unwrap_or(0),
                None => self
                    .content
                    .tensor_infos
                    .get("token_embd.weight")
                    .map(|t| t.shape.dims()[0])
                    .unwrap_or(0),
            },
        };
        let has_output = self.content.tensor_infos.contains_key("output.weight");
        let cfg = Config {
            hidden_size: self.require_u32(&k("embedding_length"))?,
            intermediate_size: self.require_u32(&k("feed_forward_length"))?,
            vocab_size,
            num_hidden_layers: self.require_u32(&k("block_count"))?,
            num_attention_heads: self.require_u32(&k("attention.head_count"))?,
            num_key_value_heads: self
                .md_u32(&k("attention.head_count_kv"))?
                .map(|v| v as usize),
            head_dim: self.md_u32(&k("attention.key_length"))?.map(|v| v as usize),
            rms_norm_eps: shortest_f64(
                match self.md_f32(&k("attention.layer_norm_rms_epsilon"))? {
                    Some(eps) => eps,
                    // GPT-2's LayerNorm.
                    None => self
                        .md_f32(&k("attention.layer_norm_epsilon"))?
                        .unwrap_or(1e-5),
                },
            ),
            rope_theta: shortest_f64(self.md_f32(&k("rope.freq_base"))?.unwrap_or(10_000.0)),
            max_position_embeddings: self.md_u32(&k("context_length"))?.unwrap_or(2048) as usize,
            tie_word_embeddings: !has_output,
            bos_token_id: self.md_u32("tokenizer.ggml.bos_token_id")?,
            eos_token_id: self
                .md_u32("tokenizer.ggml.eos_token_id")?
                .map(EosTokenId::One),
            rope_scaling: self.rope_scaling(&arch)?,
            rope_freq_factors: None,
            unimplemented: Default::default(),
            family: Family::default(),
        };
        let mut cfg = cfg;
        if let Some(v) = self.md_u32(&k("attention.value_length"))? {
            if v as usize != cfg.head_dim() {
                return Err(ModelError::Config(format!(
                    "{arch}.attention.value_length = {v} differs from key_length {}: not supported",
                    cfg.head_dim()
                )));
            }
        }
        if !family.gguf_softcaps() {
            for unsupported in ["attn_logit_softcapping", "final_logit_softcapping"] {
                if self.metadata().contains_key(&k(unsupported)) {
                    return Err(ModelError::Config(format!(
                        "{arch}.{unsupported} (logit soft-capping) is not supported for {arch}"
                    )));
                }
            }
        }
        cfg.family = family.family_from_gguf(self, &cfg)?;
        if let Some(dims) = self.md_u32(&k("rope.dimension_count"))? {
            if dims as usize != cfg.head_dim() {
                return Err(ModelError::Config(format!(
                    "{arch}.rope.dimension_count = {dims} (rope on part of each head) is not supported; \
                     head_dim is {}",
                    cfg.head_dim()
                )));
            }
        }
        if self.content.tensor_infos.contains_key(ROPE_FREQS) {
            cfg.rope_freq_factors = Some(self.read_vector(ROPE_FREQS)?);
        }
        self.check_tensor_names(&cfg.family)?;
        cfg.validate().map_err(ModelError::Config)?;
        Ok(cfg)
    }

    /// `{arch}.rope.scaling.*` as a config.json `rope_scaling`: none and linear are supported
    /// (yarn and the rest are refused by [`Config::validate`]).
    fn rope_scaling(&self, arch: &str) -> Result<Option<serde_json::Value>> {
        let kind = match self.metadata().get(&format!("{arch}.rope.scaling.type")) {
            None => return Ok(None),
            Some(v) => v
                .to_string()
                .map_err(|e| self.corrupt(format!("rope.scaling.type: {e}")))?
                .clone(),
        };
        let factor = self.md_f32(&format!("{arch}.rope.scaling.factor"))?;
        Ok(match (kind.as_str(), factor) {
            ("none", _) => None,
            ("linear", Some(1.0)) => None,
            (kind, f) => Some(serde_json::json!({"rope_type": kind, "factor": f})),
        })
    }

    /// Every tensor must be one this loader maps; an unknown one (a bias, an extra norm) would
    /// otherwise be skipped silently and the model would compute something else.
    fn check_tensor_names(&self, family: &Family) -> Result<()> {
        let unknown: Vec<&str> = self
            .content
            .tensor_infos
            .keys()
            .map(String::as_str)
            .filter(|n| {
                *n != ROPE_FREQS && hf_name(n, family).is_none() && split_of(n, family).is_none()
            })
            .collect();
        super::error::refuse_unknown_tensors(unknown, family)
    }

    /// A 1-D F32 tensor's values.
    fn read_vector(&self, name: &str) -> Result<Vec<f32>> {
        let mut file = std::fs::File::open(&self.path)?;
        let q = self
            .content
            .tensor(&mut file, name, &Device::Cpu)
            .map_err(|e| self.corrupt(format!("tensor `{name}`: {e}")))?;
        Ok(q.dequantize(&Device::Cpu)?.flatten_all()?.to_vec1()?)
    }

    fn read(&mut self, name: &str, device: &Device) -> Result<QTensor> {
        self.content
            .tensor(&mut self.reader, name, device)
            .map_err(|e| ModelError::Corrupt {
                path: self.path.clone(),
                reason: format!("tensor `{name}`: {e}"),
            })
    }

    /// A matrix whose type has a packed kernel, its blocks read straight from the file into
    /// the matrix (no intermediate copy: the largest tensor, often the embedding, would
    /// otherwise be in memory twice during the load and set the peak RSS); q/k rows taken in
    /// un-permuted order (`heads`). Other tensors return `None`.
    fn read_packed(&mut self, name: &str, heads: Option<usize>) -> Result<Option<PackedMatrix>> {
        Ok(self
            .read_packed_parts(name, heads, None)?
            .and_then(|mut parts| parts.pop()))
    }

    /// [`Self::read_packed`], cut into consecutive row ranges of `split` rows each (a fused
    /// q/k/v or gate/up tensor into its projections).
    fn read_packed_parts(
        &mut self,
        name: &str,
        heads: Option<usize>,
        split: Option<&[usize]>,
    ) -> Result<Option<Vec<PackedMatrix>>> {
        let Some(info) = self.content.tensor_infos.get(name) else {
            return Ok(None);
        };
        let (Some(format), [rows, cols]) = (Format::from_ggml(info.ggml_dtype), info.shape.dims())
        else {
            return Ok(None);
        };
        let (rows, cols) = (*rows, *cols);
        if cols == 0 || !cols.is_multiple_of(format.block_len()) {
            return Ok(None);
        }
        let Some(bytes) = (cols / format.block_len())
            .checked_mul(format.block_bytes())
            .and_then(|row| row.checked_mul(rows))
        else {
            return Err(self.corrupt(format!("tensor `{name}`: {rows}×{cols} is too large")));
        };
        let start = self.content.tensor_data_offset + info.offset;
        let file_len = self.reader.get_ref().metadata()?.len();
        if start.saturating_add(bytes as u64) > file_len {
            return Err(self.corrupt(format!(
                "tensor `{name}` ({bytes} bytes at {start}) runs past the end of the file"
            )));
        }
        let mut data = vec![0u8; bytes];
        self.reader
            .seek(std::io::SeekFrom::Start(start))
            .and_then(|_| self.reader.read_exact(&mut data))
            .map_err(|e| ModelError::Corrupt {
                path: self.path.clone(),
                reason: format!("tensor `{name}`: {e}"),
            })?;
        let order = heads.map(|n| unpermute_order(rows, n));
        let Some(split) = split else {
            let m = PackedMatrix::from_blocks(format, rows, cols, data, order.as_deref());
            return Ok(m.map(|m| vec![m]));
        };
        if split.iter().sum::<usize>() != rows || order.is_some() {
            return Err(self.corrupt(format!(
                "tensor `{name}` has {rows} rows, expected {split:?} of them"
            )));
        }
        let row_bytes = bytes / rows.max(1);
        let mut start = 0;
        let mut parts = Vec::with_capacity(split.len());
        for &n in split {
            let chunk = data[start * row_bytes..(start + n) * row_bytes].to_vec();
            start += n;
            match PackedMatrix::from_blocks(format, n, cols, chunk, None) {
                Some(m) => parts.push(m),
                None => return Ok(None),
            }
        }
        Ok(Some(parts))
    }

    /// All tensors, dequantized to `dtype` and renamed to HF names, with q/k un-permuted.
    /// With `keep_quantized`, the 2-D projection weights are also returned as [`QMatMul`]s.
    pub fn tensors(
        &mut self,
        cfg: &Config,
        dtype: DType,
        device: &Device,
        keep_quantized: bool,
    ) -> Result<(HashMap<String, Tensor>, HashMap<String, QMatMul>)> {
        let (dense, quant, _) = self.read_all(cfg, dtype, device, keep_quantized, false)?;
        Ok((dense, quant))
    }

    /// Like [`Self::tensors`] in f32, except that every matrix in a format with a packed
    /// kernel (projections, embeddings, the head) stays packed and gets no dense copy: the
    /// dense map holds only the rest. Matrices in other formats are dequantized, with a
    /// warning naming their type.
    pub fn tensors_with_packed(
        &mut self,
        cfg: &Config,
        device: &Device,
    ) -> Result<(HashMap<String, Tensor>, PackedWeights)> {
        let (dense, _, packed) = self.read_all(cfg, DType::F32, device, false, true)?;
        Ok((dense, packed))
    }

    #[allow(clippy::type_complexity)]
    fn read_all(
        &mut self,
        cfg: &Config,
        dtype: DType,
        device: &Device,
        keep_quantized: bool,
        pack: bool,
    ) -> Result<(
        HashMap<String, Tensor>,
        HashMap<String, QMatMul>,
        HashMap<String, Arc<PackedMatrix>>,
    )> {
        let names: Vec<String> = self.content.tensor_infos.keys().cloned().collect();
        let mut dense = HashMap::new();
        let mut quant = HashMap::new();
        let mut packed = HashMap::new();
        let mut unpacked_types = std::collections::BTreeSet::new();
        for name in names {
            if let Some(parts) = split_of(&name, &cfg.family) {
                let rows: Vec<usize> = parts.iter().map(|p| p.rows(cfg)).collect();
                let hf: Vec<String> = parts.iter().map(|p| p.name.clone()).collect();
                if pack && name.ends_with(".weight") {
                    if let Some(ms) = self.read_packed_parts(&name, None, Some(&rows))? {
                        packed.extend(hf.into_iter().zip(ms.into_iter().map(Arc::new)));
                        continue;
                    }
                }
                let t = self.read(&name, device)?.dequantize(device)?;
                if t.dim(0)? != rows.iter().sum::<usize>() {
                    return Err(self.corrupt(format!(
                        "tensor `{name}` has {} rows, expected {rows:?} of them",
                        t.dim(0)?
                    )));
                }
                let mut start = 0;
                for (hf, n) in hf.into_iter().zip(rows) {
                    let part = t.narrow(0, start, n)?.contiguous()?.to_dtype(dtype)?;
                    start += n;
                    dense.insert(hf, part);
                }
                continue;
            }
            let Some(hf) = hf_name(&name, &cfg.family) else {
                // rope_freqs is in the config (checked by config(): no other name gets here).
                continue;
            };
            let permuted = cfg.family.arch.gguf_qk_permuted();
            let heads = if permuted && name.ends_with("attn_q.weight") {
                Some(cfg.num_attention_heads)
            } else if permuted && name.ends_with("attn_k.weight") {
                Some(cfg.n_kv_heads())
            } else {
                None
            };
            if pack {
                if let Some(p) = self.read_packed(&name, heads)? {
                    packed.insert(hf, Arc::new(p));
                    continue;
                }
            }
            let q = self.read(&name, device)?;
            if pack && q.shape().rank() == 2 && q.dtype() != GgmlDType::F32 {
                unpacked_types.insert(format!("{:?}", q.dtype()));
            }
            let t = q.dequantize(device)?;
            let t = match heads {
                Some(n) => unpermute(&t, n)?,
                None => t,
            };
            let is_projection = t.rank() == 2 && hf != "model.embed_tokens.weight";
            if keep_quantized && is_projection && heads.is_none() {
                quant.insert(hf.clone(), QMatMul::from_qtensor(q)?);
            }
            dense.insert(hf, t.to_dtype(dtype)?);
        }
        if !unpacked_types.is_empty() {
            tracing::warn!(
                types = ?unpacked_types,
                "weights in these GGUF types have no packed kernel: they are dequantized to f32 \
                 (exact, but 4 bytes per weight in memory)"
            );
        }
        Ok((dense, quant, packed))
    }
}

/// Source row (GGUF order) of each HF row: the row form of [`unpermute`].
pub fn unpermute_order(rows: usize, n_head: usize) -> Vec<usize> {
    let hd = rows / n_head;
    let half = hd / 2;
    let mut order = vec![0; rows];
    for h in 0..n_head {
        for a in 0..2 {
            for i in 0..half {
                order[h * hd + a * half + i] = h * hd + i * 2 + a;
            }
        }
    }
    order
}

/// GGUF tensor name → HF name, for the tensors `family` has (anything else is `None`).
pub fn hf_name(gguf: &str, family: &Family) -> Option<String> {
    let simple = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        "output_norm.bias" if family.layer_norm => Some("model.norm.bias"),
        "position_embd.weight" if family.learned_positions => Some("model.embed_positions.weight"),
        _ => None,
    };
    if let Some(s) = simple {
        return Some(s.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    // Biases only where the family has them: anything else must not map onto anything.
    let (part, suffix) = match rest.strip_suffix(".weight") {
        Some(part) => (part, "weight"),
        None => match rest.strip_suffix(".bias") {
            Some(part @ ("attn_q" | "attn_k" | "attn_v")) if family.qkv_bias => (part, "bias"),
            Some(part @ ("attn_output" | "ffn_up" | "ffn_down")) if family.dense_bias => {
                (part, "bias")
            }
            Some(part @ ("attn_norm" | "ffn_norm")) if family.layer_norm => (part, "bias"),
            _ => return None,
        },
    };
    let sandwich = family.sandwich_norms;
    let hf = match part {
        "attn_q_norm" if family.qk_norm => "self_attn.q_norm",
        "attn_k_norm" if family.qk_norm => "self_attn.k_norm",
        "post_attention_norm" if sandwich => "post_attention_layernorm",
        "ffn_norm" if sandwich => "pre_feedforward_layernorm",
        "post_ffw_norm" if sandwich => "post_feedforward_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" if family.gated_mlp => "mlp.gate_proj",
        // A fused tensor is read by `split_of`.
        _ if family.arch.gguf_fused(part).is_some() => return None,
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{suffix}"))
}

/// One projection inside a fused GGUF tensor.
pub struct SplitPart {
    /// Its HF name.
    pub name: String,
    rows: Rows,
}

impl SplitPart {
    pub fn rows(&self, cfg: &Config) -> usize {
        self.rows.of(cfg)
    }
}

/// The projections a fused GGUF tensor holds, in row order ([`super::family::Arch::gguf_fused`]);
/// a bias only where the family has q/k/v biases, on its fused q/k/v.
pub fn split_of(gguf: &str, family: &Family) -> Option<Vec<SplitPart>> {
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (part, suffix) = rest.rsplit_once('.')?;
    let parts = family.arch.gguf_fused(part)?;
    match suffix {
        "weight" => {}
        "bias" if part == "attn_qkv" && family.qkv_bias => {}
        _ => return None,
    }
    Some(
        parts
            .iter()
            .map(|&(name, rows)| SplitPart {
                name: format!("model.layers.{layer}.{name}.{suffix}"),
                rows,
            })
            .collect(),
    )
}

/// Undoes llama.cpp's converter permutation of q/k rows (done there for interleaved rope):
/// rows were reordered as (heads, head_dim/2, 2) → (heads, 2, head_dim/2).
pub fn unpermute(w: &Tensor, n_head: usize) -> candle_core::Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    let head_dim = rows / n_head;
    w.reshape((n_head, head_dim / 2, 2, cols))?
        .transpose(1, 2)?
        .reshape((rows, cols))
}

/// The f64 that prints like the f32 (1e-5, not 9.999999747378752e-6) for a clean config.json.
pub(crate) fn shortest_f64(x: f32) -> f64 {
    x.to_string().parse().unwrap_or(x as f64)
}
