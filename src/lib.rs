//! tokenscope: exact next-token distributions of causal language models.
//!
//! `model` reads weights and tokenizers and runs the llama network (candle); `engine` turns
//! logits into distributions and generations; `cli` and `inspect` are the terminal front end.

pub mod api;
pub mod cli;
pub mod client;
pub mod engine;
pub mod eval;
pub mod inspect;
pub mod logging;
pub mod model;
pub mod serve;
pub mod system;
pub mod train;

use anyhow::Context;

/// `tokenscope inspect`.
pub fn run_inspect(args: &cli::InspectArgs) -> anyhow::Result<()> {
    if api::types::is_blank(&args.prompt) {
        anyhow::bail!("the prompt is empty");
    }
    if args.stop.len() > 4 {
        anyhow::bail!("at most 4 stop strings");
    }
    if args.targets.len() > api::types::MAX_TARGETS {
        anyhow::bail!("at most {} targets", api::types::MAX_TARGETS);
    }
    let mut source = model::resolve_source_at(
        args.model.model.as_deref(),
        args.model.checkpoint.as_deref(),
    )?;
    if let Some(base) = &args.model.base {
        source = source.on_base(model::ModelSource::parse(base)?)?;
    }
    let loaded = model::load(&source, &args.model.load_options())
        .with_context(|| format!("loading {}", source.display_name()))?;
    let ids = engine::tokenize(&loaded, &args.prompt)?;
    if let Some(other) = &args.compare {
        let source_b = model::resolve_source(Some(other))?;
        let b = model::load(&source_b, &args.model.load_options())
            .with_context(|| format!("loading {}", source_b.display_name()))?;
        let (all, first_row) = engine::compare::tokenize(
            &loaded.tokenizer,
            &args.prompt,
            args.continuation.as_deref(),
        )?;
        let (positions, summary) =
            engine::compare::compare_models(&loaded, &b, &all, first_row, args.top_k as usize)
                .map_err(|e| anyhow::anyhow!(e))?;
        if args.json {
            let body = serde_json::json!({
                "models": [loaded.name, b.name],
                "tokenizer": loaded.tokenizer.digest(),
                "tokens": all.len(),
                "positions": positions,
                "summary": summary,
            });
            println!("{}", serde_json::to_string_pretty(&body)?);
        } else {
            print!(
                "{}",
                inspect::render_compare(&loaded.name, &b.name, &positions, &summary, 20)
            );
        }
        return Ok(());
    }
    if args.tokenize {
        let pieces: Vec<&str> = ids
            .iter()
            .map(|&i| loaded.tokenizer.token_text(i))
            .collect();
        println!("{}", serde_json::json!({ "ids": ids, "tokens": pieces }));
        return Ok(());
    }
    if let Some(cont) = &args.continuation {
        let cont_ids = loaded.tokenizer.encode_without_special(cont)?;
        let scored = engine::generate::score_continuation(&loaded, &ids, &cont_ids)?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&scored)?);
        } else {
            print!("{}", inspect::render_scores(&args.prompt, cont, &scored));
        }
        return Ok(());
    }
    let mut params = args.params();
    for target in &mut params.targets {
        target.ids = loaded.tokenizer.encode_without_special(&target.text)?;
        if target.ids.is_empty() {
            anyhow::bail!("the target {:?} is empty after tokenization", target.text);
        }
    }
    if args.lens {
        params.lens = true;
        params.temperature = 0.0;
        params.max_tokens = 1;
        let resp = engine::generate(&loaded, &args.prompt, &ids, &params, &|| false)?;
        let body = api::lens::LensResponse {
            layers: resp.lens.unwrap_or_default(),
            metadata: resp.metadata.into(),
        };
        if args.json {
            println!("{}", serde_json::to_string_pretty(&body)?);
        } else {
            print!("{}", inspect::render_lens(&args.prompt, &body.layers));
        }
        return Ok(());
    }
    let resp = engine::generate(&loaded, &args.prompt, &ids, &params, &|| false)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&resp)?);
    } else {
        print!("{}", inspect::render(&args.prompt, &resp));
    }
    Ok(())
}
