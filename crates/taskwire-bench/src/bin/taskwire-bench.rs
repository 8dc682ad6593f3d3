//! `taskwire-bench`: the benchmark suite as a standalone binary (the same as
//! `taskwire bench`), plus `taskwire-bench markdown` to regenerate
//! `docs/BENCHMARKS.md` from the JSON reports.
//!
//! ```text
//! taskwire-bench throughput --duration 10s --connections 8 --inflight 16 --json out.json
//! taskwire-bench markdown --dir artifacts/bench --out docs/BENCHMARKS.md
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
}

fn main() {
    let mut argv: Vec<String> = std::env::args().collect();
    // `markdown` is not a scenario, so it is recognised before clap sees BenchArgs.
    if argv.get(1).is_some_and(|a| a == "markdown") {
        argv.remove(1);
        let cli = MarkdownCli::parse_from(argv);
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
