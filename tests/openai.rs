//! The OpenAI-compatible surface and the scoring extensions, over the router (tower `oneshot`)
//! on the real default model: every rule lm-evaluation-harness depends on, the chat template,
//! streaming, errors, auth, CORS, the tokenizer endpoints, prompt log-probs and targets.

mod common;

use axum::body::Body;
use axum::http::{header, Method, Request, StatusCode};
use axum::Router;
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tower::ServiceExt;

use common::http::{post, post_json, send};
use tokenscope::api::{self, AppState, ServeConfig};
use tokenscope::engine::worker::{self, WorkerHandle, WorkerLimits};

const PROMPT: &str = "The capital of France is";
/// A chat turn after which SmolLM2-135M-Instruct's most likely next token is `<|im_end|>`.
const ENDS_WITH_EOS: &str = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\nThe capital of France is Paris.";

fn app_with(config: ServeConfig) -> (Router, WorkerHandle) {
    common::http::router(common::smollm(), WorkerLimits::default(), 64, config)
}

/// A server whose request timeout is no concern of the test (long generations, debug build).
fn unhurried() -> ServeConfig {
    ServeConfig {
        request_timeout: std::time::Duration::from_secs(600),
        ..Default::default()
    }
}

fn app() -> Router {
    app_with(ServeConfig::default()).0
}

async fn ok(app: &Router, path: &str, body: Value) -> Value {
    let (s, b) = post(app, path, body).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    b
}

