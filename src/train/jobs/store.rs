//! The service's persistent state in SQLite (`--state-dir`/state.db, compiled in: nothing to
//! install): training jobs, their loss history, uploaded training data and the models that
//! jobs produced. One connection behind a mutex, used by the HTTP handlers and the job runner
//! alike: every statement is short, so a handler waits at most for one statement. WAL with
//! `synchronous = NORMAL`: a crash loses at most the last steps' progress, never the file.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};

use super::status::JobStatus;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state database {path}: {source}")]
    Sqlite {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("state directory {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "state directory {path} is in use by another tokenscope server ({holder}); stop it or \
         give this one its own --state-dir"
    )]
    Locked { path: PathBuf, holder: String },
}

/// A job row (its settings are kept as JSON: they are read back whole, never queried).
#[derive(Debug, Clone, PartialEq)]
pub struct JobRow {
    pub id: String,
    pub spec: String,
    pub status: JobStatus,
    pub step: u64,
    pub total_steps: u64,
    /// Training windows, once the run has tokenized its data (epochs follow from it).
    pub train_windows: Option<u64>,
    pub train_loss: Option<f64>,
    pub eval_loss: Option<f64>,
    pub tokens_per_s: Option<f64>,
    pub created_at: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub error: Option<String>,
    /// Who created it: a digest of their API key (`None` on a server without keys).
    pub owner: Option<String>,
}

/// An evaluation's row: its view is kept as JSON (read back whole, never queried).
#[derive(Debug, Clone, PartialEq)]
pub struct EvaluationRow {
    pub id: String,
    pub model_id: String,
    pub view: String,
    pub created_at: String,
    /// Who ran it: a digest of their API key (`None` on a server without keys).
    pub owner: Option<String>,
}

/// One point of a job's loss curve.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct HistoryPoint {
    pub step: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub train_loss: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_loss: Option<f64>,
}

/// An uploaded training file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct UploadRow {
    pub id: String,
    /// `text` or `jsonl`.
    pub format: String,
    pub bytes: u64,
    pub sha256: String,
    pub created_at: String,
    /// Who uploaded it (a key digest; never shown).
    #[serde(skip)]
    pub owner: Option<String>,
}

