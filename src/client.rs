//! `tokenscope client`: drives a running server from the terminal — status, models, load and
//! unload, generate, training jobs (with a progress bar while following one). Tables use the
//! renderer `inspect` uses; `--json` prints the server's JSON for scripts.

use std::io::IsTerminal;
use std::time::Duration;

use anyhow::{bail, Context};
use serde_json::{json, Value};

use crate::cli::{ClientArgs, ClientCommand};
use crate::engine::GenerateResponse;
use crate::inspect::{render, render_table};

struct Api {
    base: String,
    key: Option<String>,
    agent: ureq::Agent,
}

impl Api {
    fn new(url: &str, key: Option<String>) -> Self {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(300)))
            .build()
            .into();
        Self {
            base: url.trim_end_matches('/').to_string(),
            key,
            agent,
        }
    }

    fn auth<B>(&self, req: ureq::RequestBuilder<B>) -> ureq::RequestBuilder<B> {
        match &self.key {
            Some(k) => req.header("Authorization", &format!("Bearer {k}")),
            None => req,
        }
    }

    fn finish(
        &self,
        what: &str,
        resp: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> anyhow::Result<Value> {
        let mut resp = resp.with_context(|| format!("cannot reach {} ({what})", self.base))?;
        let status = resp.status().as_u16();
        let text = resp.body_mut().read_to_string().unwrap_or_default();
        let body: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        if status >= 400 {
            let detail = body
                .get("detail")
                .or_else(|| body.pointer("/error/message"))
                .map(|d| match d {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                })
                .unwrap_or_else(|| body.to_string());
            let code = body.get("error_code").and_then(Value::as_str).unwrap_or("");
            bail!("{what}: HTTP {status} {code}: {detail}");
        }
        Ok(body)
    }

    fn get(&self, path: &str) -> anyhow::Result<Value> {
        let req = self.auth(self.agent.get(&format!("{}{path}", self.base)));
        self.finish(&format!("GET {path}"), req.call())
    }

    fn post(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        let req = self.auth(self.agent.post(&format!("{}{path}", self.base)));
        self.finish(&format!("POST {path}"), req.send_json(body))
    }

    fn post_raw(&self, path: &str, content_type: &str, bytes: &[u8]) -> anyhow::Result<Value> {
        let req = self
            .auth(self.agent.post(&format!("{}{path}", self.base)))
            .content_type(content_type);
        self.finish(&format!("POST {path}"), req.send(bytes))
    }
}

