//! Gemma 3 (text): Gemma 2's layers with RMS-normed queries and keys in place of soft-capping,
//! five local (sliding-window) layers for each global one, and its own rope base on the local
//! layers. Read from GGUF files only: no Hugging Face directory is read or written (so it is
//! served and inspected, not fine-tuned).

use super::{Arch, ArchRef};
use crate::model::config::{Activation, Config, Family, Sliding};
use crate::model::error::Result;
use crate::model::gguf::{shortest_f64, GgufFile};

pub struct Gemma3;

impl Family {
    pub fn gemma3(sliding: Sliding, attn_scalar: f64) -> Self {
        Self {
            arch: ArchRef(&Gemma3),
            qk_norm: true,
            sandwich_norms: true,
            activation: Activation::GeluTanh,
            embed_scale: true,
            sliding: Some(sliding),
            attn_scalar: Some(attn_scalar),
            ..Self::default()
        }
    }
}

impl Arch for Gemma3 {
    fn name(&self) -> &'static str {
        "gemma3"
    }

    fn gguf_architectures(&self) -> &'static [&'static str] {
        &["gemma3"]
    }
    /// Its norm weights need nothing: llama.cpp's converter stores Gemma's `1 + w` in the
    /// file, so they multiply as they are. llama.cpp's defaults where the file is silent:
    /// every 6th layer global, local rope base 10 000 (`rope.freq_base_swa`), scores scaled by
    /// 1/√head_dim except on the 62-layer 27B model, whose `query_pre_attn_scalar` is
    /// hidden / heads.
    fn family_from_gguf(&self, file: &GgufFile, cfg: &Config) -> Result<Family> {
        let window = file
            .md_u32("gemma3.attention.sliding_window")?
            .ok_or_else(|| file.corrupt("gemma3.attention.sliding_window is missing".into()))?;
        let every = file
            .md_u32("gemma3.attention.sliding_window_pattern")?
            .unwrap_or(6);
        let local_theta = file
            .md_f32("gemma3.rope.freq_base_swa")?
            .unwrap_or(10_000.0);
        let scalar = if cfg.num_hidden_layers == 62 {
            (cfg.hidden_size / cfg.num_attention_heads) as f64
        } else {
            cfg.head_dim() as f64
        };
        Ok(Family::gemma3(
            Sliding {
                window: window as usize,
                global_every: every as usize,
                local_rope_theta: shortest_f64(local_theta),
                tiled: None,
            },
            scalar,
        ))
    }
}
