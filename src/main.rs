use std::process::ExitCode;

use clap::Parser;
use tokenscope::cli::{Cli, Command, LogFormat};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let format = match &cli.command {
        Command::Serve(a) => a.log_format,
        _ => LogFormat::Text,
    };
    tokenscope::logging::init(format);
    // A misspelt kernel cap would otherwise be ignored silently: refuse it before any work.
    if let Err(e) = tokenscope::model::simd::requested() {
        eprintln!("error: {e}");
        return ExitCode::FAILURE;
    }
    let result = match cli.command {
        Command::Serve(args) => tokenscope::serve::run(args),
        Command::Inspect(args) => tokenscope::run_inspect(&args),
        Command::Train(args) => tokenscope::train::run(&args.options())
            .map(|_| ())
            .map_err(anyhow::Error::from),
        Command::Client(args) => tokenscope::client::run(&args),
        Command::Openapi => {
            println!("{}", tokenscope::api::docs::openapi_json());
            Ok(())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
