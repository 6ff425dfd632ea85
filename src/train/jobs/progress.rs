//! A job's progress as the LLM platform reports it: percent done, epochs (passes over the
//! training windows: with `batch_size` windows per step, an epoch ends at the step where
//! step × batch_size reaches a multiple of the window count) and a human-readable log, all
//! derived from the job's row and loss history (nothing more is stored).

use super::store::{HistoryPoint, JobRow};
use super::{JobSpec, JobStatus};

fn round(x: f64, places: i32) -> f64 {
    let f = 10f64.powi(places);
    (x * f).round() / f
}

/// Percent of the steps done, to 0.1 (100 once completed).
pub fn percent(row: &JobRow) -> f64 {
    if row.status == JobStatus::Completed {
        return 100.0;
    }
    if row.total_steps == 0 {
        return 0.0;
    }
    round(
        100.0 * row.step.min(row.total_steps) as f64 / row.total_steps as f64,
        1,
    )
}

/// Epochs the job makes: as asked, or what its steps come to once the windows are known.
pub fn epochs(row: &JobRow, spec: &JobSpec) -> Option<f64> {
    if let Some(e) = spec.epochs {
        return Some(e);
    }
    let windows = row.train_windows.filter(|&w| w > 0)?;
    Some(round(
        (row.total_steps * spec.batch_size) as f64 / windows as f64,
        2,
    ))
}

/// Whole epochs, counting a partial last one.
fn epoch_count(row: &JobRow, spec: &JobSpec) -> Option<u64> {
    epochs(row, spec).map(|e| (e.ceil() as u64).max(1))
}

/// The step at which epoch `k` (1-based) ends.
fn epoch_end(k: u64, windows: u64, batch: u64, total_steps: u64) -> u64 {
    (k * windows).div_ceil(batch).min(total_steps)
}

/// The epoch under way (1-based; the last one once the job completed).
pub fn current_epoch(row: &JobRow, spec: &JobSpec) -> Option<u64> {
    let windows = row.train_windows.filter(|&w| w > 0)?;
    let count = epoch_count(row, spec)?;
    if row.status == JobStatus::Completed {
        return Some(count);
    }
    Some(((row.step * spec.batch_size) / windows + 1).min(count))
}

