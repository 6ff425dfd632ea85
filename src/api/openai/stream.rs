//! `stream: true`: server-sent events, one chunk per generated token with its log-probs, a last
//! chunk per choice with its `finish_reason`, optionally a usage chunk, then `data: [DONE]`.
//! A client that disconnects drops the stream, which drops the event receiver: the worker sees
//! it and stops generating for nobody.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use tokio::sync::mpsc;

use super::completions::Shape;
use super::error::{OpenAiError, OpenAiErrorBody, OpenAiErrorInfo};
use super::logprobs::{chat_token, LegacyBuilder};
use super::run;
use super::types::*;
use crate::api::AppState;
use crate::engine::worker::{ModelInfo, PromptInput, Reply, StreamEvent};
use crate::engine::{GenerateParams, GenerateResponse};

/// Turns a request's engine events into chunks (JSON texts).
trait Render: Send + 'static {
    /// Chunks before any event.
    fn start(&mut self) -> Vec<String>;
    fn event(&mut self, event: StreamEvent) -> Vec<String>;
    /// The last chunk(s) of choice `index`.
    fn finish(&mut self, index: usize, resp: &GenerateResponse) -> Vec<String>;
    fn usage(&self, usage: Usage) -> String;
}

/// The text of one choice sent so far. Text that may still change is held back: a trailing
/// U+FFFD (a character whose bytes are not all generated yet) and a suffix that could be the
/// start of a stop string (the engine cuts a matched stop string off).
#[derive(Default)]
struct Sent {
    /// The generated text as the job's events brought it.
    received: String,
    /// How much of it has been sent.
    sent: usize,
}

impl Sent {
    /// Takes a step's new text; returns what may be sent now: everything received and not yet
    /// sent, except a trailing incomplete character and a trailing prefix of a stop string
    /// (held back until the next steps show whether the stop string completes). Linear in the
    /// new text and the stop strings.
    fn delta(&mut self, appended: &str, stop: &[String]) -> String {
        self.received.push_str(appended);
        let rest = &self.received[self.sent..];
        let mut keep = rest.trim_end_matches('\u{fffd}').len();
        for s in stop {
            // The longest proper prefix of `s` that the text ends with.
            let held = s
                .char_indices()
                .map(|(i, _)| i)
                .skip(1)
                .filter(|&i| self.received.ends_with(&s[..i]))
                .max()
                .unwrap_or(0);
            keep = keep.min(rest.len().saturating_sub(held));
        }
        while !rest.is_char_boundary(keep) {
            keep -= 1;
        }
        let out = rest[..keep].to_string();
        self.sent += keep;
        out
    }

    /// Whatever of the final text has not been sent.
    fn rest(&mut self, final_text: &str) -> String {
        let out = final_text.get(self.sent..).unwrap_or_default().to_string();
        self.sent = final_text.len().max(self.sent);
        out
    }
}

fn json<T: Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_else(|_| "{}".into())
}

struct CompletionRender {
    shape: Shape,
    info: Arc<ModelInfo>,
    stop: Vec<String>,
    sent: Vec<Sent>,
    /// Characters of each choice's text so far (echo included), for `text_offset`.
    chars: Vec<usize>,
}

impl CompletionRender {
    fn chunk(
        &self,
        index: usize,
        text: String,
        logprobs: Option<CompletionLogprobs>,
        finish: Option<String>,
    ) -> String {
        json(&CompletionResponse {
            choices: vec![CompletionChoice {
                index,
                text,
                finish_reason: finish,
                logprobs,
            }],
            ..self.shape.response()
        })
    }

    fn echo_text(&mut self, index: usize) -> String {
        let text = self.shape.echo_texts[index / self.shape.n.max(1)].clone();
        self.chars[index] += text.chars().count();
        text
    }
}

impl Render for CompletionRender {
    fn start(&mut self) -> Vec<String> {
        // Echo without log-probs: the prompt's text first (with them, it comes scored).
        if !self.shape.echo || self.shape.logprobs.is_some() {
            return Vec::new();
        }
        (0..self.sent.len())
            .map(|i| {
                let text = self.echo_text(i);
                self.chunk(i, text, None, None)
            })
            .collect()
    }

    fn event(&mut self, event: StreamEvent) -> Vec<String> {
        let info = self.info.clone();
        let naming = self.shape.naming(&info);
        match event {
            StreamEvent::Prompt { index, tokens } => {
                let (Some(k), true) = (self.shape.logprobs, self.shape.echo) else {
                    return Vec::new();
                };
                let mut b = LegacyBuilder::new(naming);
                b.prompt(&tokens, k);
                let text = self.echo_text(index);
                vec![self.chunk(index, text, Some(b.out), None)]
            }
            StreamEvent::Step {
                index,
                step,
                appended,
            } => {
                let logprobs = self.shape.logprobs.map(|k| {
                    let mut b = LegacyBuilder::starting_at(naming, self.chars[index]);
                    b.step(&step, k);
                    b.out
                });
                let delta = self.sent[index].delta(&appended, &self.stop);
                self.chars[index] += delta.chars().count();
                vec![self.chunk(index, delta, logprobs, None)]
            }
        }
    }

