//! The model's own chat template (GGUF `tokenizer.chat_template`, or `chat_template` in a
//! Hugging Face `tokenizer_config.json`), rendered with minijinja the way `transformers`
//! renders it: `trim_blocks` and `lstrip_blocks`, Python string methods (`.strip()`,
//! `.startswith()`, ...), `raise_exception`, and `messages`, `add_generation_prompt`,
//! `bos_token`, `eos_token` in the context.

use minijinja::{Environment, ErrorKind, Value};
use serde::Serialize;

/// One chat message as the template sees it.
#[derive(Debug, Clone, Serialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    bos_token: String,
    eos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("chars", &self.source.len())
            .finish()
    }
}

/// Why a template could not be compiled or rendered (its own message for `raise_exception`).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TemplateError(String);

fn describe(e: minijinja::Error) -> TemplateError {
    match e.kind() {
        ErrorKind::InvalidOperation if e.detail().is_some() => {
            TemplateError(e.detail().unwrap_or_default().to_string())
        }
        _ => TemplateError(format!("chat template: {e}")),
    }
}

impl ChatTemplate {
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self, TemplateError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> Result<Value, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
            },
        );
        env.add_function("strftime_now", |format: String| {
            chrono::Utc::now().format(&format).to_string()
        });
        env.add_template_owned("chat", source.to_string())
            .map_err(describe)?;
        Ok(Self {
            env,
            source: source.to_string(),
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
        })
    }

    /// The template's source text.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The prompt text for `messages`; with `add_generation_prompt`, ending where the
    /// assistant's reply begins.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, TemplateError> {
        let template = self.env.get_template("chat").map_err(describe)?;
        template
            .render(minijinja::context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => self.bos_token,
                eos_token => self.eos_token,
            })
            .map_err(describe)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(role: &str, content: &str) -> ChatMessage {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }

    #[test]
    fn renders_like_transformers() {
        // ChatML as SmolLM2 ships it, with a Python string method and trimmed blocks.
        let t = ChatTemplate::new(
            "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'].strip() + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",
            "<|im_start|>",
            "<|im_end|>",
        )
        .unwrap();
        let out = t.render(&[msg("user", " Hi ")], true).unwrap();
        assert_eq!(
            out,
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn raise_exception_reports_the_templates_message() {
        let t = ChatTemplate::new(
            "{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversations must start with a user message') }}{% endif %}",
            "",
            "",
        )
        .unwrap();
        let e = t.render(&[msg("assistant", "x")], false).unwrap_err();
        assert_eq!(
            e.to_string(),
            "Conversations must start with a user message"
        );
    }
}
