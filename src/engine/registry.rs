//! The models a server offers: those named with `--model`, those found in `--models-dir`, and
//! those training jobs produced. Each has a stable id; a loaded one has its own worker (thread,
//! queue, prefix cache). Loading is bounded by `--max-loaded-models` and `--max-memory`: the
//! least recently used idle model is unloaded to make room, and a load that still does not fit
//! is refused.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::worker::{self, ModelState, WorkerHandle, WorkerLimits};
use crate::model::probe::{probe, ModelCard};
use crate::model::{LoadOptions, ModelSource};

/// How models are loaded and how many may be.
#[derive(Debug, Clone)]
pub struct RegistrySettings {
    pub load: LoadOptions,
    pub limits: WorkerLimits,
    pub queue: usize,
    /// Models loaded (or loading) at once.
    pub max_loaded: usize,
    /// Resident memory the loaded models may take together (MiB).
    pub max_memory_mb: Option<u64>,
    /// Load an unloaded model when a request names it (instead of 409 MODEL_NOT_LOADED).
    pub autoload: bool,
    /// Every `.gguf` file and Hugging Face directory in it is offered.
    pub models_dir: Option<PathBuf>,
}

impl Default for RegistrySettings {
    fn default() -> Self {
        Self {
            load: LoadOptions::default(),
            limits: WorkerLimits::default(),
            queue: 64,
            max_loaded: 1,
            max_memory_mb: None,
            autoload: false,
            models_dir: None,
        }
    }
}

/// Where a model entry came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Origin {
    /// `--model`.
    Configured,
    /// Found in `--models-dir`.
    ModelsDir,
    /// Written by a training job.
    Trained,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum LoadStatus {
    Loaded,
    Loading,
    Unloaded,
    Failed,
}

/// One model as `GET /models` lists it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ModelView {
    /// Stable, URL-safe name (from the file or directory name); what `model` fields take.
    #[schema(example = "SmolLM2-135M-Instruct.Q4_1")]
    pub id: String,
    /// The file, directory or hub id it loads from.
    pub source: String,
    /// Family (`llama`, `qwen2`, `gemma3`, …) when the source could be read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub architecture: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parameters: Option<u64>,
    /// Storage type of most weights (`Q4_1`, `Q8_0`, `F32`, `BF16`, …).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quantization: Option<String>,
    /// What kind of source it is: `gguf`, `huggingface` (a directory), `nanogpt` (a
    /// `ckpt.pt`), `nanochat` (one step of a checkpoint folder), `peft-lora` or `hub`.
    pub format: String,
    /// The training step a checkpoint was saved at (nanoGPT's `iter_num`, nanochat's step).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub step: Option<u64>,
    /// The checkpoint's best validation loss, as its training run recorded it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub val_loss: Option<f64>,
    /// The checkpoint's validation bits per byte (nanochat records these, not a loss).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub val_bpb: Option<f64>,
    pub status: LoadStatus,
    /// Memory its weights take in MiB (0 when not loaded): counted from its tensors and packed
    /// blocks, the same after every reload.
    pub memory_mb: f64,
    /// Size of the weight files: the memory guard's estimate before a load.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file_mb: Option<f64>,
    /// When the current load finished (RFC 3339).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loaded_at: Option<String>,
    /// Its tokenizer's digest, once loaded: models with the same digest tokenize every text
    /// the same way (what POST /compare requires).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokenizer: Option<String>,
    /// Why the last load failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The model requests without `model` use.
    pub default: bool,
    pub origin: Origin,
    /// A LoRA adapter's base, as a model id of this server (absent when the base is not one
    /// of its models, or the model is no adapter).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub base: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("model `{0}` not found")]
    NotFound(String),
    #[error("{max} model(s) are loaded already (--max-loaded-models) and none can be unloaded to make room: each is busy")]
    TooManyLoaded { max: usize },
    #[error("loading `{id}` needs about {need_mb:.0} MiB but only {free_mb:.0} MiB of --max-memory {max_mb} MiB is free (loaded models that are busy are not unloaded)")]
    MemoryLimit {
        id: String,
        need_mb: f64,
        free_mb: f64,
        max_mb: u64,
    },
    #[error("model `{0}` has no source to load it from")]
    NoSource(String),
    #[error("model `{id}` cannot be loaded: {reason}")]
    Unreadable { id: String, reason: String },
    #[error("a model with id `{0}` exists already")]
    Exists(String),
}