/// The `data:` payloads of a server-sent event stream.
async fn stream(app: &Router, path: &str, body: Value) -> Vec<String> {
    let (s, headers, text) = send(app, post_json(path, &body.to_string())).await;
    assert_eq!(s, StatusCode::OK, "{text}");
    assert!(headers[header::CONTENT_TYPE]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    text.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(str::to_string)
        .collect()
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

/// Checks lm-eval's rules on one echoed choice: the first entry null, every other entry's
/// chosen token in its top_logprobs with the bit-identical value, at most k + 1 keys.
fn check_echo_rules(lp: &Value, k: usize) {
    let tokens = lp["tokens"].as_array().unwrap();
    let values = lp["token_logprobs"].as_array().unwrap();
    let tops = lp["top_logprobs"].as_array().unwrap();
    assert_eq!(tokens.len(), values.len());
    assert_eq!(tokens.len(), tops.len());
    assert_eq!(tokens.len(), lp["text_offset"].as_array().unwrap().len());
    assert!(values[0].is_null() && tops[0].is_null());
    for i in 1..tokens.len() {
        let top = tops[i].as_object().unwrap();
        let chosen = tokens[i].as_str().unwrap();
        assert_eq!(
            f(&top[chosen]).to_bits(),
            f(&values[i]).to_bits(),
            "position {i}"
        );
        assert!(top.len() <= k + 1 && top.len() >= k.min(1));
        // Most likely first, as OpenAI orders them (not alphabetically).
        let order: Vec<f64> = top.values().map(f).collect();
        assert!(
            order.windows(2).all(|w| w[0] >= w[1]),
            "position {i}: {top:?}"
        );
        assert!(f(&values[i]) <= 0.0);
    }
}

#[tokio::test]
async fn echo_scores_every_prompt_token_then_the_generated_one() {
    let app = app();
    let b = ok(
        &app,
        "/v1/completions",
        json!({"model": "SmolLM2-135M-Instruct.Q4_1", "prompt": PROMPT, "max_tokens": 1, "logprobs": 3, "echo": true, "temperature": 0}),
    )
    .await;
    assert_eq!(b["object"], "text_completion");
    let choice = &b["choices"][0];
    assert_eq!(choice["index"], 0);
    assert_eq!(choice["text"], format!("{PROMPT} Paris"));
    let lp = &choice["logprobs"];
    let tokens: Vec<&str> = lp["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert_eq!(
        tokens,
        ["The", " capital", " of", " France", " is", " Paris"]
    );
    assert_eq!(lp["text_offset"], json!([0, 3, 11, 14, 21, 24]));
    check_echo_rules(lp, 3);
    assert_eq!(b["usage"]["prompt_tokens"], 5);
    assert_eq!(b["usage"]["completion_tokens"], 1);

    // Each prompt position equals the model's own next-token distribution after the tokens
    // before it, computed independently (one unbatched pass per prefix).
    let m = common::smollm();
    let ids = m.tokenizer.encode(PROMPT).unwrap();
    for i in 1..ids.len() {
        let reference = common::next_logprobs(&m.model, &ids[..i])[ids[i] as usize] as f64;
        let got = f(&lp["token_logprobs"][i]);
        assert!(
            (got - reference).abs() < 1e-5,
            "position {i}: {got} vs {reference}"
        );
    }
}

#[tokio::test]
async fn echo_keeps_the_generated_entry_when_it_is_end_of_sequence() {
    let app = app();
    let b = ok(
        &app,
        "/v1/completions",
        json!({"prompt": ENDS_WITH_EOS, "max_tokens": 1, "logprobs": 1, "echo": true, "temperature": 0}),
    )
    .await;
    let choice = &b["choices"][0];
    let n_prompt = b["usage"]["prompt_tokens"].as_u64().unwrap() as usize;
    let tokens = choice["logprobs"]["tokens"].as_array().unwrap();
    assert_eq!(tokens.len(), n_prompt + 1, "the EOS entry must be there");
    assert_eq!(tokens[n_prompt], "<|im_end|>");
    assert_eq!(choice["finish_reason"], "stop");
    // The text leaves the special token out.
    assert_eq!(choice["text"], ENDS_WITH_EOS);
    check_echo_rules(&choice["logprobs"], 1);
}

#[tokio::test]
async fn token_id_prompts_run_exactly_as_given() {
    let app = app();
    let m = common::smollm();
    let ids = m.tokenizer.encode(PROMPT).unwrap();
    // A batch of two token-id prompts (lm-eval's shape), and a prompt that starts with BOS.
    let mut with_bos = vec![1u32];
    with_bos.extend(&ids);
    let b = ok(
        &app,
        "/v1/completions",
        json!({"prompt": [ids, with_bos], "max_tokens": 0, "logprobs": 1, "echo": true}),
    )
    .await;
    let choices = b["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 2);
    assert_eq!(choices[0]["index"], 0);
    assert_eq!(choices[1]["index"], 1);
    assert_eq!(
        choices[0]["logprobs"]["tokens"].as_array().unwrap().len(),
        ids.len()
    );
    assert_eq!(
        choices[1]["logprobs"]["tokens"].as_array().unwrap().len(),
        ids.len() + 1
    );
    assert_eq!(choices[1]["logprobs"]["tokens"][0], "<|im_start|>");
    assert_eq!(b["usage"]["prompt_tokens"], 2 * ids.len() + 1);
    // Same tokens as the string prompt: the same numbers.
    let text = ok(
        &app,
        "/v1/completions",
        json!({"prompt": PROMPT, "max_tokens": 0, "logprobs": 1, "echo": true}),
    )
    .await;
    assert_eq!(
        text["choices"][0]["logprobs"]["token_logprobs"],
        choices[0]["logprobs"]["token_logprobs"]
    );
    // Ids outside the vocabulary are refused, naming the field.
    let (s, e) = post(
        &app,
        "/v1/completions",
        json!({"prompt": [[1, 49152]], "max_tokens": 1}),
    )
    .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{e}");
    assert_eq!(e["error"]["param"], "prompt");
}

/// BOS is added to string prompts only, for a model whose vocabulary asks for it (Gemma 3).
#[test]
fn token_ids_never_get_a_bos_even_when_the_model_adds_one_to_text() {
    let path = common::test_asset("gemma-3-270m-q4_k_m.gguf");
    let m = tokenscope::model::load(
        &tokenscope::model::ModelSource::Gguf(path),
        &Default::default(),
    )
    .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let bos = m.tokenizer.info.bos_token_id.unwrap();
    let text_ids = m.tokenizer.encode("Hello world").unwrap();
    assert_eq!(text_ids[0], bos, "text prompts get BOS");
    let worker = worker::spawn_loaded(m.clone(), WorkerLimits::default(), 8);
    let app = api::router(AppState::new(worker, ServeConfig::default()));
    rt.block_on(async {
        let given = &text_ids[1..];
        let b = ok(
            &app,
            "/v1/completions",
            json!({"prompt": given, "max_tokens": 1, "logprobs": 0, "echo": true, "temperature": 0}),
        )
        .await;
        assert_eq!(b["usage"]["prompt_tokens"], given.len());
        let tokens = b["choices"][0]["logprobs"]["tokens"].as_array().unwrap();
        assert_eq!(tokens.len(), given.len() + 1);
        assert_eq!(tokens[0], m.tokenizer.token_key(given[0]));
        let text = ok(&app, "/v1/completions", json!({"prompt": "Hello world", "max_tokens": 1})).await;
        assert_eq!(text["usage"]["prompt_tokens"], text_ids.len());
    });
}

/// Tokens are named by their text, Gemma 3's SentencePiece byte-fallback pieces too (`<0x41>`
/// writes `A`); a byte that is part of a character is `bytes:\xNN`. In a legacy
/// `top_logprobs` object two tokens that write the same text keep one key each: the chosen
/// one is named (as in `tokens`), the other keyed by its id.
#[test]
fn byte_fallback_tokens_are_named_by_their_text() {
    use tokenscope::api::openai::logprobs::{LegacyBuilder, Naming};
    use tokenscope::engine::{Step, TokenProbability};
    let gemma = common::gemma3();
    let tk = &gemma.tokenizer;
    let byte_a = tk.token_to_id("<0x41>").expect("Gemma 3 has byte pieces");
    assert_eq!(tk.token_key(byte_a), "A");
    assert_eq!(
        tk.token_key(tk.token_to_id("<0xE2>").unwrap()),
        "bytes:\\xe2"
    );
    let newline = tk.encode_without_special("\n").unwrap();
    assert_eq!(newline.len(), 1);
    let byte_nl = tk.token_to_id("<0x0A>").unwrap();
    assert_ne!(newline[0], byte_nl);
    let prob = |id: u32, logprob: f64, rank: usize| TokenProbability {
        token: tk.token_text(id).to_string(),
        token_id: id,
        bytes: tk.token_bytes(id).to_vec(),
        probability: logprob.exp(),
        percentage: 100.0 * logprob.exp(),
        logprob,
        rank,
    };
    let step = Step {
        token: "\n".into(),
        token_id: byte_nl,
        bytes: b"\n".to_vec(),
        probability: 0.25f64,
        logprob: 0.25f64.ln(),
        rank: 2,
        entropy: 1.0,
        top: vec![
            prob(newline[0], 0.5f64.ln(), 1),
            prob(byte_nl, 0.25f64.ln(), 2),
        ],
    };
    let mut b = LegacyBuilder::new(Naming {
        tokenizer: tk,
        as_ids: false,
    });
    b.step(&step, 2);
    assert_eq!(b.out.tokens, vec!["\n".to_string()]);
    let map = serde_json::to_value(b.out.top_logprobs[0].as_ref().unwrap()).unwrap();
    let other = format!("token_id:{}", newline[0]);
    assert_eq!(map, json!({other: 0.5f64.ln(), "\n": 0.25f64.ln()}));
}

#[tokio::test]
async fn partial_characters_get_bytes_keys() {
    let app = app();
    let b = ok(
        &app,
        "/v1/completions",
        json!({"prompt": "I love 🦀 and 🐍", "max_tokens": 0, "logprobs": 5, "echo": true}),
    )
    .await;
    let lp = &b["choices"][0]["logprobs"];
    let tokens: Vec<&str> = lp["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert!(
        tokens.iter().any(|t| t.starts_with("bytes:\\x")),
        "{tokens:?}"
    );
    check_echo_rules(lp, 5);
    // Offsets count characters; a split character counts once complete.
    let offsets = lp["text_offset"].as_array().unwrap();
    assert!(offsets.windows(2).all(|w| w[0].as_u64() <= w[1].as_u64()));
    assert!(offsets.last().unwrap().as_u64().unwrap() < "I love 🦀 and 🐍".chars().count() as u64);
}

#[tokio::test]
async fn prompt_logprobs_and_targets_on_generate_equal_echo() {
    let app = app();
    let g = ok(
        &app,
        "/generate",
        json!({"prompt": PROMPT, "prompt_logprobs": true, "top_k": 3, "targets": [" Paris", " Lyon", " Paris is"], "temperature": 0}),
    )
    .await;
    let prompt = g["prompt"].as_array().unwrap();
    assert_eq!(prompt.len(), 5);
    assert!(prompt[0]["logprob"].is_null() && prompt[0]["rank"].is_null());
    let e = ok(
        &app,
        "/v1/completions",
        json!({"prompt": PROMPT, "max_tokens": 0, "logprobs": 3, "echo": true}),
    )
    .await;
    let echoed = &e["choices"][0]["logprobs"]["token_logprobs"];
    let mut sum = 0.0;
    for (i, p) in prompt.iter().enumerate().skip(1) {
        assert_eq!(
            f(&p["logprob"]).to_bits(),
            f(&echoed[i]).to_bits(),
            "position {i}"
        );
        assert_eq!(p["top"].as_array().unwrap().len(), 3);
        assert!(p["rank"].as_u64().unwrap() >= 1);
        sum += f(&p["logprob"]);
    }
    let ppl = f(&g["metadata"]["prompt_perplexity"]);
    assert!((ppl - (-sum / 4.0).exp()).abs() < 1e-9 * ppl);

    // Targets: the same numbers echo gives for the prompt followed by the target's tokens.
    let targets = g["targets"].as_array().unwrap();
    assert_eq!(targets[0]["tokens"], json!([" Paris"]));
    assert_eq!(targets[0]["rank"], 1);
    assert!((f(&targets[0]["logprob"]) - f(&g["tokens"][0]["logprob"])).abs() < 1e-6);
    assert!(targets[1]["rank"].as_u64().unwrap() > 1);
    for t in targets {
        let text = format!("{PROMPT}{}", t["text"].as_str().unwrap());
        let e = ok(
            &app,
            "/v1/completions",
            json!({"prompt": text, "max_tokens": 0, "logprobs": 0, "echo": true}),
        )
        .await;
        let lps = e["choices"][0]["logprobs"]["token_logprobs"]
            .as_array()
            .unwrap();
        let n = t["token_ids"].as_array().unwrap().len();
        let echoed: f64 = lps[lps.len() - n..].iter().map(f).sum();
        let got = f(&t["logprob"]);
        assert!(
            (got - echoed).abs() < 1e-5,
            "{}: {got} vs {echoed}",
            t["text"]
        );
        assert!((f(&t["probability"]) - got.exp()).abs() < 1e-12);
    }

    // Bounds: at most 16 targets, none empty, nothing that tokenizes to nothing.
    for bad in [json!(vec![" a"; 17]), json!([""]), json!(["\u{0004}"])] {
        let (s, b) = post(&app, "/generate", json!({"prompt": PROMPT, "targets": bad})).await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{b}");
    }
}

#[tokio::test]
async fn chat_uses_the_models_template_and_matches_completions() {
    let app = app();
    let messages = json!([{"role": "user", "content": "What is the capital of France?"}]);
    let c = ok(
        &app,
        "/v1/chat/completions",
        json!({"messages": messages, "max_tokens": 4, "logprobs": true, "top_logprobs": 2, "temperature": 0}),
    )
    .await;
    assert_eq!(c["object"], "chat.completion");
    let choice = &c["choices"][0];
    assert_eq!(choice["message"]["role"], "assistant");
    let content = choice["logprobs"]["content"].as_array().unwrap();
    assert_eq!(content.len(), 4);
    for t in content {
        assert_eq!(t["top_logprobs"].as_array().unwrap().len(), 2);
        assert!(t["bytes"].is_array());
    }
    // The rendered template, tokenized as the server does, through /v1/completions as ids.
    let tok = ok(&app, "/tokenize", json!({"messages": messages})).await;
    let ids = tok["tokens"].as_array().unwrap().clone();
    assert_eq!(ids[0], 1, "SmolLM2's template starts with <|im_start|>");
    assert_eq!(c["usage"]["prompt_tokens"], ids.len());
    let p = ok(
        &app,
        "/v1/completions",
        json!({"prompt": ids, "max_tokens": 4, "logprobs": 2, "temperature": 0}),
    )
    .await;
    let legacy = &p["choices"][0]["logprobs"];
    for (i, t) in content.iter().enumerate() {
        assert_eq!(t["token"], legacy["tokens"][i]);
        assert_eq!(
            f(&t["logprob"]).to_bits(),
            f(&legacy["token_logprobs"][i]).to_bits()
        );
    }
    assert_eq!(choice["message"]["content"], p["choices"][0]["text"]);

    // Only text parts; a template's own error is reported, not a 500.
    let (s, e) = post(
        &app,
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}),
    )
    .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{e}");
    assert_eq!(e["error"]["param"], "messages");
}

#[tokio::test]
async fn streams_send_one_token_per_chunk_then_done() {
    let app = app();
    let body = json!({"prompt": PROMPT, "max_tokens": 6, "logprobs": 2, "temperature": 0, "echo": true,
        "stream_options": {"include_usage": true}});
    let whole = ok(&app, "/v1/completions", body.clone()).await;
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let events = stream(&app, "/v1/completions", streamed).await;
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["text"].as_str())
        .collect();
    assert_eq!(text, whole["choices"][0]["text"]);
    // The echoed prompt, then one generated token per chunk with its log-probs.
    let scored: Vec<&Value> = chunks
        .iter()
        .filter(|c| !c["choices"][0]["logprobs"].is_null())
        .collect();
    assert_eq!(scored.len(), 1 + 6);
    let mut all = Vec::new();
    for c in &scored {
        all.extend(
            c["choices"][0]["logprobs"]["token_logprobs"]
                .as_array()
                .unwrap()
                .clone(),
        );
    }
    assert_eq!(
        json!(all),
        whole["choices"][0]["logprobs"]["token_logprobs"]
    );
    for c in &scored[1..] {
        assert_eq!(
            c["choices"][0]["logprobs"]["tokens"]
                .as_array()
                .unwrap()
                .len(),
            1
        );
    }
    let last = &chunks[chunks.len() - 1];
    assert_eq!(last["choices"], json!([]));
    assert_eq!(last["usage"], whole["usage"]);
    assert_eq!(
        chunks[chunks.len() - 2]["choices"][0]["finish_reason"],
        "length"
    );

    // Chat: the role first, then the content, then the finish reason.
    let body =
        json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5, "temperature": 0});
    let whole = ok(&app, "/v1/chat/completions", body.clone()).await;
    let mut streamed = body;
    streamed["stream"] = json!(true);
    let events = stream(&app, "/v1/chat/completions", streamed).await;
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(chunks[0]["object"], "chat.completion.chunk");
    let content: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(content, whole["choices"][0]["message"]["content"]);
    assert_eq!(
        chunks.last().unwrap()["choices"][0]["finish_reason"],
        whole["choices"][0]["finish_reason"]
    );
}

