//! Where a model comes from: a `.gguf` file, a Hugging Face directory, a nanoGPT checkpoint,
//! or a hub id.

use std::path::{Path, PathBuf};

use super::error::{ModelError, Result};

/// A parsed `--model` argument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// A single GGUF file (weights, config and tokenizer all inside).
    Gguf(PathBuf),
    /// A Hugging Face model directory: config.json, safetensors, tokenizer.json.
    HfDir(PathBuf),
    /// A nanoGPT `ckpt.pt` (given as the file, or as the `out*/` folder holding it).
    NanoGpt(PathBuf),
    /// One step of a nanochat checkpoint folder (`model_<step>.pt` + `meta_<step>.json`).
    Nanochat { dir: PathBuf, step: u64 },
    /// A hub repository, resolved through the local hf-hub cache (downloading if allowed).
    Hub { repo: String, revision: String },
    /// A PEFT LoRA adapter folder on a base model (`None`: the base it names is not found; the
    /// registry resolves a base named by model id).
    Adapter {
        dir: PathBuf,
        base: Option<Box<ModelSource>>,
    },
}

impl ModelSource {
    /// Interprets a string the way the CLI does: existing paths win, then `org/name[@rev]`.
    pub fn parse(s: &str) -> Result<Self> {
        let s = s.trim();
        if s.is_empty() {
            return Err(ModelError::NotFound(String::new()));
        }
        let path = Path::new(s);
        if let Some(source) = Self::from_path(path) {
            return Ok(source);
        }
        let looks_like_path = s.starts_with('.')
            || s.starts_with('/')
            || s.starts_with('~')
            || s.ends_with(".gguf")
            || s.ends_with(".safetensors")
            || s.ends_with(".pt")
            || s.contains('\\');
        let (repo, revision) = match s.split_once('@') {
            Some((r, rev)) => (r, rev),
            None => (s, "main"),
        };
        let valid_part = |p: &str| {
            !p.is_empty()
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        };
        let is_repo = match repo.split_once('/') {
            Some((org, name)) => valid_part(org) && valid_part(name) && !name.contains('/'),
            None => false,
        };
        if looks_like_path || !is_repo || revision.is_empty() {
            return Err(ModelError::NotFound(s.to_string()));
        }
        Ok(Self::Hub {
            repo: repo.to_string(),
            revision: revision.to_string(),
        })
    }

    /// What an existing path holds: a `.pt` file is a nanoGPT checkpoint, any other file a
    /// GGUF; a folder of `model_<step>.pt` + `meta_<step>.json` nanochat's checkpoints (the
    /// latest step), one with `config.json` a Hugging Face directory, one with only `ckpt.pt`
    /// a nanoGPT run's output folder.
    pub fn from_path(path: &Path) -> Option<Self> {
        if path.is_file() {
            return Some(if path.extension().is_some_and(|e| e == "pt") {
                Self::NanoGpt(path.to_path_buf())
            } else {
                Self::Gguf(path.to_path_buf())
            });
        }
        if path.is_dir() && super::lora::is_adapter_dir(path) {
            let base = super::lora::read_config(path)
                .ok()
                .and_then(|cfg| super::lora::base_path(path, &cfg))
                .filter(|b| !super::lora::is_adapter_dir(b))
                .and_then(|b| Self::from_path(&b))
                .map(Box::new);
            return Some(Self::Adapter {
                dir: path.to_path_buf(),
                base,
            });
        }
        if path.is_dir() {
            if let Some(&step) = super::nanochat::steps(path).last() {
                return Some(Self::Nanochat {
                    dir: path.to_path_buf(),
                    step,
                });
            }
            let ckpt = path.join("ckpt.pt");
            return Some(if !path.join("config.json").is_file() && ckpt.is_file() {
                Self::NanoGpt(ckpt)
            } else {
                Self::HfDir(path.to_path_buf())
            });
        }
        None
    }