struct Entry {
    id: String,
    source: Option<ModelSource>,
    card: ModelCard,
    origin: Origin,
    worker: Option<WorkerHandle>,
    last_used: Instant,
}

impl Entry {
    fn new(
        id: String,
        source: Option<ModelSource>,
        card: ModelCard,
        origin: Origin,
        worker: Option<WorkerHandle>,
    ) -> Self {
        Self {
            id,
            source,
            card,
            origin,
            worker,
            last_used: Instant::now(),
        }
    }

    fn state(&self) -> ModelState {
        self.worker
            .as_ref()
            .map_or(ModelState::Unloaded, |w| w.state())
    }

    /// Holds (or will hold) memory: loading, loaded or restarting.
    fn occupies(&self) -> bool {
        matches!(
            self.state(),
            ModelState::Loading | ModelState::Ready(_) | ModelState::Restarting(_)
        )
    }

    fn memory_mb(&self) -> f64 {
        match self.state() {
            ModelState::Ready(info) => info.memory_mb,
            _ => 0.0,
        }
    }

    /// What the guard counts for it: its weights' memory once loaded, else the size on disk.
    fn charged_mb(&self) -> f64 {
        match self.state() {
            ModelState::Ready(info) => info.memory_mb,
            _ => self.file_mb().unwrap_or(0.0),
        }
    }

    fn file_mb(&self) -> Option<f64> {
        self.card.file_bytes.map(|b| b as f64 / (1024.0 * 1024.0))
    }

    /// Loaded and serving no request: the only kind of model that may be unloaded to make
    /// room (a request holds the model's handle from choosing it until its answer is sent,
    /// and each job counts until the model thread is done with it).
    fn idle(&self) -> bool {
        match (&self.worker, self.state()) {
            (Some(w), ModelState::Ready(_)) => !w.in_use_elsewhere(),
            _ => false,
        }
    }

    fn view(&self, default: bool) -> ModelView {
        let state = self.state();
        let (loaded_at, tokenizer) = match &state {
            ModelState::Ready(info) => (
                Some(info.loaded_at.clone()),
                Some(info.tokenizer.digest().to_string()),
            ),
            _ => (None, None),
        };
        let (status, error) = match state {
            ModelState::Ready(_) | ModelState::Restarting(_) => (LoadStatus::Loaded, None),
            ModelState::Loading => (LoadStatus::Loading, None),
            // A file that cannot even be read is failed before anyone tries to load it.
            ModelState::Unloaded => match &self.card.error {
                Some(reason) => (LoadStatus::Failed, Some(reason.clone())),
                None => (LoadStatus::Unloaded, None),
            },
            ModelState::Failed(reason) => (LoadStatus::Failed, Some(reason)),
        };
        let round = |x: f64| (x * 10.0).round() / 10.0;
        ModelView {
            id: self.id.clone(),
            source: self.source.as_ref().map_or_else(String::new, source_label),
            architecture: self.card.architecture.clone(),
            parameters: self.card.parameters,
            quantization: self.card.quantization.clone(),
            format: self
                .source
                .as_ref()
                .map_or("unknown", |s| s.format())
                .to_string(),
            step: self.card.training.as_ref().and_then(|t| t.step),
            val_loss: self.card.training.as_ref().and_then(|t| t.val_loss),
            val_bpb: self.card.training.as_ref().and_then(|t| t.val_bpb),
            status,
            memory_mb: round(self.memory_mb()),
            file_mb: self.file_mb().map(round),
            loaded_at,
            tokenizer,
            error,
            default,
            origin: self.origin,
            base: None,
        }
    }
}

