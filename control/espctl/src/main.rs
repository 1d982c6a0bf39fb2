//! `espctl`: the control client of espd. For now it checks configuration
//! files; the runtime control socket comes with the live gateway.

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "espctl", version, about = "Control espd")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Check a configuration file (ip xfrm syntax): every error as FILE:LINE: why.
    Check { file: PathBuf },
}

fn main() -> ExitCode {
    match Cli::parse().cmd {
        Cmd::Check { file } => match espd_config::Config::load(&file) {
            Ok(c) => {
                println!("{}: ok: {}", file.display(), espd_config::summary(&c));
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::FAILURE
            }
        },
    }
}