    /// The kind of source, as `GET /models` and `GET /info` name it.
    pub fn format(&self) -> &'static str {
        match self {
            Self::Gguf(_) => "gguf",
            Self::HfDir(_) => "huggingface",
            Self::NanoGpt(_) => "nanogpt",
            Self::Nanochat { .. } => "nanochat",
            Self::Hub { .. } => "hub",
            Self::Adapter { .. } => "peft-lora",
        }
    }

    /// The same source at another step of its checkpoints (`--checkpoint`): only nanochat
    /// folders hold several.
    pub fn at_checkpoint(self, checkpoint: &str) -> Result<Self> {
        let step = super::nanochat::parse_step(checkpoint).ok_or_else(|| {
            ModelError::Config(format!(
                "--checkpoint {checkpoint:?}: expected a step such as step_002920, 002920 or 2920"
            ))
        })?;
        match self {
            Self::Nanochat { dir, .. } => {
                let have = super::nanochat::steps(&dir);
                if !have.contains(&step) {
                    let names: Vec<String> =
                        have.into_iter().map(super::nanochat::step_label).collect();
                    return Err(ModelError::NotFound(format!(
                        "checkpoint {} in {} (it holds {})",
                        super::nanochat::step_label(step),
                        dir.display(),
                        names.join(", ")
                    )));
                }
                Ok(Self::Nanochat { dir, step })
            }
            other => Err(ModelError::Config(format!(
                "--checkpoint chooses a step of a nanochat checkpoint folder; {} is a {} model",
                other.display_name(),
                other.format()
            ))),
        }
    }

    /// The same source with its paths made absolute and resolved (links, `..`) where they
    /// exist: two spellings of one file or folder become equal.
    pub fn canonical(&self) -> Self {
        let c = |p: &PathBuf| std::fs::canonicalize(p).unwrap_or_else(|_| p.clone());
        match self {
            Self::Gguf(p) => Self::Gguf(c(p)),
            Self::HfDir(p) => Self::HfDir(c(p)),
            Self::NanoGpt(p) => Self::NanoGpt(c(p)),
            Self::Nanochat { dir, step } => Self::Nanochat {
                dir: c(dir),
                step: *step,
            },
            Self::Adapter { dir, base } => Self::Adapter {
                dir: c(dir),
                base: base.as_ref().map(|b| Box::new(b.canonical())),
            },
            Self::Hub { .. } => self.clone(),
        }
    }

    /// Whether both name the same model (`adapter/../base` and `base` do).
    pub fn same_as(&self, other: &Self) -> bool {
        self == other || self.canonical() == other.canonical()
    }

    /// This adapter on `base` (`--base`), whatever base its `adapter_config.json` names.
    pub fn on_base(self, base: ModelSource) -> Result<Self> {
        match (self, &base) {
            (_, Self::Adapter { .. }) => Err(ModelError::Config(
                "--base names a LoRA adapter: an adapter's base is a model".into(),
            )),
            (Self::Adapter { dir, .. }, _) => Ok(Self::Adapter {
                dir,
                base: Some(Box::new(base)),
            }),
            (other, _) => Err(ModelError::Config(format!(
                "--base chooses the base of a PEFT adapter folder; {} is a {} model",
                other.display_name(),
                other.format()
            ))),
        }
    }

    /// A short human name for logs and `metadata.model_name`.
    pub fn display_name(&self) -> String {
        match self {
            Self::Gguf(p) => p
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| p.display().to_string()),
            Self::HfDir(p) | Self::Adapter { dir: p, .. } => std::fs::canonicalize(p)
                .ok()
                .and_then(|p| p.file_name().map(|s| s.to_string_lossy().into_owned()))
                .unwrap_or_else(|| p.display().to_string()),
            // `out-shakespeare-char/ckpt.pt` is named after its run's folder.
            Self::NanoGpt(p) => {
                let stem = p.file_stem().map(|s| s.to_string_lossy().into_owned());
                match (stem.as_deref(), std::fs::canonicalize(p).ok()) {
                    (Some("ckpt"), Some(full)) => full
                        .parent()
                        .and_then(|d| d.file_name())
                        .map(|s| s.to_string_lossy().into_owned())
                        .unwrap_or_else(|| "ckpt".into()),
                    (Some(stem), _) => stem.to_string(),
                    (None, _) => p.display().to_string(),
                }
            }
            // `d20/` at step 2920 is `d20-step_002920`.
            Self::Nanochat { dir, step } => {
                let folder = std::fs::canonicalize(dir)
                    .ok()
                    .and_then(|p| p.file_name().map(|s| s.to_string_lossy().into_owned()))
                    .unwrap_or_else(|| "nanochat".into());
                format!("{folder}-{}", super::nanochat::step_label(*step))
            }
            Self::Hub { repo, revision } if revision == "main" => repo.clone(),
            Self::Hub { repo, revision } => format!("{repo}@{revision}"),
        }
    }
}