    fn finish(&mut self, index: usize, resp: &GenerateResponse) -> Vec<String> {
        let rest = self.sent[index].rest(&resp.generated_text);
        let reason = run::finish_reason(resp.finish_reason);
        vec![self.chunk(index, rest, None, Some(reason))]
    }

    fn usage(&self, usage: Usage) -> String {
        json(&CompletionResponse {
            usage: Some(usage),
            ..self.shape.response()
        })
    }
}

/// Streams a completion request.
pub async fn completions(
    state: AppState,
    info: Arc<ModelInfo>,
    jobs: Vec<(PromptInput, GenerateParams)>,
    shape: Shape,
    include_usage: bool,
    deadline: Instant,
) -> Result<Response, OpenAiError> {
    let stop = jobs
        .first()
        .map(|(_, p)| p.stop.clone())
        .unwrap_or_default();
    let render = CompletionRender {
        sent: (0..jobs.len()).map(|_| Sent::default()).collect(),
        chars: vec![0; jobs.len()],
        shape,
        info,
        stop,
    };
    let n = render.shape.n;
    start(state, jobs, render, n, include_usage, deadline).await
}

/// What a chat stream needs to know.
pub struct ChatShape {
    pub id: String,
    pub created: u64,
    pub model: String,
    pub n: usize,
    /// Alternatives per token with `logprobs: true`.
    pub logprobs: Option<usize>,
}

impl ChatShape {
    fn chunk(&self, choice: ChatChunkChoice) -> ChatChunk {
        ChatChunk {
            id: self.id.clone(),
            object: "chat.completion.chunk".into(),
            created: self.created,
            model: self.model.clone(),
            choices: vec![choice],
            usage: None,
        }
    }
}

struct ChatRender {
    shape: ChatShape,
    info: Arc<ModelInfo>,
    stop: Vec<String>,
    sent: Vec<Sent>,
}

impl Render for ChatRender {
    fn start(&mut self) -> Vec<String> {
        (0..self.sent.len())
            .map(|index| {
                json(&self.shape.chunk(ChatChunkChoice {
                    index,
                    delta: ChatDelta {
                        role: Some("assistant".into()),
                        content: Some(String::new()),
                    },
                    logprobs: None,
                    finish_reason: None,
                }))
            })
            .collect()
    }

    fn event(&mut self, event: StreamEvent) -> Vec<String> {
        let StreamEvent::Step {
            index,
            step,
            appended,
        } = event
        else {
            return Vec::new();
        };
        let delta = self.sent[index].delta(&appended, &self.stop);
        let logprobs = self.shape.logprobs.map(|k| ChatLogprobs {
            content: vec![chat_token(&self.info.tokenizer, &step, k)],
        });
        vec![json(&self.shape.chunk(ChatChunkChoice {
            index,
            delta: ChatDelta {
                role: None,
                content: Some(delta),
            },
            logprobs,
            finish_reason: None,
        }))]
    }

    fn finish(&mut self, index: usize, resp: &GenerateResponse) -> Vec<String> {
        let rest = self.sent[index].rest(&resp.generated_text);
        vec![json(&self.shape.chunk(ChatChunkChoice {
            index,
            delta: ChatDelta {
                role: None,
                content: (!rest.is_empty()).then_some(rest),
            },
            logprobs: None,
            finish_reason: Some(run::finish_reason(resp.finish_reason)),
        }))]
    }

    fn usage(&self, usage: Usage) -> String {
        json(&ChatChunk {
            id: self.shape.id.clone(),
            object: "chat.completion.chunk".into(),
            created: self.shape.created,
            model: self.shape.model.clone(),
            choices: Vec::new(),
            usage: Some(usage),
        })
    }
}

/// Streams a chat request.
pub async fn chat(
    state: AppState,
    info: Arc<ModelInfo>,
    jobs: Vec<(PromptInput, GenerateParams)>,
    shape: ChatShape,
    include_usage: bool,
    deadline: Instant,
) -> Result<Response, OpenAiError> {
    let stop = jobs
        .first()
        .map(|(_, p)| p.stop.clone())
        .unwrap_or_default();
    let n = shape.n;
    let render = ChatRender {
        sent: (0..jobs.len()).map(|_| Sent::default()).collect(),
        shape,
        info,
        stop,
    };
    start(state, jobs, render, n, include_usage, deadline).await
}

enum Phase {
    Events,
    Finals,
    Done,
}

