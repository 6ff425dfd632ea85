use std::process::ExitCode;

use clap::Parser;
use tokenscope::cli::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    tokenscope::logging::init();
    let result = match cli.command {
        Command::Inspect(args) => tokenscope::run_inspect(&args),
        Command::Openapi => {
            println!("{{}}");
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