/// Fetches (or finds in the cache) the files of a hub model and returns the snapshot
/// directory, which is then loaded like any Hugging Face directory.
pub fn resolve_hub(repo: &str, revision: &str) -> Result<PathBuf> {
    use hf_hub::{Cache, Repo, RepoType};
    let offline = std::env::var("HF_HUB_OFFLINE")
        .map(|v| !v.is_empty() && v != "0" && v.to_lowercase() != "false")
        .unwrap_or(false);
    let hub_repo = Repo::with_revision(repo.to_string(), RepoType::Model, revision.to_string());
    let cache = Cache::from_env();
    let alternatives = "set HF_HOME to a cache that holds it, download it while online, \
                        or pass a local directory or .gguf file with --model";

    // Online, one `info` call lists the repository so that optional files are not probed
    // with failing requests; offline, only the cache is consulted.
    let listing: Option<Vec<String>> = if offline {
        None
    } else {
        let info = api_repo(&hub_repo)?.info().map_err(|e| {
            ModelError::Hub(format!(
                "could not reach the hub for `{repo}@{revision}`: {e}. Offline? Set HF_HUB_OFFLINE=1 to use the local cache; {alternatives}"
            ))
        })?;
        Some(info.siblings.into_iter().map(|s| s.rfilename).collect())
    };
    let get = |f: &str| -> Result<Option<PathBuf>> {
        if let Some(p) = cache.repo(hub_repo.clone()).get(f) {
            return Ok(Some(p));
        }
        match &listing {
            None => Ok(None),
            Some(files) if !files.iter().any(|x| x == f) => Ok(None),
            Some(_) => api_repo(&hub_repo)?.get(f).map(Some).map_err(|e| {
                ModelError::Hub(format!("could not fetch `{f}` of `{repo}@{revision}`: {e}"))
            }),
        }
    };

    let missing = |what: &str| {
        ModelError::Hub(format!(
            "`{repo}@{revision}` has no `{what}`{} ; {alternatives}",
            if offline {
                " in the local cache (HF_HUB_OFFLINE is set)"
            } else {
                ""
            }
        ))
    };
    let config = get("config.json")?.ok_or_else(|| missing("config.json"))?;
    get("tokenizer.json")?.ok_or_else(|| missing("tokenizer.json"))?;
    if get("model.safetensors")?.is_none() {
        let index = get("model.safetensors.index.json")?
            .ok_or_else(|| missing("model.safetensors or model.safetensors.index.json"))?;
        for shard in super::hf_dir::shard_files(&index)? {
            get(&shard)?.ok_or_else(|| missing(&shard))?;
        }
    }
    let _ = get("generation_config.json");
    config
        .parent()
        .map(Path::to_path_buf)
        .ok_or_else(|| missing("a snapshot directory"))
}

fn api_repo(repo: &hf_hub::Repo) -> Result<hf_hub::api::sync::ApiRepo> {
    let mut builder = hf_hub::api::sync::ApiBuilder::from_env().with_progress(false);
    if let Ok(token) = std::env::var("HF_TOKEN") {
        if !token.is_empty() {
            builder = builder.with_token(Some(token));
        }
    }
    let api = builder
        .build()
        .map_err(|e| ModelError::Hub(format!("cannot start the hub client: {e}")))?;
    Ok(api.repo(repo.clone()))
}