struct Streaming<R> {
    state: AppState,
    rx: mpsc::UnboundedReceiver<StreamEvent>,
    /// Each job's reply, in order, as it is queued (or why queueing it failed).
    replies: mpsc::UnboundedReceiver<Result<(usize, Reply), OpenAiError>>,
    responses: Vec<GenerateResponse>,
    render: R,
    pending: VecDeque<String>,
    phase: Phase,
    deadline: Instant,
    n: usize,
    include_usage: bool,
}

impl<R: Render> Streaming<R> {
    /// The next event's data, or None when the stream is over.
    async fn next(&mut self) -> Option<String> {
        loop {
            if let Some(data) = self.pending.pop_front() {
                return Some(data);
            }
            match self.phase {
                Phase::Done => return None,
                Phase::Events => {
                    match tokio::time::timeout_at(self.deadline.into(), self.rx.recv()).await {
                        Ok(Some(event)) => self.pending.extend(self.render.event(event)),
                        // Every job has dropped its sender: all have finished.
                        Ok(None) => self.phase = Phase::Finals,
                        Err(_) => self.fail(run::timeout(&self.state)),
                    }
                }
                Phase::Finals => match self.replies.recv().await {
                    Some(Err(e)) => self.fail(e),
                    Some(Ok((index, rx))) => {
                        let result = tokio::time::timeout_at(self.deadline.into(), rx).await;
                        match result {
                            Ok(Ok(Ok(resp))) => {
                                self.pending.extend(self.render.finish(index, &resp));
                                self.responses.push(resp);
                            }
                            Ok(Ok(Err(e))) => self.fail(run::worker_error(&self.state, e)),
                            Ok(Err(_)) => self.fail(run::worker_error(
                                &self.state,
                                crate::engine::worker::WorkerError::Stopped,
                            )),
                            Err(_) => self.fail(run::timeout(&self.state)),
                        }
                    }
                    None => {
                        if self.include_usage {
                            let usage = run::usage(&self.responses, self.n);
                            self.pending.push_back(self.render.usage(usage));
                        }
                        self.pending.push_back("[DONE]".into());
                        self.phase = Phase::Done;
                    }
                },
            }
        }
    }

    /// An error after the stream has started: one `{"error": ...}` event, then `[DONE]`.
    fn fail(&mut self, e: OpenAiError) {
        let inner = e.inner;
        let message = match inner.detail {
            crate::api::error::ErrorDetail::Message(m) => m,
            crate::api::error::ErrorDetail::Fields(_) => "invalid request".into(),
        };
        let body = OpenAiErrorBody {
            error: OpenAiErrorInfo {
                message,
                kind: "server_error".into(),
                param: e.param,
                code: inner.code.as_str().to_string(),
            },
        };
        self.pending.push_back(json(&body));
        self.pending.push_back("[DONE]".into());
        self.phase = Phase::Done;
    }
}

async fn start<R: Render>(
    state: AppState,
    jobs: Vec<(PromptInput, GenerateParams)>,
    mut render: R,
    n: usize,
    include_usage: bool,
    deadline: Instant,
) -> Result<Response, OpenAiError> {
    let (tx, rx) = mpsc::unbounded_channel();
    let (replies_tx, replies) = mpsc::unbounded_channel();
    let submitter = run::Submitter::new(&state, deadline);
    let mut jobs = jobs.into_iter().enumerate();
    // The first job is queued before the response starts, so that a full queue is an HTTP
    // error (503 OVERLOADED) as without `stream`; the others are queued while the stream
    // runs, so that its first token is sent as soon as it exists, not once every job of a
    // many-choice request has found room in the queue.
    if let Some((i, (prompt, params))) = jobs.next() {
        let reply = submitter.submit(i, prompt, params, Some(&tx)).await?;
        let _ = replies_tx.send(Ok((i, reply)));
    }
    let later = tx;
    tokio::spawn(async move {
        for (i, (prompt, params)) in jobs {
            let queued = submitter
                .submit(i, prompt, params, Some(&later))
                .await
                .map(|reply| (i, reply));
            let failed = queued.is_err();
            // A closed channel: the client has gone, and the stream with it.
            if replies_tx.send(queued).is_err() || failed {
                return;
            }
        }
    });
    // From here on only the jobs and the task queueing them hold senders: the channel closes
    // when the last job is done.
    let streaming = Streaming {
        pending: render.start().into(),
        state,
        rx,
        replies,
        responses: Vec::new(),
        render,
        phase: Phase::Events,
        deadline,
        n,
        include_usage,
    };
    let events = futures_util::stream::unfold(streaming, |mut s| async move {
        let data = s.next().await?;
        Some((Ok::<_, Infallible>(SseEvent::default().data(data)), s))
    });
    Ok(Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response())
}