fn source_label(s: &ModelSource) -> String {
    match s {
        ModelSource::Gguf(p)
        | ModelSource::HfDir(p)
        | ModelSource::NanoGpt(p)
        | ModelSource::Adapter { dir: p, .. } => p.display().to_string(),
        ModelSource::Nanochat { dir, step } => dir
            .join(format!("model_{step:06}.pt"))
            .display()
            .to_string(),
        ModelSource::Hub { .. } => s.display_name(),
    }
}

/// A URL-safe id from a file or directory name: `.gguf` dropped, anything but letters, digits,
/// `.`, `_` and `-` turned into `-`.
pub fn id_from_name(name: &str) -> String {
    let stem = name
        .strip_suffix(".gguf")
        .or_else(|| name.strip_suffix(".pt"))
        .unwrap_or(name);
    let id: String = stem
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '-'
            }
        })
        .collect();
    let id = id.trim_matches(|c| c == '-' || c == '.').to_string();
    if id.is_empty() {
        "model".into()
    } else {
        id
    }
}

/// True when `s` is a valid id: 1 to 128 letters, digits, `.`, `_` and `-`, neither starting
/// nor ending with `.` or `-` (what [`id_from_name`] makes).
pub fn is_valid_id(s: &str) -> bool {
    let edge_ok = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
    s.len() <= 128
        && edge_ok(s.chars().next())
        && edge_ok(s.chars().last())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
}

pub struct ModelRegistry {
    entries: Mutex<Vec<Entry>>,
    settings: RegistrySettings,
}

impl ModelRegistry {
    pub fn new(settings: RegistrySettings) -> Self {
        Self {
            entries: Mutex::new(Vec::new()),
            settings: RegistrySettings {
                max_loaded: settings.max_loaded.max(1),
                ..settings
            },
        }
    }

    /// A registry holding one model that is already running (the router tests, benches).
    pub fn single(id: &str, worker: WorkerHandle) -> Self {
        let registry = Self::new(RegistrySettings::default());
        registry.lock().push(Entry::new(
            id_from_name(id),
            None,
            ModelCard::default(),
            Origin::Configured,
            Some(worker),
        ));
        registry
    }