/// Runs one client command.
pub fn run(args: &ClientArgs) -> anyhow::Result<()> {
    let api = Api::new(&args.url, args.api_key.clone());
    let print_json =
        |v: &Value| println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
    match &args.command {
        ClientCommand::Status => {
            let s = api.get("/status")?;
            if args.json {
                print_json(&s);
            } else {
                print_status(&s);
            }
        }
        ClientCommand::Models => {
            let m = api.get("/models")?;
            if args.json {
                print_json(&m);
            } else {
                print!("{}", models_table(&m));
            }
        }
        ClientCommand::Load { id, wait } => {
            let mut m = api.post(&format!("/models/{id}/load"), &json!({}))?;
            while *wait && m["status"] == "loading" {
                std::thread::sleep(Duration::from_millis(250));
                m = api.get(&format!("/models/{id}"))?;
            }
            if args.json {
                print_json(&m);
            } else {
                println!("{id}: {}", m["status"].as_str().unwrap_or("?"));
                if let Some(e) = m["error"].as_str() {
                    println!("  error: {e}");
                }
            }
            if m["status"] == "failed" {
                bail!("loading {id} failed");
            }
        }
        ClientCommand::Unload { id } => {
            let m = api.post(&format!("/models/{id}/unload"), &json!({}))?;
            if args.json {
                print_json(&m);
            } else {
                println!("{id}: {}", m["status"].as_str().unwrap_or("?"));
            }
        }
        ClientCommand::Generate {
            prompt,
            top_k,
            temperature,
            max_tokens,
            model,
        } => {
            let mut body = json!({
                "prompt": prompt, "top_k": top_k, "temperature": temperature,
                "max_tokens": max_tokens,
            });
            if let Some(m) = model {
                body["model"] = json!(m);
            }
            let r = api.post("/generate", &body)?;
            if args.json {
                print_json(&r);
            } else {
                let resp: GenerateResponse =
                    serde_json::from_value(r).context("reading the /generate response")?;
                print!("{}", render(prompt, &resp));
            }
        }
        ClientCommand::Train(t) => {
            let bytes = std::fs::read(&t.data)
                .with_context(|| format!("reading --data {}", t.data.display()))?;
            let jsonl = t.data.extension().is_some_and(|e| e == "jsonl");
            let upload = api.post_raw(
                "/train/uploads",
                if jsonl {
                    "application/jsonl"
                } else {
                    "text/plain"
                },
                &bytes,
            )?;
            let mut spec = json!({
                "base_model": t.base, "output_name": t.name,
                "data": {"upload_id": upload["id"]},
                "lr": t.lr, "batch_size": t.batch_size, "seq_len": t.seq_len,
                "eval_every": t.eval_every, "save_every": t.save_every, "seed": t.seed,
            });
            for (field, value) in [
                ("warmup", t.warmup.map(|w| json!(w))),
                ("steps", t.steps.map(|s| json!(s))),
                ("epochs", t.epochs.map(|e| json!(e))),
                ("job_name", t.job_name.as_ref().map(|n| json!(n))),
            ] {
                if let Some(v) = value {
                    spec[field] = v;
                }
            }
            if let Some(r) = t.lora_r {
                let mut lora = json!({"r": r});
                if let Some(a) = t.lora_alpha {
                    lora["alpha"] = json!(a);
                }
                if let Some(d) = t.lora_dropout {
                    lora["dropout"] = json!(d);
                }
                if !t.lora_targets.is_empty() {
                    lora["target_modules"] = json!(t.lora_targets);
                }
                spec["method"] = json!("lora");
                spec["lora"] = lora;
            }
            let job = api.post("/train/jobs", &spec)?;
            let id = job["id"].as_str().unwrap_or_default().to_string();
            if !args.json {
                println!("queued {id}: {} → {}", t.base, t.name);
            }
            if t.follow {
                follow(&api, &id, args.json)?;
            } else if args.json {
                print_json(&job);
            }
        }
        ClientCommand::Jobs { id: None, .. } => {
            let jobs = api.get("/train/jobs")?;
            if args.json {
                print_json(&jobs);
            } else {
                print!("{}", jobs_table(&jobs));
            }
        }
        ClientCommand::Jobs {
            id: Some(id),
            follow: true,
        } => follow(&api, id, args.json)?,
        ClientCommand::Jobs {
            id: Some(id),
            follow: false,
        } => {
            let job = api.get(&format!("/train/jobs/{id}"))?;
            if args.json {
                print_json(&job);
            } else {
                print_job(&job);
            }
        }
        ClientCommand::Compare {
            a,
            b,
            text,
            continuation,
            top_k,
            rows,
        } => {
            let body = match continuation {
                Some(c) => {
                    json!({"models": [a, b], "prompt": text, "continuation": c, "top_k": top_k})
                }
                None => json!({"models": [a, b], "text": text, "top_k": top_k}),
            };
            let v = api.post("/compare", &body)?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                let r: crate::api::compare::CompareResponse = serde_json::from_value(v)
                    .context("the server's /compare response is not what this client expects")?;
                print!(
                    "{}",
                    crate::inspect::render_compare(
                        &r.models[0],
                        &r.models[1],
                        &r.positions,
                        &r.summary,
                        *rows
                    )
                );
            }
        }
        ClientCommand::Evaluate {
            model,
            data,
            references,
            name,
            max_tokens,
            stop_on_newline,
        } => {
            let mut body = json!({"eval_name": name, "max_tokens": max_tokens,
                "stop_on_newline": stop_on_newline});
            if let Some(path) = data {
                let upload = upload_file(&api, path)?;
                body["data"] = json!({"upload_id": upload["id"]});
            }
            if let Some(path) = references {
                body["references"] = Value::Array(read_references(path)?);
            }
            let v = api.post(&format!("/models/{model}/evaluate"), &body)?;
            if args.json {
                print_json(&v);
            } else {
                print_evaluation(&v);
            }
        }
        ClientCommand::Evaluations { id: None } => {
            let v = api.get("/evaluations")?;
            if args.json {
                print_json(&v);
            } else {
                print!("{}", evaluations_table(&v));
            }
        }
        ClientCommand::Evaluations { id: Some(id) } => {
            let v = api.get(&format!("/evaluations/{id}"))?;
            if args.json {
                print_json(&v);
            } else {
                print_evaluation(&v);
            }
        }
        ClientCommand::Stats => {
            let v = api.get("/statistics")?;
            if args.json {
                print_json(&v);
            } else {
                for (key, value) in v.as_object().into_iter().flatten() {
                    println!("{:<24} {}", key.replace('_', " "), plain(value));
                }
            }
        }
        ClientCommand::Pause { id }
        | ClientCommand::Resume { id }
        | ClientCommand::Cancel { id } => {
            let verb = match &args.command {
                ClientCommand::Pause { .. } => "pause",
                ClientCommand::Resume { .. } => "resume",
                _ => "cancel",
            };
            let job = api.post(&format!("/train/jobs/{id}/{verb}"), &json!({}))?;
            if args.json {
                print_json(&job);
            } else {
                println!("{id}: {}", job["status"].as_str().unwrap_or("?"));
            }
        }
    }
    Ok(())
}