#[tokio::test]
async fn a_stream_whose_client_leaves_stops_generating() {
    let (app, worker) = app_with(ServeConfig::default());
    let req = Request::post("/v1/completions")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(
            json!({"prompt": PROMPT, "max_tokens": 200, "stream": true, "temperature": 1, "seed": 3})
                .to_string(),
        ))
        .unwrap();
    let resp = app.clone().oneshot(req).await.unwrap();
    let mut body = resp.into_body();
    // Read the first chunk, then hang up.
    let first = body.frame().await.unwrap().unwrap();
    assert!(first.is_data());
    drop(body);
    let before = worker.cancelled_jobs();
    common::wait_until_async(
        "the job of the stream nobody reads to be cancelled",
        std::time::Duration::from_secs(60),
        || async { worker.cancelled_jobs() > before },
    )
    .await;
}

/// A stream of a request with more jobs than its window (here 16 prompts × 4 choices = 64)
/// starts as soon as its first token exists: its first event arrives while most of its jobs
/// have not reached the model yet (before, the response waited until all but the last window
/// of jobs were done). Then every choice arrives, in full.
#[tokio::test]
async fn a_many_choice_stream_starts_with_its_first_token() {
    // 64 jobs take most of a minute in a debug build on 2 busy cores: the test is about their
    // order, not the default request timeout.
    let (app, worker) = app_with(unhurried());
    let prompts: Vec<String> = (0..16).map(|i| format!("{PROMPT} number {i}")).collect();
    let req = Request::post("/v1/completions")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(
            json!({"prompt": prompts, "n": 4, "max_tokens": 8, "stream": true, "temperature": 0})
                .to_string(),
        ))
        .unwrap();
    let resp = app.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    let mut text = String::new();
    loop {
        let frame = body.frame().await.unwrap().unwrap();
        text.push_str(std::str::from_utf8(frame.data_ref().unwrap()).unwrap());
        if text.contains("\"text\"") {
            break;
        }
    }
    let received = worker.jobs_received();
    assert!(
        received < 32,
        "{received} of 64 jobs reached the model before the first token"
    );
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            text.push_str(std::str::from_utf8(&data).unwrap());
        }
    }
    let finished = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str::<Value>(d).unwrap())
        .filter(|v| v["choices"][0]["finish_reason"].is_string())
        .count();
    assert_eq!(finished, 64, "every choice ends");
    assert!(text.trim_end().ends_with("data: [DONE]"));
}