/// The job's log: start, data, each finished epoch with its mean training loss, each
/// evaluation, and where it stands or how it ended.
pub fn logs(row: &JobRow, spec: &JobSpec, history: &[HistoryPoint]) -> String {
    let mut lines: Vec<(u64, String)> = Vec::new();
    if let Some(at) = &row.started_at {
        lines.push((0, format!("Started at {at}")));
    }
    let windows = row.train_windows.filter(|&w| w > 0);
    let count = epoch_count(row, spec);
    if let (Some(w), Some(e)) = (windows, epochs(row, spec)) {
        lines.push((
            0,
            format!(
                "Data: {w} training windows of {} tokens; {} steps of {} windows ({e} epochs)",
                spec.seq_len + 1,
                row.total_steps,
                spec.batch_size
            ),
        ));
    }
    if let (Some(w), Some(n)) = (windows, count) {
        let mut begin = 0;
        for k in 1..=n {
            let end = epoch_end(k, w, spec.batch_size, row.total_steps);
            if end > row.step || end <= begin {
                break;
            }
            let losses: Vec<f64> = history
                .iter()
                .filter(|p| p.step > begin && p.step <= end)
                .filter_map(|p| p.train_loss)
                .collect();
            let line = if losses.is_empty() {
                format!("Epoch {k}/{n} completed")
            } else {
                let mean = losses.iter().sum::<f64>() / losses.len() as f64;
                format!("Epoch {k}/{n} completed with loss {mean:.4}")
            };
            lines.push((end, line));
            begin = end;
        }
    }
    for p in history {
        if let Some(l) = p.eval_loss {
            lines.push((
                p.step,
                format!(
                    "Step {}: eval loss {l:.4} (perplexity {:.2})",
                    p.step,
                    l.exp()
                ),
            ));
        }
    }
    // Stable: at one step, an epoch's line comes before that step's evaluation.
    lines.sort_by_key(|(step, _)| *step);
    let mut out: Vec<String> = lines.into_iter().map(|(_, l)| l).collect();
    let loss = row
        .train_loss
        .filter(|l| l.is_finite())
        .map(|l| format!(", loss {l:.4}"))
        .unwrap_or_default();
    let epoch = current_epoch(row, spec)
        .zip(count)
        .map(|(c, n)| format!("Epoch {c}/{n} in progress, "))
        .unwrap_or_default();
    out.push(match row.status {
        JobStatus::Queued => "Queued".to_string(),
        JobStatus::Running => format!("{epoch}step {} of {}{loss}", row.step, row.total_steps),
        JobStatus::Paused => format!("Paused at step {} of {}", row.step, row.total_steps),
        JobStatus::Completed => format!(
            "Completed at {}: {} steps{loss}",
            row.finished_at.as_deref().unwrap_or("?"),
            row.step
        ),
        JobStatus::Cancelled => format!("Cancelled at step {}", row.step),
        JobStatus::Failed => format!(
            "Failed at step {}: {}",
            row.step,
            row.error.as_deref().unwrap_or("unknown error")
        ),
        JobStatus::Interrupted => format!(
            "Interrupted at step {}: {}",
            row.step,
            row.error.as_deref().unwrap_or("the server stopped")
        ),
    });
    out.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(batch: u64, epochs: Option<f64>) -> JobSpec {
        serde_json::from_value(serde_json::json!({
            "base_model": "m", "data": {"text": "x"}, "output_name": "o",
            "batch_size": batch, "epochs": epochs,
        }))
        .unwrap()
    }

    fn row(step: u64, total: u64, windows: u64, status: JobStatus) -> JobRow {
        JobRow {
            id: "job-1".into(),
            spec: String::new(),
            status,
            step,
            total_steps: total,
            train_windows: Some(windows),
            train_loss: Some(2.0),
            eval_loss: None,
            tokens_per_s: None,
            created_at: "t0".into(),
            started_at: Some("t1".into()),
            finished_at: Some("t2".into()),
            error: None,
            owner: None,
        }
    }

    #[test]
    fn epochs_end_where_the_windows_are_used_up() {
        // 10 windows, 4 per step: epoch 1 ends at step 3 (12 ≥ 10), epoch 2 at step 5 (20).
        let s = spec(4, Some(2.0));
        let r = row(4, 5, 10, JobStatus::Running);
        assert_eq!(current_epoch(&r, &s), Some(2));
        assert_eq!(percent(&r), 80.0);
        let history: Vec<HistoryPoint> = (1..=4)
            .map(|step| HistoryPoint {
                step,
                train_loss: Some(step as f64),
                eval_loss: (step == 3).then_some(1.0),
            })
            .collect();
        let log = logs(&r, &s, &history);
        let lines: Vec<&str> = log.lines().collect();
        assert_eq!(lines[0], "Started at t1");
        assert!(lines[1].starts_with("Data: 10 training windows"), "{log}");
        assert_eq!(lines[2], "Epoch 1/2 completed with loss 2.0000");
        assert_eq!(lines[3], "Step 3: eval loss 1.0000 (perplexity 2.72)");
        assert_eq!(lines[4], "Epoch 2/2 in progress, step 4 of 5, loss 2.0000");
        let done = row(5, 5, 10, JobStatus::Completed);
        assert_eq!(current_epoch(&done, &s), Some(2));
        assert_eq!(percent(&done), 100.0);
    }

    #[test]
    fn a_steps_job_reports_the_epochs_its_steps_come_to() {
        let s = spec(4, None);
        let r = row(2, 5, 8, JobStatus::Paused);
        assert_eq!(epochs(&r, &s), Some(2.5));
        assert_eq!(current_epoch(&r, &s), Some(2));
        assert!(logs(&r, &s, &[]).ends_with("Paused at step 2 of 5"));
    }
}