pub struct Store {
    conn: Mutex<Connection>,
    path: PathBuf,
    /// Generation requests answered, counted in memory (a request must not wait for a
    /// database write) and written by [`Store::flush_counters`].
    generations: AtomicU64,
    generations_written: AtomicU64,
    /// The directory's lock file, held (exclusively) while this store lives.
    _lock: std::fs::File,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    spec TEXT NOT NULL,
    status TEXT NOT NULL,
    step INTEGER NOT NULL DEFAULT 0,
    total_steps INTEGER NOT NULL DEFAULT 0,
    train_loss REAL,
    eval_loss REAL,
    tokens_per_s REAL,
    created_at TEXT NOT NULL,
    started_at TEXT,
    finished_at TEXT,
    error TEXT
);
CREATE TABLE IF NOT EXISTS history (
    job_id TEXT NOT NULL,
    step INTEGER NOT NULL,
    train_loss REAL,
    eval_loss REAL,
    PRIMARY KEY (job_id, step)
);
CREATE TABLE IF NOT EXISTS uploads (
    id TEXT PRIMARY KEY,
    format TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS models (
    id TEXT PRIMARY KEY,
    path TEXT NOT NULL,
    job_id TEXT,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS evaluations (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    model_id TEXT NOT NULL,
    view TEXT NOT NULL,
    created_at TEXT NOT NULL,
    owner TEXT
);
CREATE TABLE IF NOT EXISTS counters (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
";

/// The counter of generation requests answered (GET /statistics' `total_generations`).
const GENERATIONS: &str = "generations";

impl Store {
    /// Opens (creating) `dir/state.db`.
    /// Opens (creating) the state in `dir`, which it locks for as long as the store lives: a
    /// second server on the same directory is refused ([`StoreError::Locked`]) instead of
    /// writing the same database and checkpoints.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let lock = lock_dir(dir)?;
        let path = dir.join("state.db");
        let fail = |source| StoreError::Sqlite {
            path: path.clone(),
            source,
        };
        let conn = Connection::open(&path).map_err(fail)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(fail)?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(fail)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(fail)?;
        conn.execute_batch(SCHEMA).map_err(fail)?;
        // State directories made before jobs had owners: their jobs and uploads have none
        // (visible to admin keys only, once keys are configured).
        // and before jobs counted their windows: theirs are unknown (no epochs shown).
        for (table, column, kind) in [
            ("jobs", "owner", "TEXT"),
            ("uploads", "owner", "TEXT"),
            ("jobs", "train_windows", "INTEGER"),
        ] {
            let has: bool = conn
                .query_row(
                    &format!(
                        "SELECT COUNT(*) FROM pragma_table_info('{table}') WHERE name = '{column}'"
                    ),
                    [],
                    |r| r.get::<_, i64>(0),
                )
                .map_err(fail)?
                > 0;
            if !has {
                conn.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {kind}"))
                    .map_err(fail)?;
            }
        }
        let generations: u64 = conn
            .query_row(
                "SELECT value FROM counters WHERE name = ?1",
                [GENERATIONS],
                |r| r.get(0),
            )
            .optional()
            .map_err(fail)?
            .unwrap_or(0);
        Ok(Self {
            conn: Mutex::new(conn),
            path,
            generations: AtomicU64::new(generations),
            generations_written: AtomicU64::new(generations),
            _lock: lock,
        })
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn err(&self, source: rusqlite::Error) -> StoreError {
        StoreError::Sqlite {
            path: self.path.clone(),
            source,
        }
    }

    /// One statement; the number of rows it changed.
    fn execute(&self, sql: &str, params: impl rusqlite::Params) -> Result<usize, StoreError> {
        self.conn().execute(sql, params).map_err(|e| self.err(e))
    }

    pub fn insert_job(&self, job: &JobRow) -> Result<(), StoreError> {
        self.execute(
            "INSERT INTO jobs (id, spec, status, step, total_steps, created_at, owner) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                job.id,
                job.spec,
                job.status.as_str(),
                job.step,
                job.total_steps,
                job.created_at,
                job.owner
            ],
        )
        .map(|_| ())
    }

    /// Writes every field that changes as a job runs.
    pub fn update_job(&self, job: &JobRow) -> Result<(), StoreError> {
        self.execute(
            "UPDATE jobs SET status = ?2, step = ?3, total_steps = ?4, train_loss = ?5, \
                 eval_loss = ?6, tokens_per_s = ?7, started_at = ?8, finished_at = ?9, error = ?10, \
                 train_windows = ?11 WHERE id = ?1",
            params![
                job.id,
                job.status.as_str(),
                job.step,
                job.total_steps,
                job.train_loss,
                job.eval_loss,
                job.tokens_per_s,
                job.started_at,
                job.finished_at,
                job.error,
                job.train_windows
            ],
        )
        .map(|_| ())
    }

    const JOB_COLUMNS: &'static str = "id, spec, status, step, total_steps, train_loss, \
        eval_loss, tokens_per_s, created_at, started_at, finished_at, error, owner, train_windows";

    fn job_of(row: &rusqlite::Row<'_>) -> rusqlite::Result<JobRow> {
        Ok(JobRow {
            id: row.get(0)?,
            spec: row.get(1)?,
            status: {
                let text: String = row.get(2)?;
                text.parse().map_err(|e: String| {
                    rusqlite::Error::FromSqlConversionFailure(
                        2,
                        rusqlite::types::Type::Text,
                        e.into(),
                    )
                })?
            },
            step: row.get(3)?,
            total_steps: row.get(4)?,
            train_loss: row.get(5)?,
            eval_loss: row.get(6)?,
            tokens_per_s: row.get(7)?,
            created_at: row.get(8)?,
            started_at: row.get(9)?,
            finished_at: row.get(10)?,
            error: row.get(11)?,
            owner: row.get(12)?,
            train_windows: row.get(13)?,
        })
    }

    /// Every job, oldest first.
    pub fn jobs(&self) -> Result<Vec<JobRow>, StoreError> {
        let conn = self.conn();
        let sql = format!("SELECT {} FROM jobs ORDER BY seq", Self::JOB_COLUMNS);
        let mut stmt = conn.prepare(&sql).map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([], Self::job_of)
            .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())
            .map_err(|e| self.err(e));
        rows
    }

    pub fn job(&self, id: &str) -> Result<Option<JobRow>, StoreError> {
        let sql = format!("SELECT {} FROM jobs WHERE id = ?1", Self::JOB_COLUMNS);
        self.conn()
            .query_row(&sql, [id], Self::job_of)
            .optional()
            .map_err(|e| self.err(e))
    }

    /// The oldest job with status `queued`.
    pub fn next_queued(&self) -> Result<Option<JobRow>, StoreError> {
        let sql = format!(
            "SELECT {} FROM jobs WHERE status = 'queued' ORDER BY seq LIMIT 1",
            Self::JOB_COLUMNS
        );
        self.conn()
            .query_row(&sql, [], Self::job_of)
            .optional()
            .map_err(|e| self.err(e))
    }

    /// Jobs that were running when the process stopped become `interrupted`. Returns how many.
    pub fn mark_interrupted(&self) -> Result<usize, StoreError> {
        self.execute(
                "UPDATE jobs SET status = 'interrupted', \
                 error = 'the server stopped while this job ran; resume it to continue from its last checkpoint' \
                 WHERE status = 'running'",
                [],
        )
    }

    /// Sets a training loss (and keeps an evaluation loss recorded at the same step).
    pub fn record_train_loss(&self, id: &str, step: u64, loss: f64) -> Result<(), StoreError> {
        self.execute(
            "INSERT INTO history (job_id, step, train_loss) VALUES (?1, ?2, ?3) \
                 ON CONFLICT (job_id, step) DO UPDATE SET train_loss = excluded.train_loss",
            params![id, step, loss],
        )
        .map(|_| ())
    }

    pub fn record_eval_loss(&self, id: &str, step: u64, loss: f64) -> Result<(), StoreError> {
        self.execute(
            "INSERT INTO history (job_id, step, eval_loss) VALUES (?1, ?2, ?3) \
                 ON CONFLICT (job_id, step) DO UPDATE SET eval_loss = excluded.eval_loss",
            params![id, step, loss],
        )
        .map(|_| ())
    }

    /// Forgets the history from `step` on (a resumed job recomputes those steps).
    pub fn truncate_history(&self, id: &str, step: u64) -> Result<(), StoreError> {
        self.execute(
            "DELETE FROM history WHERE job_id = ?1 AND step >= ?2",
            params![id, step],
        )
        .map(|_| ())
    }

    pub fn history(&self, id: &str) -> Result<Vec<HistoryPoint>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(
                "SELECT step, train_loss, eval_loss FROM history WHERE job_id = ?1 ORDER BY step",
            )
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([id], |r| {
                Ok(HistoryPoint {
                    step: r.get(0)?,
                    train_loss: r.get(1)?,
                    eval_loss: r.get(2)?,
                })
            })
            .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())
            .map_err(|e| self.err(e));
        rows
    }

    pub fn insert_upload(&self, u: &UploadRow) -> Result<(), StoreError> {
        self.execute(
                "INSERT INTO uploads (id, format, bytes, sha256, created_at, owner) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![u.id, u.format, u.bytes, u.sha256, u.created_at, u.owner],
        ).map(|_| ())
    }

    pub fn upload(&self, id: &str) -> Result<Option<UploadRow>, StoreError> {
        self.conn()
            .query_row(
                "SELECT id, format, bytes, sha256, created_at, owner FROM uploads WHERE id = ?1",
                [id],
                |r| {
                    Ok(UploadRow {
                        id: r.get(0)?,
                        format: r.get(1)?,
                        bytes: r.get(2)?,
                        sha256: r.get(3)?,
                        created_at: r.get(4)?,
                        owner: r.get(5)?,
                    })
                },
            )
            .optional()
            .map_err(|e| self.err(e))
    }

    pub fn delete_upload(&self, id: &str) -> Result<(), StoreError> {
        self.execute("DELETE FROM uploads WHERE id = ?1", [id])
            .map(|_| ())
    }

    /// Forgets a job and its history.
    pub fn delete_job(&self, id: &str) -> Result<(), StoreError> {
        self.execute("DELETE FROM history WHERE job_id = ?1", [id])?;
        self.execute("DELETE FROM jobs WHERE id = ?1", [id])
            .map(|_| ())
    }

    /// Forgets a trained model.
    pub fn delete_model(&self, id: &str) -> Result<bool, StoreError> {
        self.execute("DELETE FROM models WHERE id = ?1", [id])
            .map(|n| n > 0)
    }

    pub fn insert_model(
        &self,
        id: &str,
        path: &Path,
        job_id: &str,
        created_at: &str,
    ) -> Result<(), StoreError> {
        self.execute(
            "INSERT OR REPLACE INTO models (id, path, job_id, created_at) VALUES (?1, ?2, ?3, ?4)",
            params![id, path.to_string_lossy(), job_id, created_at],
        )
        .map(|_| ())
    }

    /// Counts one generation request answered.
    pub fn count_generation(&self) {
        self.generations.fetch_add(1, Ordering::Relaxed);
    }

    /// Generation requests answered since the state directory was made.
    pub fn generations(&self) -> u64 {
        self.generations.load(Ordering::Relaxed)
    }

    /// Writes the counters if they changed since the last write.
    pub fn flush_counters(&self) -> Result<(), StoreError> {
        let now = self.generations();
        if self.generations_written.swap(now, Ordering::Relaxed) != now {
            self.execute(
                "INSERT INTO counters (name, value) VALUES (?1, ?2) \
                 ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                params![GENERATIONS, now],
            )?;
        }
        Ok(())
    }

    pub fn insert_evaluation(&self, e: &EvaluationRow) -> Result<(), StoreError> {
        self.execute(
            "INSERT INTO evaluations (id, model_id, view, created_at, owner) \
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![e.id, e.model_id, e.view, e.created_at, e.owner],
        )
        .map(|_| ())
    }

    fn evaluation_of(r: &rusqlite::Row<'_>) -> rusqlite::Result<EvaluationRow> {
        Ok(EvaluationRow {
            id: r.get(0)?,
            model_id: r.get(1)?,
            view: r.get(2)?,
            created_at: r.get(3)?,
            owner: r.get(4)?,
        })
    }

    /// Every evaluation, oldest first.
    pub fn evaluations(&self) -> Result<Vec<EvaluationRow>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare("SELECT id, model_id, view, created_at, owner FROM evaluations ORDER BY seq")
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([], Self::evaluation_of)
            .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())
            .map_err(|e| self.err(e));
        rows
    }

    pub fn evaluation(&self, id: &str) -> Result<Option<EvaluationRow>, StoreError> {
        self.conn()
            .query_row(
                "SELECT id, model_id, view, created_at, owner FROM evaluations WHERE id = ?1",
                [id],
                Self::evaluation_of,
            )
            .optional()
            .map_err(|e| self.err(e))
    }

    /// Trained models (id, directory), oldest first.
    pub fn models(&self) -> Result<Vec<(String, PathBuf)>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare("SELECT id, path FROM models ORDER BY created_at, id")
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    PathBuf::from(r.get::<_, String>(1)?),
                ))
            })
            .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())
            .map_err(|e| self.err(e));
        rows
    }
}

/// Takes the exclusive lock on `<dir>/lock` (an OS file lock: released by the kernel when the
/// process ends, however it ends) and writes this process's id into it, so that the message
/// a second server gets names the first.
fn lock_dir(dir: &Path) -> Result<std::fs::File, StoreError> {
    use std::io::{Read, Seek, Write};
    let path = dir.join("lock");
    let io = |source| StoreError::Io {
        path: path.clone(),
        source,
    };
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io)?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut pid = String::new();
            let _ = file.read_to_string(&mut pid);
            let pid = pid.trim();
            return Err(StoreError::Locked {
                path: dir.to_path_buf(),
                holder: if pid.is_empty() {
                    "its pid unknown".into()
                } else {
                    format!("pid {pid}")
                },
            });
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(io(e)),
    }
    file.set_len(0).map_err(io)?;
    file.rewind().map_err(io)?;
    write!(file, "{}", std::process::id()).map_err(io)?;
    file.flush().map_err(io)?;
    Ok(file)
}
