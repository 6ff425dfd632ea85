//! Training data: a UTF-8 text file, a folder of `.txt` files, or JSONL with a `text` field;
//! tokenized once, documents joined with an end-of-text token, split deterministically into
//! train / held-out, and cut into `seq_len + 1` windows (inputs and shifted targets).

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::TrainError;
use crate::model::TextTokenizer;

/// Tokenized, split and windowed data.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub train: Vec<Vec<u32>>,
    pub eval: Vec<Vec<u32>>,
    pub documents: usize,
    pub total_tokens: usize,
    pub sha256: String,
    pub files: Vec<PathBuf>,
}

fn bad(msg: impl Into<String>) -> TrainError {
    TrainError::Data(msg.into())
}

/// The files a data path stands for: itself, or a folder's `.txt` and `.jsonl` files (not
/// its subfolders), sorted so that the order never depends on the file system; empty files
/// left out.
pub fn document_files(path: &Path) -> Result<Vec<PathBuf>, TrainError> {
    if !path.exists() {
        return Err(bad(format!("{} does not exist", path.display())));
    }
    let mut files = if path.is_dir() {
        let mut v: Vec<PathBuf> = std::fs::read_dir(path)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file() && p.extension().is_some_and(|e| e == "txt" || e == "jsonl"))
            .collect();
        v.sort();
        v
    } else {
        vec![path.to_path_buf()]
    };
    files.retain(|f| f.metadata().map(|m| m.len() > 0).unwrap_or(false));
    if files.is_empty() {
        return Err(bad(format!(
            "{} holds no non-empty .txt or .jsonl files",
            path.display()
        )));
    }
    Ok(files)
}

/// Reads the documents under `path` (the files of [`document_files`], in its order).
pub fn read_documents(path: &Path) -> Result<(Vec<String>, Vec<PathBuf>, String), TrainError> {
    let files = document_files(path)?;
    let mut hasher = Sha256::new();
    let mut docs = Vec::new();
    for file in &files {
        let bytes = std::fs::read(file)?;
        hasher.update(&bytes);
        let jsonl = file.extension().is_some_and(|e| e == "jsonl");
        docs.extend(documents(&bytes, jsonl, &file.display().to_string()).map_err(bad)?);
    }
    if docs.is_empty() {
        return Err(bad(format!("{} contains no text", path.display())));
    }
    Ok((docs, files, format!("{:x}", hasher.finalize())))
}

/// Whether the file at `path` holds at least one document, checked as [`documents`] checks
/// bytes (NUL, UTF-8, JSONL lines with a string `text`) but read a piece at a time: memory is
/// bounded by a read buffer (text) or the longest line (JSONL), not the file's size.
pub fn file_has_documents(path: &Path, jsonl: bool, name: &str) -> Result<bool, String> {
    use std::io::{BufRead, Read};
    let file = std::fs::File::open(path).map_err(|e| format!("{name}: {e}"))?;
    let mut reader = std::io::BufReader::with_capacity(1 << 20, file);
    let mut any = false;
    if jsonl {
        let mut line = Vec::new();
        let mut number = 0;
        loop {
            line.clear();
            let n = reader
                .read_until(b'\n', &mut line)
                .map_err(|e| format!("{name}: {e}"))?;
            if n == 0 {
                return Ok(any);
            }
            number += 1;
            if line.contains(&0) {
                return Err(format!("{name} looks binary (it contains NUL bytes)"));
            }
            let text = std::str::from_utf8(&line)
                .map_err(|e| format!("{name} is not UTF-8 text (line {number}: {e})"))?;
            // One line through the same rule as a whole file (its number kept).
            let docs = documents(text.as_bytes(), true, name)
                .map_err(|e| e.replace(" line 1:", &format!(" line {number}:")))?;
            any |= !docs.is_empty();
        }
    }
    // Text: NUL bytes, UTF-8 across chunk boundaries (up to 3 bytes of a character carried
    // over), and whether any character is not whitespace.
    let mut buf = vec![0u8; 1 << 20];
    let mut carry = 0usize;
    let mut offset: u64 = 0;
    loop {
        let n = reader
            .read(&mut buf[carry..])
            .map_err(|e| format!("{name}: {e}"))?;
        let end = carry + n;
        if n == 0 {
            if carry > 0 {
                return Err(format!(
                    "{name} is not UTF-8 text (it ends inside a character at byte {offset})"
                ));
            }
            return Ok(any);
        }
        let chunk = &buf[..end];
        if chunk.contains(&0) {
            return Err(format!("{name} looks binary (it contains NUL bytes)"));
        }
        let valid = match std::str::from_utf8(chunk) {
            Ok(s) => s,
            Err(e) if e.error_len().is_none() => {
                // A character cut by the chunk's end: finish it with the next read.
                std::str::from_utf8(&chunk[..e.valid_up_to()]).unwrap_or_default()
            }
            Err(e) => {
                return Err(format!(
                    "{name} is not UTF-8 text (invalid UTF-8 at byte {})",
                    offset + e.valid_up_to() as u64
                ))
            }
        };
        any |= valid.chars().any(|c| !c.is_whitespace());
        let used = valid.len();
        offset += used as u64;
        buf.copy_within(used..end, 0);
        carry = end - used;
    }
}