    pub fn settings(&self) -> &RegistrySettings {
        &self.settings
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Entry>> {
        // A panic while holding the lock leaves plain data behind; keep serving it.
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Offers `source` under an id derived from its name (made unique with `-2`, `-3`, …). A
    /// source offered already keeps its id.
    pub fn add(&self, source: ModelSource, origin: Origin) -> String {
        let source = self.with_adapter_base(source);
        let name = match &source {
            ModelSource::Hub { repo, .. } => repo.rsplit('/').next().unwrap_or(repo).to_string(),
            _ => source.display_name(),
        };
        let card = probe(&source);
        let mut entries = self.lock();
        if let Some(e) = entries.iter().find(|e| e.source.as_ref() == Some(&source)) {
            return e.id.clone();
        }
        let base = id_from_name(&name);
        let mut id = base.clone();
        let mut n = 2;
        while entries.iter().any(|e| e.id == id) {
            id = format!("{base}-{n}");
            n += 1;
        }
        entries.push(Entry::new(id.clone(), Some(source), card, origin, None));
        id
    }

    /// An adapter whose base is not a path: the base it names, as a model id of this server.
    fn with_adapter_base(&self, source: ModelSource) -> ModelSource {
        let ModelSource::Adapter { dir, base: None } = &source else {
            return source;
        };
        let named = crate::model::lora::read_config(dir)
            .ok()
            .and_then(|c| c.base_model);
        let base = named
            .and_then(|n| self.find(&n))
            .and_then(|id| self.source_of(&id))
            .filter(|b| !matches!(b, ModelSource::Adapter { .. }));
        match base {
            Some(b) => ModelSource::Adapter {
                dir: dir.clone(),
                base: Some(Box::new(b)),
            },
            None => source,
        }
    }

    /// An entry for a `--model` that cannot be resolved: it shows as failed with `reason`.
    pub fn add_unresolvable(&self, name: &str, reason: String) {
        let worker = worker::spawn(
            Err(reason),
            self.settings.load.clone(),
            self.settings.limits,
            1,
        );
        let id = id_from_name(
            Path::new(name)
                .file_name()
                .map_or(name, |n| n.to_str().unwrap_or(name)),
        );
        self.lock().push(Entry::new(
            id,
            None,
            ModelCard::default(),
            Origin::Configured,
            Some(worker),
        ));
    }

    /// Offers `source` under exactly `id` (a trained model: its id is the job's output name).
    pub fn add_named(
        &self,
        id: &str,
        source: ModelSource,
        origin: Origin,
    ) -> Result<(), RegistryError> {
        let card = probe(&source);
        let mut entries = self.lock();
        if let Some(e) = entries.iter_mut().find(|e| e.id == id) {
            if e.source.as_ref() == Some(&source) {
                e.card = card;
                return Ok(());
            }
            return Err(RegistryError::Exists(id.into()));
        }
        entries.push(Entry::new(id.into(), Some(source), card, origin, None));
        Ok(())
    }

    /// Adds what `--models-dir` holds now that is not offered yet (called on every listing, so
    /// a file copied in appears without a restart).
    pub fn scan_models_dir(&self) {
        let Some(dir) = &self.settings.models_dir else {
            return;
        };
        // Adapters last: a base in the same folder is offered first, so that an adapter
        // naming it by id finds it.
        let mut sources = models_in(dir);
        sources.sort_by_key(|s| matches!(s, ModelSource::Adapter { .. }));
        for source in sources {
            let same = |known: &ModelSource| match (known, &source) {
                (ModelSource::Adapter { dir: a, .. }, ModelSource::Adapter { dir: b, .. }) => {
                    a == b
                }
                _ => known == &source,
            };
            let known = self
                .lock()
                .iter()
                .any(|e| e.source.as_ref().is_some_and(same));
            if !known {
                self.add(source, Origin::ModelsDir);
            }
        }
    }

    pub fn contains(&self, id: &str) -> bool {
        self.find(id).is_some()
    }

    /// The id `name` refers to: an id, or a model's display name (what earlier versions listed
    /// in /v1/models), or nothing.
    pub fn find(&self, name: &str) -> Option<String> {
        let entries = self.lock();
        entries
            .iter()
            .find(|e| e.id == name)
            .or_else(|| {
                entries
                    .iter()
                    .find(|e| e.source.as_ref().is_some_and(|s| s.display_name() == name))
            })
            .map(|e| e.id.clone())
    }

    /// The model requests without `model` use: the first one offered.
    pub fn default_id(&self) -> Option<String> {
        self.lock().first().map(|e| e.id.clone())
    }

    /// The worker of `id` (an unloaded handle when it is not loaded), marking it used.
    pub fn handle(&self, id: &str) -> WorkerHandle {
        let mut entries = self.lock();
        match entries.iter_mut().find(|e| e.id == id) {
            Some(e) => {
                e.last_used = Instant::now();
                e.worker.clone().unwrap_or_else(WorkerHandle::unloaded)
            }
            None => WorkerHandle::unloaded(),
        }
    }

    /// Whether `id` is loaded and serving a request (so not unloadable to make room).
    pub fn in_use(&self, id: &str) -> bool {
        self.lock()
            .iter()
            .find(|e| e.id == id)
            .and_then(|e| e.worker.as_ref())
            .is_some_and(|w| w.in_use_elsewhere())
    }

    /// The state of `id`'s worker, without marking it used.
    pub fn model_state(&self, id: &str) -> ModelState {
        self.lock()
            .iter()
            .find(|e| e.id == id)
            .map_or(ModelState::Unloaded, |e| e.state())
    }

    /// The default model's worker (an unloaded handle when there is none).
    pub fn default_handle(&self) -> WorkerHandle {
        let entries = self.lock();
        entries
            .first()
            .and_then(|e| e.worker.clone())
            .unwrap_or_else(WorkerHandle::unloaded)
    }

    /// Every loaded model's id and worker, in listing order.
    /// Bytes the weights of the loaded models take (what `memory_mb` counts).
    pub fn loaded_weight_bytes(&self) -> u64 {
        self.loaded()
            .iter()
            .map(|(_, w)| match w.state() {
                ModelState::Ready(info) => (info.memory_mb * 1024.0 * 1024.0) as u64,
                _ => 0,
            })
            .sum()
    }

    pub fn loaded(&self) -> Vec<(String, WorkerHandle)> {
        self.lock()
            .iter()
            .filter_map(|e| e.worker.clone().map(|w| (e.id.clone(), w)))
            .collect()
    }

    pub fn list(&self) -> Vec<ModelView> {
        self.scan_models_dir();
        let entries = self.lock();
        (0..entries.len())
            .map(|i| Self::view_of(&entries, i))
            .collect()
    }

    pub fn view(&self, id: &str) -> Option<ModelView> {
        let entries = self.lock();
        let i = entries.iter().position(|e| e.id == id)?;
        Some(Self::view_of(&entries, i))
    }

    /// Entry `i`'s view, an adapter's base named by its id.
    fn view_of(entries: &[Entry], i: usize) -> ModelView {
        let mut view = entries[i].view(i == 0);
        if let Some(ModelSource::Adapter {
            base: Some(base), ..
        }) = &entries[i].source
        {
            view.base = entries
                .iter()
                .find(|e| e.source.as_ref().is_some_and(|s| s.same_as(base)))
                .map(|e| e.id.clone());
        }
        view
    }

    pub fn source_of(&self, id: &str) -> Option<ModelSource> {
        self.lock()
            .iter()
            .find(|e| e.id == id)
            .and_then(|e| e.source.clone())
    }

    /// Starts loading `id` in the background (unloading idle models, least recently used
    /// first, when the limits ask for room). Returns false when it was loaded or loading
    /// already: a second load of the same id joins the first (decided under the registry's
    /// lock, so concurrent loads start one worker). A model whose last load failed is tried
    /// again.
    pub fn load(&self, id: &str) -> Result<bool, RegistryError> {
        let mut entries = self.lock();
        let index = entries
            .iter()
            .position(|e| e.id == id)
            .ok_or_else(|| RegistryError::NotFound(id.into()))?;
        if entries[index].occupies() {
            entries[index].last_used = Instant::now();
            return Ok(false);
        }
        let source = entries[index]
            .source
            .clone()
            .ok_or_else(|| RegistryError::NoSource(id.into()))?;
        if entries[index].card.error.is_some() {
            // Read again (the file may have been replaced); still unreadable: refused before
            // anything is unloaded to make room for it.
            entries[index].card = probe(&source);
            if let Some(reason) = &entries[index].card.error {
                return Err(RegistryError::Unreadable {
                    id: id.into(),
                    reason: reason.clone(),
                });
            }
        }
        self.make_room(&mut entries, index)?;
        let entry = &mut entries[index];
        let worker = worker::spawn(
            Ok(source),
            self.settings.load.clone(),
            self.settings.limits,
            self.settings.queue,
        );
        entry.worker = Some(worker);
        entry.last_used = Instant::now();
        Ok(true)
    }

    /// Unloads `id` (its thread ends when the requests it is running finish). Returns false
    /// when it was not loaded.
    pub fn unload(&self, id: &str) -> Result<bool, RegistryError> {
        let mut entries = self.lock();
        let entry = entries
            .iter_mut()
            .find(|e| e.id == id)
            .ok_or_else(|| RegistryError::NotFound(id.into()))?;
        let was = entry.worker.take().is_some();
        if was {
            tracing::info!(model = %id, "model unloaded");
        }
        Ok(was)
    }

    /// What was read of `id`'s files without loading it.
    pub fn card_of(&self, id: &str) -> Option<crate::model::probe::ModelCard> {
        let entries = self.lock();
        Some(entries.iter().find(|e| e.id == id)?.card.clone())
    }

    /// The parameter count and sizes of `id`, read from its files without loading it.
    /// The decoder config of `id`, as its files describe it (before loading).
    pub fn config_of(&self, id: &str) -> Option<crate::model::Config> {
        let entries = self.lock();
        entries.iter().find(|e| e.id == id)?.card.config.clone()
    }

    pub fn shape_of(&self, id: &str) -> Option<(u64, crate::model::probe::ModelShape)> {
        let entries = self.lock();
        let card = &entries.iter().find(|e| e.id == id)?.card;
        Some((card.parameters?, card.shape?))
    }

    /// Forgets `id` (unloading it: its thread ends when the requests it is running finish).
    pub fn remove(&self, id: &str) -> Result<(), RegistryError> {
        let mut entries = self.lock();
        let before = entries.len();
        entries.retain(|e| e.id != id);
        if entries.len() == before {
            return Err(RegistryError::NotFound(id.into()));
        }
        tracing::info!(model = %id, "model removed");
        Ok(())
    }

    /// Frees what loading `entries[index]` needs, unloading idle models least recently used
    /// first; refuses (unloading nothing) when even that would not be enough.
    fn make_room(&self, entries: &mut [Entry], index: usize) -> Result<(), RegistryError> {
        let need = entries[index].file_mb().unwrap_or(0.0);
        let mut occupying: Vec<usize> = (0..entries.len())
            .filter(|&i| i != index && entries[i].occupies())
            .collect();
        // Least recently used first, idle ones only: the order they would go in.
        let mut candidates: Vec<usize> = occupying
            .iter()
            .copied()
            .filter(|&i| entries[i].idle())
            .collect();
        candidates.sort_by_key(|&i| entries[i].last_used);
        let used = |set: &[usize]| -> f64 { set.iter().map(|&i| entries[i].charged_mb()).sum() };
        let fits = |set: &[usize]| {
            set.len() < self.settings.max_loaded
                && self
                    .settings
                    .max_memory_mb
                    .is_none_or(|max| used(set) + need <= max as f64)
        };
        let mut victims = Vec::new();
        for v in candidates {
            if fits(&occupying) {
                break;
            }
            occupying.retain(|&i| i != v);
            victims.push(v);
        }
        if !fits(&occupying) {
            if occupying.len() >= self.settings.max_loaded {
                return Err(RegistryError::TooManyLoaded {
                    max: self.settings.max_loaded,
                });
            }
            let max = self.settings.max_memory_mb.unwrap_or(0);
            return Err(RegistryError::MemoryLimit {
                id: entries[index].id.clone(),
                need_mb: need,
                free_mb: (max as f64 - used(&occupying)).max(0.0),
                max_mb: max,
            });
        }
        for v in victims {
            tracing::info!(
                model = %entries[v].id,
                "unloading the least recently used model to make room for {}",
                entries[index].id
            );
            entries[v].worker = None;
        }
        Ok(())
    }
}

/// The `.gguf` files, Hugging Face directories (with a `config.json`), nanoGPT checkpoints
/// (`.pt` files, and folders holding a `ckpt.pt`), each step of nanochat checkpoint folders
/// and PEFT adapters in `dir`, sorted.
pub fn models_in(dir: &Path) -> Vec<ModelSource> {
    let mut found: Vec<ModelSource> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    let ext = |x: &str| p.extension().is_some_and(|e| e == x);
                    (p.is_file() && (ext("gguf") || ext("pt")))
                        || (p.is_dir()
                            && (p.join("config.json").is_file()
                                || p.join("ckpt.pt").is_file()
                                || crate::model::nanochat::is_checkpoint_dir(p)
                                || crate::model::lora::is_adapter_dir(p)))
                })
                .filter_map(|p| ModelSource::from_path(&p))
                // A nanochat folder offers each of its steps.
                .flat_map(|s| match s {
                    ModelSource::Nanochat { dir, .. } => crate::model::nanochat::steps(&dir)
                        .into_iter()
                        .map(|step| ModelSource::Nanochat {
                            dir: dir.clone(),
                            step,
                        })
                        .collect(),
                    other => vec![other],
                })
                .collect()
        })
        .unwrap_or_default();
    found.sort_by_key(source_label);
    found
}

pub fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}
