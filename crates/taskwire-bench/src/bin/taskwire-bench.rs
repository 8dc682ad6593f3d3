//! `taskwire-bench`: the benchmark suite as a standalone binary (the same as
//! `taskwire bench`), plus `taskwire-bench markdown` to regenerate
//! `docs/BENCHMARKS.md` from the JSON reports.
//!
//! ```text
//! taskwire-bench throughput --duration 10s --connections 8 --inflight 16 --json out.json
//! taskwire-bench markdown --dir artifacts/bench --out docs/BENCHMARKS.md
//! taskwire-bench markdown --hostile-before before.json --hostile-after after.json
//! ```

use std::path::PathBuf;

use clap::Parser;

#[derive(Parser)]
#[command(name = "taskwire-bench", about = "taskwire's benchmark suite")]
struct Cli {
    #[command(flatten)]
    bench: taskwire_bench::BenchArgs,
}

#[derive(Parser)]
#[command(
    name = "taskwire-bench markdown",
    about = "Regenerate the generated part of BENCHMARKS.md from JSON reports"
)]
struct MarkdownCli {
    /// Directory holding the JSON reports.
    #[arg(long, default_value = "artifacts/bench")]
    dir: PathBuf,
    /// The Markdown file to update (between its bench markers).
    #[arg(long, default_value = "docs/BENCHMARKS.md")]
    out: PathBuf,
    /// Instead: print the before/after table of the "Hostile clients" section
    /// from this `hostile` report (the figures before a change) ...
    #[arg(long, value_name = "JSON")]
    hostile_before: Option<PathBuf>,
    /// ... and this one (the same scenario rerun after it).
    #[arg(long, value_name = "JSON", requires = "hostile_before")]
    hostile_after: Option<PathBuf>,
}

fn main() {
    let mut argv: Vec<String> = std::env::args().collect();
    // `markdown` is not a scenario, so it is recognised before clap sees BenchArgs.
    if argv.get(1).is_some_and(|a| a == "markdown") {
        argv.remove(1);
        let cli = MarkdownCli::parse_from(argv);
        if let Some(before) = &cli.hostile_before {
            match taskwire_bench::hostile_table(before, cli.hostile_after.as_deref()) {
                Ok(table) => print!("{table}"),
                Err(e) => {
                    eprintln!("error: {e}");
                    std::process::exit(1);
                }
            }
            return;
        }
        if let Err(e) = taskwire_bench::write_markdown(&cli.dir, &cli.out) {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
        return;
    }
    let cli = Cli::parse_from(argv);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = runtime.block_on(taskwire_bench::run(cli.bench)) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