#[tokio::test]
async fn n_choices_with_a_seed_are_reproducible_and_indexed() {
    let app = app();
    let body = json!({"prompt": [PROMPT, "Once upon a time"], "n": 3, "max_tokens": 4, "seed": 11, "temperature": 1.0, "top_p": 0.9});
    let a = ok(&app, "/v1/completions", body.clone()).await;
    let b = ok(&app, "/v1/completions", body).await;
    let choices = a["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 6);
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], i);
        assert_eq!(c["text"], b["choices"][i]["text"]);
    }
    assert_eq!(a["usage"]["prompt_tokens"], 5 + 4);
}

#[tokio::test]
async fn more_choices_than_the_queue_holds_are_served_in_turn() {
    let worker = worker::spawn_loaded(common::smollm().clone(), WorkerLimits::default(), 2);
    let app = api::router(AppState::new(worker.clone(), ServeConfig::default()));
    let body =
        json!({"prompt": [PROMPT, "Once upon a time"], "n": 3, "max_tokens": 2, "temperature": 0});
    let r = ok(&app, "/v1/completions", body).await;
    let choices = r["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 6);
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], i);
        // Greedy: every choice of a prompt is the same text.
        assert_eq!(c["text"], choices[i / 3 * 3]["text"]);
    }
    assert_eq!(r["usage"]["completion_tokens"], 12);
    assert_eq!(worker.jobs_received(), 6);
}

