//! `doppel`: the coordinator and its command line. Only `--version` and `--help` exist so far;
//! `serve` and the policy commands arrive with the coordinator issue.

use clap::Parser;

/// doppel: compare a workload's live VM type with shadows on other types, under its real traffic.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {}

fn main() {
    let Cli {} = Cli::parse();
    println!(
        "doppel {}: no subcommands yet; see README.md",
        env!("CARGO_PKG_VERSION")
    );
}