const ENDED: [&str; 5] = ["completed", "failed", "cancelled", "paused", "interrupted"];

/// Polls a job until it ends, drawing a progress bar (a line per step when not on a terminal).
fn follow(api: &Api, id: &str, json_out: bool) -> anyhow::Result<()> {
    let tty = std::io::stderr().is_terminal() && !json_out;
    let bar = if tty {
        let b = indicatif::ProgressBar::new(1);
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} · {msg}",
        ) {
            b.set_style(style);
        }
        Some(b)
    } else {
        None
    };
    let mut last_step = u64::MAX;
    let job = loop {
        let job = api.get(&format!("/train/jobs/{id}"))?;
        let step = job["step"].as_u64().unwrap_or(0);
        let total = job["total_steps"].as_u64().unwrap_or(0);
        let message = progress_message(&job);
        if let Some(b) = &bar {
            b.set_length(total.max(1));
            b.set_position(step);
            b.set_message(message);
        } else if step != last_step && !json_out {
            eprintln!("{id}: step {step}/{total} · {message}");
        }
        last_step = step;
        if ENDED.contains(&job["status"].as_str().unwrap_or("")) {
            break job;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    if json_out {
        println!("{}", serde_json::to_string_pretty(&job).unwrap_or_default());
    } else {
        print_job(&job);
    }
    match job["status"].as_str() {
        Some("completed") => Ok(()),
        Some(other) => bail!(
            "job {id} ended {other}{}",
            job["error"]
                .as_str()
                .map(|e| format!(": {e}"))
                .unwrap_or_default()
        ),
        None => bail!("job {id}: no status"),
    }
}

fn progress_message(job: &Value) -> String {
    let mut parts = vec![job["status"].as_str().unwrap_or("?").to_string()];
    if let Some(l) = job["train_loss"].as_f64() {
        parts.push(format!("loss {l:.4}"));
    }
    if let Some(l) = job["eval_loss"].as_f64() {
        parts.push(format!("eval {l:.4}"));
    }
    if let Some(t) = job["tokens_per_s"].as_f64() {
        parts.push(format!("{t:.0} tok/s"));
    }
    if let Some(e) = job["eta_s"].as_f64() {
        parts.push(format!("ETA {e:.0}s"));
    }
    parts.join(" · ")
}

fn num(v: &Value, digits: usize) -> String {
    v.as_f64()
        .map(|x| format!("{x:.digits$}"))
        .unwrap_or_else(|| "-".into())
}

fn text(v: &Value) -> String {
    v.as_str().unwrap_or("-").to_string()
}

fn models_table(models: &Value) -> String {
    let rows: Vec<Vec<String>> = models
        .as_array()
        .map(|a| {
            a.iter()
                .map(|m| {
                    let params = m["parameters"]
                        .as_f64()
                        .map(|p| format!("{:.1}M", p / 1e6))
                        .unwrap_or_else(|| "-".into());
                    vec![
                        format!(
                            "{}{}",
                            text(&m["id"]),
                            if m["default"] == true { " *" } else { "" }
                        ),
                        text(&m["status"]),
                        text(&m["architecture"]),
                        params,
                        text(&m["quantization"]),
                        num(&m["memory_mb"], 1),
                        text(&m["origin"]),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    render_table(
        &[
            "id (* default)",
            "status",
            "arch",
            "params",
            "quant",
            "MiB",
            "origin",
        ],
        &rows,
    )
}

fn jobs_table(jobs: &Value) -> String {
    let rows: Vec<Vec<String>> = jobs
        .as_array()
        .map(|a| {
            a.iter()
                .map(|j| {
                    vec![
                        text(&j["id"]),
                        text(&j["status"]),
                        text(&j["base_model"]),
                        text(&j["output_name"]),
                        format!(
                            "{}/{}",
                            j["step"].as_u64().unwrap_or(0),
                            j["total_steps"].as_u64().unwrap_or(0)
                        ),
                        num(&j["train_loss"], 4),
                        num(&j["eval_loss"], 4),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    render_table(
        &[
            "id",
            "status",
            "base",
            "output",
            "step",
            "train loss",
            "eval loss",
        ],
        &rows,
    )
}

fn print_job(job: &Value) {
    let step = job["step"].as_u64().unwrap_or(0);
    let total = job["total_steps"].as_u64().unwrap_or(0).max(1);
    println!(
        "{} · {} · {} → {}",
        text(&job["id"]),
        text(&job["status"]),
        text(&job["base_model"]),
        text(&job["output_name"])
    );
    println!(
        "  {} {step}/{total} · {}",
        crate::inspect::progress_cells(step as f64 / total as f64, 30),
        progress_message(job)
    );
    if let Some(e) = job["error"].as_str() {
        println!("  error: {e}");
    }
    if let Some(history) = job["history"].as_array() {
        let evals: Vec<Vec<String>> = history
            .iter()
            .filter(|p| p["eval_loss"].is_number())
            .map(|p| {
                vec![
                    p["step"].to_string(),
                    num(&p["train_loss"], 4),
                    num(&p["eval_loss"], 4),
                ]
            })
            .collect();
        if !evals.is_empty() {
            print!(
                "{}",
                render_table(&["step", "train loss", "eval loss"], &evals)
            );
        }
    }
    if let Some(logs) = job["logs"].as_str() {
        for line in logs.lines() {
            println!("  {line}");
        }
    }
}

fn print_status(s: &Value) {
    let svc = &s["service"];
    println!(
        "tokenscope {} · {} · up {}s · RSS {} MiB · auth {}",
        text(&svc["version"]),
        text(&svc["status"]),
        svc["uptime_seconds"],
        svc["memory_usage_mb"],
        if svc["auth_enabled"] == true {
            "on"
        } else {
            "off"
        }
    );
    let sys = &s["system"];
    println!(
        "machine: {} cores · {} GB · GPU {}",
        sys["cpu_cores"],
        num(&sys["system_memory_gb"], 1),
        sys["gpu_name"].as_str().unwrap_or("none")
    );
    if let Some(models) = s["models"].as_array() {
        let rows: Vec<Vec<String>> = models
            .iter()
            .map(|m| {
                vec![
                    text(&m["id"]),
                    text(&m["status"]),
                    num(&m["memory_mb"], 1),
                    format!(
                        "{}/{}",
                        m["queue_depth"].as_u64().unwrap_or(0),
                        m["queue_capacity"].as_u64().unwrap_or(0)
                    ),
                ]
            })
            .collect();
        print!(
            "{}",
            render_table(&["model", "status", "MiB", "queue"], &rows)
        );
    }
}

/// Uploads a .txt or .jsonl file (POST /train/uploads).
fn upload_file(api: &Api, path: &std::path::Path) -> anyhow::Result<Value> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let jsonl = path.extension().is_some_and(|e| e == "jsonl");
    api.post_raw(
        "/train/uploads",
        if jsonl {
            "application/jsonl"
        } else {
            "text/plain"
        },
        &bytes,
    )
}

/// `{"prompt", "reference"}` objects, one per non-empty line.
fn read_references(path: &std::path::Path) -> anyhow::Result<Vec<Value>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, line)| {
            let v: Value = serde_json::from_str(line)
                .with_context(|| format!("{} line {}: not JSON", path.display(), i + 1))?;
            match (v.get("prompt"), v.get("reference")) {
                (Some(Value::String(p)), Some(Value::String(r))) => {
                    Ok(json!({"prompt": p, "reference": r}))
                }
                _ => bail!(
                    "{} line {}: needs string fields `prompt` and `reference`",
                    path.display(),
                    i + 1
                ),
            }
        })
        .collect()
}

/// A JSON value as a table cell: numbers to 4 decimals, null as `-`.
fn plain(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        Value::Number(n) if n.is_f64() => format!("{:.4}", n.as_f64().unwrap_or_default()),
        other => other.to_string(),
    }
}

fn print_evaluation(v: &Value) {
    println!(
        "{} {} on {} ({}, {:.1} s)",
        plain(&v["id"]),
        plain(&v["eval_name"]),
        plain(&v["model_id"]),
        plain(&v["created_at"]),
        v["duration_s"].as_f64().unwrap_or_default()
    );
    for (key, value) in v["metrics"].as_object().into_iter().flatten() {
        println!("  {:<22} {}", key.replace('_', " "), plain(value));
    }
    for s in v["samples"].as_array().into_iter().flatten() {
        println!(
            "  {:?} → {:?} (expected {:?}, ROUGE-L {})",
            plain(&s["prompt"]),
            plain(&s["response"]),
            plain(&s["reference"]),
            plain(&s["rouge_l"])
        );
    }
}

fn evaluations_table(v: &Value) -> String {
    let rows: Vec<Vec<String>> = v["evaluations"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            let m = &e["metrics"];
            vec![
                plain(&e["id"]),
                plain(&e["model_id"]),
                plain(&e["eval_name"]),
                plain(&m["perplexity"]),
                plain(&m["bits_per_byte"]),
                plain(&m["bleu_score"]),
                plain(&m["rouge_score"]),
            ]
        })
        .collect();
    render_table(
        &[
            "id",
            "model",
            "name",
            "perplexity",
            "bits/byte",
            "BLEU",
            "ROUGE-L",
        ],
        &rows,
    )
}