#[tokio::test]
async fn errors_use_openais_shape_and_unknown_fields_are_ignored() {
    let app = app();
    let cases = [
        (
            json!({"prompt": PROMPT, "temperature": 3}),
            422,
            "temperature",
            "INVALID_TEMPERATURE",
        ),
        (
            json!({"prompt": PROMPT, "max_tokens": -1}),
            422,
            "max_tokens",
            "VALIDATION_ERROR",
        ),
        (
            json!({"prompt": PROMPT, "logprobs": 21}),
            422,
            "logprobs",
            "VALIDATION_ERROR",
        ),
        (
            json!({"prompt": PROMPT, "n": 0}),
            422,
            "n",
            "VALIDATION_ERROR",
        ),
        (
            json!({"prompt": PROMPT, "max_tokens": "x"}),
            422,
            "max_tokens",
            "VALIDATION_ERROR",
        ),
        (json!({"prompt": "   "}), 400, "prompt", "EMPTY_PROMPT"),
        (json!({"prompt": []}), 422, "prompt", "VALIDATION_ERROR"),
        (json!({"max_tokens": 1}), 422, "prompt", "VALIDATION_ERROR"),
    ];
    for (body, status, param, code) in cases {
        let (s, e) = post(&app, "/v1/completions", body.clone()).await;
        assert_eq!(s.as_u16(), status, "{body} → {e}");
        assert_eq!(e["error"]["param"], param, "{body} → {e}");
        assert_eq!(e["error"]["code"], code, "{body} → {e}");
        assert_eq!(e["error"]["type"], "invalid_request_error");
        assert!(e["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()));
    }
    // Each token limit is checked, also the one max_completion_tokens overrides (a fuzz finding).
    for (body, param) in [
        (
            json!({"max_tokens": 0, "max_completion_tokens": 1}),
            "max_tokens",
        ),
        (
            json!({"max_tokens": 1, "max_completion_tokens": 0}),
            "max_completion_tokens",
        ),
    ] {
        let mut body = body;
        body["messages"] = json!([{"role": "user", "content": "Hi"}]);
        let (s, e) = post(&app, "/v1/chat/completions", body.clone()).await;
        assert_eq!(s.as_u16(), 422, "{body} → {e}");
        assert_eq!(e["error"]["param"], param, "{body} → {e}");
        assert_eq!(e["error"]["code"], "INVALID_MAX_TOKENS", "{body} → {e}");
    }
    let (s, e) = post(&app, "/v1/nowhere", json!({})).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_eq!(e["error"]["type"], "not_found_error");
    // Unknown fields (OpenAI clients send extras) are ignored here, unlike /generate.
    ok(
        &app,
        "/v1/completions",
        json!({"prompt": PROMPT, "max_tokens": 1, "user": "u", "frequency_penalty": 0, "logit_bias": {}}),
    )
    .await;
    // The native contract is unchanged.
    let (s, e) = post(
        &app,
        "/generate",
        json!({"prompt": PROMPT, "temperature": 3}),
    )
    .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(e["error_code"], "INVALID_TEMPERATURE");
    // vLLM's rule (and the schema's dependentSchemas): top_logprobs, even 0, needs logprobs.
    let chat = json!([{"role": "user", "content": "Hi"}]);
    for top in [
        json!({"top_logprobs": 0}),
        json!({"top_logprobs": 2, "logprobs": false}),
    ] {
        let mut body = json!({"messages": chat, "max_tokens": 1});
        body.as_object_mut()
            .unwrap()
            .extend(top.as_object().unwrap().clone());
        let (s, e) = post(&app, "/v1/chat/completions", body.clone()).await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{body} → {e}");
        assert_eq!(e["error"]["param"], "top_logprobs");
    }
    let body = json!({"messages": chat, "max_tokens": 1, "top_logprobs": null});
    ok(&app, "/v1/chat/completions", body).await;
}

#[tokio::test]
async fn models_list_and_auth_with_an_empty_bearer() {
    let with_key = ServeConfig {
        api_keys: vec!["secret".into()],
        ..Default::default()
    };
    let (app, _) = app_with(with_key);
    let request = |auth: Option<&str>| {
        let mut r = Request::get("/v1/models");
        if let Some(a) = auth {
            r = r.header(header::AUTHORIZATION, a);
        }
        r.body(Body::empty()).unwrap()
    };
    for auth in [Some("Bearer "), Some("Bearer"), None, Some("Bearer wrong")] {
        let (s, _, text) = send(&app, request(auth)).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{auth:?}");
        let e: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(e["error"]["type"], "authentication_error");
        assert!(!text.contains("secret"));
    }
    let (s, _, text) = send(&app, request(Some("Bearer secret"))).await;
    assert_eq!(s, StatusCode::OK);
    let list: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(list["object"], "list");
    assert_eq!(list["data"][0]["object"], "model");
    assert_eq!(list["data"][0]["id"], common::smollm().name);
    assert!(list["data"][0]["created"].as_u64().unwrap() > 1_700_000_000);

    // Without keys, an empty bearer (lm-eval sends one) is simply ignored.
    let (s, _, _) = send(
        &app_with(ServeConfig::default()).0,
        request(Some("Bearer ")),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
}

#[tokio::test]
async fn cors_answers_preflight_only_when_configured() {
    let preflight = || {
        Request::builder()
            .method(Method::OPTIONS)
            .uri("/v1/completions")
            .header(header::ORIGIN, "http://localhost:5173")
            .header(header::ACCESS_CONTROL_REQUEST_METHOD, "POST")
            .header(
                header::ACCESS_CONTROL_REQUEST_HEADERS,
                "authorization,content-type",
            )
            .body(Body::empty())
            .unwrap()
    };
    let config = ServeConfig {
        api_keys: vec!["k".into()],
        cors_origins: vec!["http://localhost:5173".into()],
        ..Default::default()
    };
    let (app, _) = app_with(config);
    let (s, h, _) = send(&app, preflight()).await;
    assert!(s.is_success(), "{s}");
    assert_eq!(
        h[header::ACCESS_CONTROL_ALLOW_ORIGIN],
        "http://localhost:5173"
    );
    // Another origin gets no grant.
    let mut other = preflight();
    other
        .headers_mut()
        .insert(header::ORIGIN, "http://evil.example".parse().unwrap());
    let (_, h, _) = send(&app, other).await;
    assert!(h.get(header::ACCESS_CONTROL_ALLOW_ORIGIN).is_none());
    // Off by default.
    let (_, h, _) = send(&app_with(ServeConfig::default()).0, preflight()).await;
    assert!(h.get(header::ACCESS_CONTROL_ALLOW_ORIGIN).is_none());
}

#[tokio::test]
async fn tokenizer_endpoints_speak_vllms_shapes() {
    let app = app();
    let m = common::smollm();
    let t = ok(
        &app,
        "/tokenize",
        json!({"prompt": PROMPT, "return_token_strs": true}),
    )
    .await;
    let ids = m.tokenizer.encode(PROMPT).unwrap();
    assert_eq!(t["tokens"], json!(ids));
    assert_eq!(t["count"], ids.len());
    assert_eq!(t["max_model_len"], m.context_length());
    assert_eq!(t["token_strs"][1], " capital");
    assert_eq!(t["offsets"][1], json!([3, 11]));
    // Special tokens written in the text are read as such (lm-eval finds eos/bos ids so).
    let s = ok(
        &app,
        "/tokenize",
        json!({"prompt": "<|im_end|>", "add_special_tokens": false}),
    )
    .await;
    assert_eq!(s["tokens"], json!([2]));
    // The schema's oneOf: a body that is both shapes is refused, not read as one of them.
    let both = json!({"prompt": PROMPT, "messages": [{"role": "user", "content": "Hi"}]});
    let (s, e) = post(&app, "/tokenize", both).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{e}");
    assert!(e["error"]["message"].as_str().unwrap().contains("not both"));
    let d = ok(&app, "/detokenize", json!({"tokens": ids})).await;
    assert_eq!(d["prompt"], PROMPT);
    let (s, e) = post(&app, "/detokenize", json!({"tokens": [99999999]})).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(e["error"]["param"], "tokens");
    let (s, _, text) = send(
        &app,
        Request::get("/tokenizer_info").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let info: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(info["eos_token"], "<|im_end|>");
    assert_eq!(info["bos_token"], "<|im_start|>");
    assert_eq!(info["add_bos_token"], false);
    assert!(info["chat_template"].as_str().unwrap().contains("im_start"));
}

/// A request with many choices keeps at most `REQUEST_WINDOW` jobs queued, so a request that
/// arrives while it runs is served in between instead of after all of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_with_many_choices_does_not_hold_up_others() {
    let (app, worker) = app_with(ServeConfig::default());
    let big = {
        let app = app.clone();
        tokio::spawn(async move {
            let body = json!({"prompt": ["Once upon a time", "The weather today", "In 1492",
                    "My favourite colour", "Dear diary", "Step one"],
                "n": 4, "max_tokens": 12, "temperature": 1.0, "seed": 1});
            let (status, v) = post(&app, "/v1/completions", body).await;
            assert_eq!(status, StatusCode::OK, "{v}");
            assert_eq!(v["choices"].as_array().unwrap().len(), 24);
            std::time::Instant::now()
        })
    };
    // Ask once the big request is under way: the model thread has taken its first job.
    common::wait_until_async(
        "the big request to start",
        std::time::Duration::from_secs(60),
        || async { worker.jobs_received() > 0 },
    )
    .await;
    let (status, v) = post(
        &app,
        "/generate",
        json!({"prompt": "The capital of France is", "max_tokens": 1}),
    )
    .await;
    let small_done = std::time::Instant::now();
    assert_eq!(status, StatusCode::OK, "{v}");
    let big_done = big.await.unwrap();
    assert!(
        small_done < big_done,
        "the single request waited for all 24 choices of the big one"
    );
}

#[tokio::test]
async fn chat_defaults_are_bounded_and_messages_checked() {
    // 512 tokens take most of a minute in a debug build on 2 busy cores.
    let app = app_with(unhurried()).0;
    // No max_tokens: the documented default bounds the generation (finish_reason `length`)
    // instead of running to the request timeout.
    let default = tokenscope::api::bounds::DEFAULT_CHAT_MAX_TOKENS;
    let doc: Value = serde_json::from_str(&api::docs::openapi_json()).unwrap();
    assert_eq!(
        doc["components"]["schemas"]["ChatRequest"]["properties"]["max_tokens"]["default"],
        json!(default),
        "the document states the default"
    );
    let b = ok(
        &app,
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": "List all integers from 1 to 5000, separated by commas."}],
               "temperature": 0}),
    )
    .await;
    assert_eq!(b["choices"][0]["finish_reason"], "length", "{b}");
    assert_eq!(b["usage"]["completion_tokens"], json!(default), "{b}");

    // A role no template knows, and content left out where OpenAI requires it: 422 naming
    // the messages.
    for (messages, says) in [
        (
            json!([{"role": "wizard", "content": "hi"}]),
            "role `wizard`",
        ),
        (
            json!([{"role": "user", "content": null}]),
            "needs `content`",
        ),
        (json!([{"role": "user"}]), "needs `content`"),
    ] {
        let (s, e) = post(
            &app,
            "/v1/chat/completions",
            json!({"messages": messages, "max_tokens": 1}),
        )
        .await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{messages}: {e}");
        let message = e["error"]["message"].as_str().unwrap();
        assert!(message.contains(says), "{message}");
        assert_eq!(e["error"]["param"], "messages", "{e}");
    }
    // An assistant's message may leave content out (OpenAI's rule: it may carry tool calls).
    ok(
        &app,
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": null},
                            {"role": "user", "content": "Hello?"}], "max_tokens": 1}),
    )
    .await;
}

#[tokio::test]
async fn the_served_document_requires_the_key_when_keys_are_on() {
    let security =
        |doc: &Value, path: &str, method: &str| doc["paths"][path][method]["security"].clone();
    let get_doc = |app: Router, key: Option<&'static str>| async move {
        let mut r = Request::get("/openapi.json");
        if let Some(k) = key {
            r = r.header(header::AUTHORIZATION, format!("Bearer {k}"));
        }
        let (s, _, text) = send(&app, r.body(Body::empty()).unwrap()).await;
        assert_eq!(s, StatusCode::OK, "{text}");
        serde_json::from_str::<Value>(&text).unwrap()
    };
    let open = get_doc(app(), None).await;
    assert_eq!(
        security(&open, "/v1/completions", "post"),
        json!([{}, {"bearer": []}])
    );
    let (keyed, _) = app_with(ServeConfig {
        api_keys: vec!["k1".into()],
        ..Default::default()
    });
    let doc = get_doc(keyed, Some("k1")).await;
    for (path, method) in [
        ("/v1/completions", "post"),
        ("/generate", "post"),
        ("/models", "get"),
    ] {
        assert_eq!(
            security(&doc, path, method),
            json!([{"bearer": []}]),
            "{path}"
        );
    }
}
