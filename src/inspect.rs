//! `tokenscope inspect`: the next-token table in a terminal.

use std::fmt::Write;

use crate::engine::lens::LensLayer;
use crate::engine::{GenerateResponse, TokenProbability};

/// Shows whitespace so that " Paris" and "Paris" are told apart.
pub fn visible(token: &str) -> String {
    token
        .chars()
        .map(|c| match c {
            ' ' => '␣',
            '\n' => '↵',
            '\t' => '→',
            '\r' => '␍',
            c if c.is_control() => '�',
            c => c,
        })
        .collect()
}

fn bar(probability: f64, width: usize) -> String {
    let cells = probability.clamp(0.0, 1.0) * width as f64;
    let full = cells.floor() as usize;
    let mut s = "█".repeat(full);
    let rest = cells - full as f64;
    const PARTS: [&str; 8] = ["", "▏", "▎", "▍", "▌", "▋", "▊", "▉"];
    if full < width {
        s.push_str(PARTS[(rest * 8.0) as usize % 8]);
    }
    s
}

fn table(out: &mut String, rows: &[TokenProbability]) {
    let width = rows
        .iter()
        .map(|r| visible(&r.token).chars().count())
        .max()
        .unwrap_or(5)
        .clamp(5, 30);
    let _ = writeln!(
        out,
        "  {:>4}  {:<width$}  {:>8}  {:>9}  {:<20}  {:>6}",
        "rank", "token", "prob", "logprob", "", "id"
    );
    for r in rows {
        let tok: String = visible(&r.token).chars().take(30).collect();
        let _ = writeln!(
            out,
            "  {:>4}  {:<width$}  {:>7.3}%  {:>9.4}  {:<20}  {:>6}",
            r.rank,
            tok,
            r.percentage,
            r.logprob,
            bar(r.probability, 20),
            r.token_id
        );
    }
}

/// A plain table: a header row and columns padded to their widest cell (the client's lists of
/// models and jobs).
pub fn render_table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| -> String {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        format!("  {}", padded.join("  ").trim_end())
    };
    let mut out = String::new();
    let _ = writeln!(out, "{}", line(headers.to_vec()));
    for row in rows {
        let _ = writeln!(out, "{}", line(row.iter().map(String::as_str).collect()));
    }
    out
}

/// A progress bar of `width` cells for a fraction in [0, 1].
pub fn progress_cells(fraction: f64, width: usize) -> String {
    let s = bar(fraction, width);
    let used = s.chars().count();
    format!("{s}{}", "·".repeat(width.saturating_sub(used)))
}

/// Renders a response as readable text.
pub fn render(prompt: &str, resp: &GenerateResponse) -> String {
    let m = &resp.metadata;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "model {} ({}, {}) · prompt {:?} ({} tokens) · T={} · {:.1} ms",
        m.model_name,
        m.device,
        m.dtype,
        prompt,
        m.prompt_tokens,
        m.temperature_used,
        m.generation_time_ms
    );
    if let Some(prompt_tokens) = &resp.prompt {
        let ppl = m
            .prompt_perplexity
            .map_or(String::new(), |p| format!(" · perplexity {p:.3}"));
        let _ = writeln!(out, "\nprompt tokens{ppl}");
        let _ = writeln!(
            out,
            "  {:>4}  {:<20}  {:>9}  {:>6}  {:>7}  expected",
            "pos", "token", "logprob", "rank", "entropy"
        );
        for (i, t) in prompt_tokens.iter().enumerate() {
            let num = |v: Option<f64>, w: usize| {
                v.map_or(format!("{:>w$}", "—"), |v| format!("{v:>w$.4}"))
            };
            let expected = t.top.first().map_or(String::new(), |b| visible(&b.token));
            let _ = writeln!(
                out,
                "  {:>4}  {:<20}  {}  {:>6}  {}  {}",
                i,
                visible(&t.token).chars().take(20).collect::<String>(),
                num(t.logprob, 9),
                t.rank.map_or("—".into(), |r| r.to_string()),
                num(t.entropy, 7),
                expected
            );
        }
    }
    if let Some(targets) = &resp.targets {
        let _ = writeln!(out, "\ntargets");
        for t in targets {
            let _ = writeln!(
                out,
                "  {:<20}  p = {:.6e}  logprob {:>9.4}  first-token rank {}  ({} tokens)",
                visible(&t.text),
                t.probability,
                t.logprob,
                t.rank,
                t.token_ids.len()
            );
        }
    }
    for (i, step) in resp.steps.iter().enumerate() {
        let _ = writeln!(
            out,
            "\nposition {} · chose {:?} (rank {}, {:.3}%) · entropy {:.3} nats",
            i + 1,
            visible(&step.token),
            step.rank,
            step.probability * 100.0,
            step.entropy
        );
        table(&mut out, &step.top);
    }
    let _ = writeln!(
        out,
        "\ngenerated {:?} · finish_reason {}",
        resp.generated_text,
        serde_json::to_value(resp.finish_reason)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default()
    );
    out
}

