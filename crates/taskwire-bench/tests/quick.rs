//! Starts the baseline servers on 127.0.0.1:0 and runs `--quick` scenarios
//! against them. Asserts structure and counts only: timings on a shared 2-core
//! machine are too noisy to assert.

use std::path::PathBuf;

use clap::Parser;
use taskwire_bench::report::{Report, Status};

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    bench: taskwire_bench::BenchArgs,
}

/// Cargo builds the crate's binaries for its integration tests and says where.
fn bin_dir() -> PathBuf {
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_baseline-raw-echo"));
    exe.parent().map(PathBuf::from).unwrap_or_default()
}

async fn quick(scenario: &str, targets: &str, json: &std::path::Path) -> Report {
    quick_from(&bin_dir(), scenario, targets, json).await
}

async fn quick_from(
    dir: &std::path::Path,
    scenario: &str,
    targets: &str,
    json: &std::path::Path,
) -> Report {
    let args = [
        "bench",
        scenario,
        "--quick",
        "--targets",
        targets,
        "--bin-dir",
        dir.to_str().unwrap_or("."),
        "--json",
        json.to_str().unwrap_or("report.json"),
    ];
    let cli = Cli::try_parse_from(args).unwrap_or_else(|e| panic!("{e}"));
    let run = tokio::time::timeout(
        std::time::Duration::from_secs(120),
        taskwire_bench::run(cli.bench),
    );
    run.await
        .unwrap_or_else(|_| panic!("{scenario} did not finish in 120 s"))
        .unwrap_or_else(|e| panic!("{scenario}: {e}"));
    let text = std::fs::read_to_string(json).unwrap_or_else(|e| panic!("{e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}"))
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("taskwire-bench-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quick_throughput_against_the_baselines() {
    let dir = temp_dir("throughput");
    let report = quick("throughput", "raw-echo,textbook", &dir.join("t.json")).await;
    assert_eq!(report.scenario, "throughput");
    assert_eq!(report.targets.len(), 2);
    for t in &report.targets {
        assert_eq!(t.status, Status::Ok, "{}: {:?}", t.target, t.reason);
        assert!(t.get("req/s").is_some_and(|v| v > 0.0), "{t:?}");
        assert!(t.get("replies").is_some_and(|v| v > 0.0), "{t:?}");
        assert_eq!(t.get("unmatched ids"), Some(0.0), "{t:?}");
        assert_eq!(t.get("error replies"), Some(0.0), "{t:?}");
        let (p50, p99, max) = (t.get("p50"), t.get("p99"), t.get("max"));
        assert!(p50 <= p99 && p99 <= max, "{t:?}");
    }
    assert!(report
        .comparisons
        .iter()
        .any(|c| c.target == "baseline-textbook"
            && c.reference == "baseline-raw-echo"
            && c.metric == "req/s"));
    // The Markdown generator reads the same report back.
    let md = dir.join("BENCHMARKS.md");
    taskwire_bench::write_markdown(&dir, &md).unwrap_or_else(|e| panic!("{e}"));
    let text = std::fs::read_to_string(&md).unwrap_or_default();
    assert!(text.contains("### `throughput`") && text.contains("baseline-textbook"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quick_fairness_against_the_baselines() {
    let dir = temp_dir("fairness");
    let report = quick("fairness", "raw-echo,textbook", &dir.join("f.json")).await;
    assert_eq!(report.scenario, "fairness");
    assert_eq!(report.targets.len(), 2);
    // The raw echo server runs no tasks: skipped, with a reason.
    assert_eq!(report.targets[0].target, "baseline-raw-echo");
    assert_eq!(report.targets[0].status, Status::Skipped);
    let t = &report.targets[1];
    assert_eq!(t.target, "baseline-textbook");
    assert_eq!(t.status, Status::Ok, "{:?}", t.reason);
    assert!(t.get("burst solo").is_some_and(|v| v > 0.0), "{t:?}");
    assert!(t.get("burst under flood").is_some_and(|v| v > 0.0), "{t:?}");
    assert!(t.get("burst slowdown").is_some(), "{t:?}");
    assert_eq!(t.get("burst error replies"), Some(0.0), "{t:?}");
    assert_eq!(
        report.settings.get("B_burst_count"),
        Some(&serde_json::json!(5))
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_server_is_skipped_not_fatal() {
    let dir = temp_dir("missing");
    // An empty --bin-dir: no server binary there.
    let report = quick_from(&dir, "throughput", "taskwire", &dir.join("m.json")).await;
    assert_eq!(report.targets.len(), 1);
    assert_eq!(report.targets[0].status, Status::Skipped);
    assert!(report.targets[0]
        .reason
        .as_deref()
        .is_some_and(|r| r.contains("not found")));
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn non_loopback_urls_are_refused() {
    let cli = Cli::try_parse_from(["bench", "throughput", "--url", "ws://10.1.2.3:80/ws"])
        .unwrap_or_else(|e| panic!("{e}"));
    let err = taskwire_bench::run(cli.bench).await;
    assert!(
        matches!(err, Err(taskwire_bench::BenchError::NonLoopback(_))),
        "{err:?}"
    );
}

/// The hostile scenario against the `taskwire` binary of the workspace's own
/// build, found next to this crate's binaries (a test cannot ask cargo to build
/// another crate's binary; without one the run must report it skipped).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quick_hostile_against_taskwire() {
    let dir = temp_dir("hostile");
    let bins = bin_dir();
    let report = quick_from(&bins, "hostile", "taskwire,raw-echo", &dir.join("h.json")).await;
    assert_eq!(report.scenario, "hostile");
    assert_eq!(report.targets.len(), 2);
    assert_eq!(report.targets[1].target, "baseline-raw-echo");
    assert_eq!(report.targets[1].status, Status::Skipped);
    let t = &report.targets[0];
    if !bins.join("taskwire").is_file() {
        assert_eq!(t.status, Status::Skipped, "{t:?}");
        eprintln!(
            "no taskwire binary in {}: build it to run the attacks",
            bins.display()
        );
        return;
    }
    assert_eq!(t.status, Status::Ok, "{:?}", t.reason);
    let attacks = t.series.as_array().cloned().unwrap_or_default();
    let names: Vec<&str> = attacks
        .iter()
        .filter_map(|a| a.get("name").and_then(|n| n.as_str()))
        .collect();
    for name in [
        "batch",
        "pongs",
        "huge ids",
        "amplification",
        "amplification, rate limited",
        "half-sent requests",
        "shutdown",
        "cpu slots",
        "cross-site",
        "log injection",
        "memory after",
    ] {
        assert!(names.contains(&name), "{name} missing from {names:?}");
    }
    // Outcomes differ between server versions; that each was measured does not.
    for memory in [
        "batch",
        "pongs",
        "huge ids",
        "amplification",
        "half-sent requests",
    ] {
        let peak = t.get(&format!("{memory}: RSS peak"));
        let before = t.get(&format!("{memory}: RSS before"));
        assert!(
            peak.is_some_and(|p| p > 0.0) && peak >= before,
            "{memory}: {t:?}"
        );
    }
    assert_eq!(
        t.get("half-sent requests: requests opened"),
        Some(50.0),
        "{t:?}"
    );
    assert_eq!(
        t.get("cpu slots: runaway requests sent"),
        Some(16.0),
        "{t:?}"
    );
    assert!(t.get("shutdown: exited after SIGTERM").is_some(), "{t:?}");
    let kill = t.get("cross-site: cross-site POST kill: status");
    assert!(kill.is_some_and(|s| (100.0..600.0).contains(&s)), "{t:?}");
    assert!(
        t.get("log injection: longest log line")
            .is_some_and(|n| n > 0.0),
        "{t:?}"
    );
    // The before/after table reads the same report back, with an empty after column.
    let table =
        taskwire_bench::hostile_table(&dir.join("h.json"), None).unwrap_or_else(|e| panic!("{e}"));
    assert!(table.contains("| batch | RSS peak (MiB) |"), "{table}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn hostile_refuses_an_external_server() {
    let cli = Cli::try_parse_from(["bench", "hostile", "--url", "ws://127.0.0.1:9/ws"])
        .unwrap_or_else(|e| panic!("{e}"));
    let err = taskwire_bench::run(cli.bench).await;
    assert!(
        matches!(err, Err(taskwire_bench::BenchError::InvalidArgs(_))),
        "{err:?}"
    );
}