/// The documents in one file's bytes: the whole text, or (JSONL) each line's `text` field;
/// blank ones are left out. Refuses binary (NUL), non-UTF-8 and malformed JSONL, naming
/// `name` in the message. Also what checks an upload before it is stored.
pub fn documents(bytes: &[u8], jsonl: bool, name: &str) -> Result<Vec<String>, String> {
    if bytes.contains(&0) {
        return Err(format!("{name} looks binary (it contains NUL bytes)"));
    }
    let text = std::str::from_utf8(bytes).map_err(|e| format!("{name} is not UTF-8 text ({e})"))?;
    if !jsonl {
        return Ok(if text.trim().is_empty() {
            Vec::new()
        } else {
            vec![text.to_string()]
        });
    }
    let mut docs = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| format!("{name} line {}: not JSON ({e})", i + 1))?;
        let t = v
            .get("text")
            .and_then(|t| t.as_str())
            .ok_or_else(|| format!("{name} line {}: no string field `text`", i + 1))?;
        if !t.trim().is_empty() {
            docs.push(t.to_string());
        }
    }
    Ok(docs)
}

/// Tokenizes and windows the documents.
pub fn build(
    path: &Path,
    tokenizer: &TextTokenizer,
    separator: u32,
    seq_len: usize,
    eval_fraction: f64,
) -> Result<Dataset, TrainError> {
    let (docs, files, sha256) = read_documents(path)?;
    let mut stream: Vec<u32> = Vec::new();
    for d in &docs {
        stream.extend(tokenizer.encode(d).map_err(|e| bad(e.to_string()))?);
        stream.push(separator);
    }
    let window = seq_len + 1;
    let n_windows = stream.len() / window;
    let n_eval = if eval_fraction > 0.0 {
        ((n_windows as f64 * eval_fraction).ceil() as usize).max(1)
    } else {
        0
    };
    if n_windows < n_eval + 1 {
        return Err(bad(format!(
            "too little data: {} tokens make {n_windows} windows of {window} tokens, but at least {} are needed \
             (1 to train{}); add text, or use shorter windows (a job's `seq_len`, `--seq-len` on the command line)",
            stream.len(),
            n_eval + 1,
            if n_eval > 0 { format!(", {n_eval} held out") } else { String::new() },
        )));
    }
    let windows: Vec<Vec<u32>> = stream.chunks_exact(window).map(|c| c.to_vec()).collect();
    // Held-out windows are spread evenly through the corpus (every k-th window), so the
    // evaluation sees every part of it; the choice depends only on the counts.
    let mut train = Vec::new();
    let mut eval = Vec::new();
    let stride = if n_eval > 0 {
        n_windows as f64 / n_eval as f64
    } else {
        0.0
    };
    let mut next_eval = stride / 2.0;
    for (i, w) in windows.into_iter().enumerate() {
        if n_eval > 0 && eval.len() < n_eval && i as f64 >= next_eval.floor() {
            eval.push(w);
            next_eval += stride;
        } else {
            train.push(w);
        }
    }
    Ok(Dataset {
        train,
        eval,
        documents: docs.len(),
        total_tokens: stream.len(),
        sha256,
        files,
    })
}