/// Renders a teacher-forced score of a continuation.
pub fn render_scores(
    prompt: &str,
    continuation: &str,
    scored: &[crate::engine::generate::ScoredToken],
) -> String {
    let mut out = String::new();
    let total: f64 = scored.iter().map(|s| s.logprob).sum();
    let _ = writeln!(
        out,
        "p({:?} | {:?}) = {:.6e}  (logprob {:.4}, {} tokens)",
        continuation,
        prompt,
        total.exp(),
        total,
        scored.len()
    );
    let _ = writeln!(
        out,
        "  {:<20}  {:>9}  {:>9}  {:>6}",
        "token", "prob", "logprob", "rank"
    );
    for s in scored {
        let _ = writeln!(
            out,
            "  {:<20}  {:>8.4}%  {:>9.4}  {:>6}",
            visible(&s.token),
            s.probability * 100.0,
            s.logprob,
            s.rank
        );
    }
    out
}

/// The logit lens as a table: one row per layer, last layer first (the model's output), with
/// its entropy, its top tokens and each target's rank.
pub fn render_lens(prompt: &str, layers: &[LensLayer]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "logit lens for {:?}: {} layers (each row: the final norm and head applied to the \
         residual stream after that layer; the last is the model's output)\n",
        prompt,
        layers.len()
    );
    let targets: Vec<String> = layers
        .first()
        .map(|l| l.targets.iter().map(|t| visible(&t.text)).collect())
        .unwrap_or_default();
    let mut head = format!("  {:>5}  {:>7}  ", "layer", "entropy");
    for t in &targets {
        let _ = write!(head, "{:>10}  ", t.chars().take(10).collect::<String>());
    }
    let _ = writeln!(out, "{head}top tokens");
    for l in layers.iter().rev() {
        let mut row = format!("  {:>5}  {:>7.3}  ", l.layer, l.entropy);
        for t in &l.targets {
            let _ = write!(row, "{:>10}  ", format!("#{}", t.rank));
        }
        let tops: Vec<String> = l
            .top
            .iter()
            .take(5)
            .map(|t| format!("{} {:.1}%", visible(&t.token), t.percentage))
            .collect();
        let _ = writeln!(out, "{row}{}", tops.join("  "));
    }
    out
}

/// Two models on one text (`client compare`, `inspect --compare`): the summary, then the
/// `rows` positions where they differ most (largest KL(A‖B) first).
pub fn render_compare(
    a: &str,
    b: &str,
    positions: &[crate::engine::compare::ComparePosition],
    summary: &crate::engine::compare::CompareSummary,
    rows: usize,
) -> String {
    let mut out = String::new();
    let s = summary;
    let _ = writeln!(out, "A = {a}\nB = {b}\n");
    let _ = writeln!(
        out,
        "  {} positions   KL(A‖B) mean {:.6}  median {:.6}  p99 {:.6}  max {:.6} (at token {})",
        s.positions, s.kl_mean, s.kl_median, s.kl_p99, s.kl_max, s.kl_max_position
    );
    let _ = writeln!(
        out,
        "  KL(B‖A) mean {:.6}   top-1 agreement {:.2}%   perplexity A {:.4}  B {:.4}   RMS Δp {:.3}%\n",
        s.kl_ba_mean,
        s.top1_agreement_percent,
        s.perplexity_a,
        s.perplexity_b,
        s.rms_delta_p_percent
    );
    if positions.is_empty() {
        return out;
    }
    let mut worst: Vec<&crate::engine::compare::ComparePosition> = positions.iter().collect();
    worst.sort_by(|x, y| {
        y.kl_ab
            .total_cmp(&x.kl_ab)
            .then(x.position.cmp(&y.position))
    });
    let top1 = |t: &[TokenProbability]| {
        t.first()
            .map(|t| format!("{} {:.1}%", visible(&t.token), t.percentage))
            .unwrap_or_default()
    };
    let table: Vec<Vec<String>> = worst
        .iter()
        .take(rows)
        .map(|p| {
            vec![
                p.position.to_string(),
                visible(&p.token),
                format!("{:.4}", p.logprob_a),
                format!("{:.4}", p.logprob_b),
                format!("{:+.4}", p.delta_logprob),
                format!("{:.6}", p.kl_ab),
                top1(&p.top_a),
                top1(&p.top_b),
                if p.top1_agree { "yes" } else { "NO" }.to_string(),
            ]
        })
        .collect();
    let _ = writeln!(
        out,
        "  the {} positions where they differ most (largest KL(A‖B) first):",
        table.len()
    );
    out.push_str(&render_table(
        &[
            "pos",
            "token",
            "logp A",
            "logp B",
            "Δ logp",
            "KL(A‖B)",
            "top-1 A",
            "top-1 B",
            "agree",
        ],
        &table,
    ));
    out
}
