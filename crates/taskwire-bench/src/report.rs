//! The JSON report of one scenario run, its human summary, and the generated
//! part of `docs/BENCHMARKS.md`.

use std::fmt::Write as _;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::stats::{ratio, LatencySummary};
use crate::BenchError;

/// The markers between which `docs/BENCHMARKS.md` is regenerated.
pub const BEGIN_MARKER: &str = "<!-- bench:begin -->";
/// See [`BEGIN_MARKER`].
pub const END_MARKER: &str = "<!-- bench:end -->";

/// The report of one scenario run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    /// The scenario's name (`throughput`, `flood`, ...).
    pub scenario: String,
    /// The command line that produced it.
    pub command: String,
    /// When it started, `YYYY-MM-DDTHH:MM:SSZ`.
    pub date_utc: String,
    /// The same instant in seconds since the Unix epoch.
    pub unix_time: u64,
    /// The machine it ran on.
    pub machine: Machine,
    /// The scenario's parameters, as run.
    pub settings: serde_json::Map<String, serde_json::Value>,
    /// One entry per server measured, in run order.
    pub targets: Vec<TargetReport>,
    /// Ratios between servers for the scenario's headline metrics.
    pub comparisons: Vec<Comparison>,
    /// Caveats: caps applied, servers skipped, what a figure means.
    pub notes: Vec<String>,
}

/// The machine a report was measured on.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Machine {
    /// Logical CPUs available to the bench.
    pub nproc: usize,
    /// `model name` from /proc/cpuinfo.
    pub cpu_model: String,
    /// The kernel release.
    pub kernel: String,
    /// Total memory.
    pub mem_total_kib: u64,
    /// The bench process's open-file limit.
    pub open_file_limit: u64,
    /// The 1-minute load average when the run started: other work on the
    /// machine (builds, tests) shows here and makes figures noisier.
    #[serde(default)]
    pub load_avg_1m: f64,
}

/// Whether a server was measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Measured; the metrics are valid.
    Ok,
    /// Not measured (binary missing, scenario not applicable).
    Skipped,
    /// Started but the measurement failed; `reason` says why.
    Failed,
}

/// One server's figures in a scenario.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TargetReport {
    /// `taskwire`, `baseline-textbook`, ... or `external` for `--url`.
    pub target: String,
    /// Whether it was measured.
    pub status: Status,
    /// Why it was skipped or failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The figures, in display order.
    pub metrics: Vec<Metric>,
    /// Time series (e.g. the soak windows), scenario-specific.
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub series: serde_json::Value,
}

/// One named figure.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metric {
    /// What it measures, e.g. `echo p99`.
    pub name: String,
    /// The value.
    pub value: f64,
    /// Its unit, e.g. `ms`, `req/s`, `KiB`, `x`.
    pub unit: String,
}

/// `target`'s `metric` divided by `reference`'s.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Comparison {
    /// The metric compared.
    pub metric: String,
    /// The numerator's server.
    pub target: String,
    /// The denominator's server.
    pub reference: String,
    /// target / reference.
    pub ratio: f64,
}

impl TargetReport {
    /// An empty report for a measured server.
    pub fn ok(target: &str) -> Self {
        Self {
            target: target.to_string(),
            status: Status::Ok,
            reason: None,
            metrics: Vec::new(),
            series: serde_json::Value::Null,
        }
    }

    /// A server that was not measured, and why.
    pub fn not_run(target: &str, status: Status, reason: String) -> Self {
        Self {
            target: target.to_string(),
            status,
            reason: Some(reason),
            metrics: Vec::new(),
            series: serde_json::Value::Null,
        }
    }

    /// Adds a figure.
    pub fn metric(&mut self, name: &str, value: f64, unit: &str) {
        self.metrics.push(Metric {
            name: name.to_string(),
            value,
            unit: unit.to_string(),
        });
    }

    /// Adds `PREFIX p50`, `p99`, ... (ms) of a latency distribution; for an empty one
    /// only `PREFIX count` = 0.
    pub fn latency(&mut self, prefix: &str, summary: Option<&LatencySummary>, full: bool) {
        let Some(s) = summary else {
            self.metric(&format!("{prefix} count"), 0.0, "");
            return;
        };
        self.metric(&format!("{prefix} count"), s.count as f64, "");
        self.metric(&format!("{prefix} p50"), s.p50_ms, "ms");
        self.metric(&format!("{prefix} p99"), s.p99_ms, "ms");
        if full {
            self.metric(&format!("{prefix} p99.9"), s.p999_ms, "ms");
        }
        self.metric(&format!("{prefix} max"), s.max_ms, "ms");
    }

    /// The value of a metric by name.
    pub fn get(&self, name: &str) -> Option<f64> {
        self.metrics
            .iter()
            .find(|m| m.name == name)
            .map(|m| m.value)
    }
}

impl Report {
    /// Computes `target / reference` for `metrics` for every measured target
    /// other than `reference` (when both have the metric).
    pub fn compare(&mut self, reference: &str, metrics: &[&str]) {
        self.compare_excluding(reference, metrics, &[]);
    }

    /// Like [`Report::compare`], leaving out the targets in `exclude` (to avoid
    /// printing a ratio and its inverse).
    pub fn compare_excluding(&mut self, reference: &str, metrics: &[&str], exclude: &[&str]) {
        let Some(base) = self
            .targets
            .iter()
            .find(|t| t.target == reference && t.status == Status::Ok)
            .cloned()
        else {
            return;
        };
        for t in &self.targets {
            if t.target == reference
                || t.status != Status::Ok
                || exclude.contains(&t.target.as_str())
            {
                continue;
            }
            for &metric in metrics {
                if let (Some(a), Some(b)) = (t.get(metric), base.get(metric)) {
                    if let Some(r) = ratio(a, b) {
                        self.comparisons.push(Comparison {
                            metric: metric.to_string(),
                            target: t.target.clone(),
                            reference: reference.to_string(),
                            ratio: r,
                        });
                    }
                }
            }
        }
    }

    /// Writes the report as pretty JSON, creating the directory.
    pub fn write_json(&self, path: &Path) -> Result<(), BenchError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let text = serde_json::to_string_pretty(self)?;
        std::fs::write(path, text + "\n")?;
        Ok(())
    }

    /// A plain-text summary for a terminal.
    pub fn human_summary(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "== {} ({}; {} CPUs, {}; load average {:.2}) ==",
            self.scenario,
            self.date_utc,
            self.machine.nproc,
            self.machine.cpu_model,
            self.machine.load_avg_1m
        );
        for t in &self.targets {
            match t.status {
                Status::Ok => {
                    let _ = writeln!(out, "{}:", t.target);
                    for m in &t.metrics {
                        let _ =
                            writeln!(out, "  {:<42} {:>12} {}", m.name, fmt_num(m.value), m.unit);
                    }
                }
                _ => {
                    let _ = writeln!(
                        out,
                        "{}: {:?}: {}",
                        t.target,
                        t.status,
                        t.reason.as_deref().unwrap_or("")
                    );
                }
            }
        }
        if !self.comparisons.is_empty() {
            let _ = writeln!(out, "ratios:");
            for c in &self.comparisons {
                let _ = writeln!(
                    out,
                    "  {:<28} {} / {} = {}",
                    c.metric,
                    c.target,
                    c.reference,
                    fmt_ratio(c.ratio)
                );
            }
        }
        for n in &self.notes {
            let _ = writeln!(out, "note: {n}");
        }
        out
    }

    /// This report as a Markdown section: command, date, settings, one table with a
    /// column per server, the ratios, the notes.
    pub fn markdown(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "### `{}`\n", self.scenario);
        let _ = writeln!(out, "Command: `{}`  ", self.command);
        let _ = writeln!(
            out,
            "Measured: {} (load average {:.2} at start)  ",
            self.date_utc, self.machine.load_avg_1m
        );
        let settings: Vec<String> = self
            .settings
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let _ = writeln!(out, "Settings: {}\n", settings.join(", "));
        let measured: Vec<&TargetReport> = self
            .targets
            .iter()
            .filter(|t| t.status == Status::Ok)
            .collect();
        if !measured.is_empty() {
            let mut names: Vec<(String, String)> = Vec::new();
            for t in &measured {
                for m in &t.metrics {
                    if !names.iter().any(|(n, _)| n == &m.name) {
                        names.push((m.name.clone(), m.unit.clone()));
                    }
                }
            }
            let _ = write!(out, "| metric |");
            for t in &measured {
                let _ = write!(out, " {} |", t.target);
            }
            let _ = write!(out, "\n|---|");
            for _ in &measured {
                let _ = write!(out, "---:|");
            }
            out.push('\n');
            for (name, unit) in &names {
                let label = if unit.is_empty() || unit == name {
                    name.clone()
                } else {
                    format!("{name} ({unit})")
                };
                let _ = write!(out, "| {label} |");
                for t in &measured {
                    match t.get(name) {
                        Some(v) => {
                            let _ = write!(out, " {} |", fmt_num(v));
                        }
                        None => out.push_str(" – |"),
                    }
                }
                out.push('\n');
            }
            out.push('\n');
        }
        for t in self.targets.iter().filter(|t| t.status != Status::Ok) {
            let _ = writeln!(
                out,
                "- {} not measured ({:?}): {}",
                t.target,
                t.status,
                t.reason.as_deref().unwrap_or("")
            );
        }
        if !self.comparisons.is_empty() {
            let _ = writeln!(out, "\nRatios:\n");
            for c in &self.comparisons {
                let _ = writeln!(
                    out,
                    "- {}: {} / {} = **{}**",
                    c.metric,
                    c.target,
                    c.reference,
                    fmt_ratio(c.ratio)
                );
            }
        }
        if !self.notes.is_empty() {
            out.push('\n');
            for n in &self.notes {
                let _ = writeln!(out, "> {n}  ");
            }
        }
        out
    }
}

/// Numbers as people read them: integers without decimals, small values with 3
/// significant digits.
pub fn fmt_num(v: f64) -> String {
    if !v.is_finite() {
        return v.to_string();
    }
    let a = v.abs();
    if a >= 1000.0 || (v.fract() == 0.0 && a < 1e15) {
        format!("{v:.0}")
    } else if a >= 100.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

/// A ratio with three significant digits (tiny ratios matter: 0.00017 is not 0).
pub fn fmt_ratio(r: f64) -> String {
    if !r.is_finite() || r == 0.0 {
        return r.to_string();
    }
    let digits = (2 - r.abs().log10().floor() as i32).clamp(0, 12) as usize;
    format!("{r:.digits$}")
}

/// Reads every `*.json` report in `dir` (ordered by scenario) and splices their
/// Markdown between the markers of `out` (creating it if needed).
pub fn write_markdown(dir: &Path, out: &Path) -> Result<(), BenchError> {
    let mut reports = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "json") {
            let text = std::fs::read_to_string(&path)?;
            match serde_json::from_str::<Report>(&text) {
                Ok(r) => reports.push(r),
                Err(e) => eprintln!("skipping {}: not a bench report ({e})", path.display()),
            }
        }
    }
    let order = |name: &str| {
        crate::Scenario::ALL
            .iter()
            .position(|s| s.name() == name)
            .unwrap_or(usize::MAX)
    };
    reports.sort_by(|a, b| {
        order(&a.scenario)
            .cmp(&order(&b.scenario))
            .then(a.unix_time.cmp(&b.unix_time))
    });
    let generated = render_generated(&reports);
    let existing = std::fs::read_to_string(out).unwrap_or_default();
    let text = splice(&existing, &generated);
    if let Some(parent) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(out, text)?;
    Ok(())
}

fn render_generated(reports: &[Report]) -> String {
    let mut out = String::new();
    if let Some(first) = reports.first() {
        let m = &first.machine;
        let _ = writeln!(
            out,
            "Machine: {} CPUs ({}), {:.1} GiB RAM, Linux {}, open-file limit {}.  ",
            m.nproc,
            m.cpu_model,
            m.mem_total_kib as f64 / 1024.0 / 1024.0,
            m.kernel,
            m.open_file_limit
        );
        let _ = writeln!(
            out,
            "Generated from {} report(s) by `scripts/bench`; every figure below comes with the command that produced it.\n",
            reports.len()
        );
    } else {
        out.push_str("No reports yet: run `scripts/bench`.\n");
    }
    for r in reports {
        out.push_str(&r.markdown());
        out.push('\n');
    }
    out
}

/// Replaces what is between the markers in `existing` (or appends a marked
/// section when there are none).
fn splice(existing: &str, generated: &str) -> String {
    let block = format!("{BEGIN_MARKER}\n{generated}{END_MARKER}");
    match (existing.find(BEGIN_MARKER), existing.find(END_MARKER)) {
        (Some(b), Some(e)) if b < e => format!(
            "{}{}{}",
            &existing[..b],
            block,
            &existing[e + END_MARKER.len()..]
        ),
        _ if existing.trim().is_empty() => {
            format!("# taskwire benchmarks\n\n{block}\n")
        }
        _ => format!("{}\n\n{block}\n", existing.trim_end()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Report {
        let mut a = TargetReport::ok("taskwire");
        a.metric("req/s", 90_000.0, "req/s");
        a.metric("p99", 2.0, "ms");
        let mut b = TargetReport::ok("baseline-raw-echo");
        b.metric("req/s", 100_000.0, "req/s");
        b.metric("p99", 1.0, "ms");
        let c = TargetReport::not_run("baseline-naive", Status::Skipped, "not built".into());
        Report {
            scenario: "throughput".into(),
            command: "taskwire bench throughput".into(),
            date_utc: "2026-11-25T12:00:00Z".into(),
            unix_time: 0,
            machine: Machine {
                nproc: 2,
                cpu_model: "cpu".into(),
                kernel: "6".into(),
                mem_total_kib: 1024 * 1024,
                open_file_limit: 20_000,
                load_avg_1m: 0.5,
            },
            settings: serde_json::Map::new(),
            targets: vec![a, b, c],
            comparisons: vec![],
            notes: vec!["a note".into()],
        }
    }

    #[test]
    fn comparisons_divide_by_the_reference() {
        let mut r = sample();
        r.compare("baseline-raw-echo", &["req/s", "p99", "missing"]);
        assert_eq!(r.comparisons.len(), 2);
        assert_eq!(r.comparisons[0].metric, "req/s");
        assert_eq!(r.comparisons[0].target, "taskwire");
        assert!((r.comparisons[0].ratio - 0.9).abs() < 1e-12);
        assert!((r.comparisons[1].ratio - 2.0).abs() < 1e-12);
        // A reference that was not measured gives no ratios.
        let mut r = sample();
        r.compare("baseline-naive", &["req/s"]);
        assert!(r.comparisons.is_empty());
    }

    #[test]
    fn latency_metrics() {
        let mut t = TargetReport::ok("x");
        t.latency("echo", None, true);
        assert_eq!(t.get("echo count"), Some(0.0));
        assert_eq!(t.get("echo p99"), None);
        let s = LatencySummary {
            count: 3,
            min_ms: 1.0,
            mean_ms: 2.0,
            p50_ms: 2.0,
            p90_ms: 3.0,
            p99_ms: 3.0,
            p999_ms: 3.0,
            max_ms: 3.0,
        };
        t.latency("b", Some(&s), true);
        assert_eq!(t.get("b count"), Some(3.0));
        assert_eq!(t.get("b p99.9"), Some(3.0));
        assert_eq!(t.get("b max"), Some(3.0));
    }

    #[test]
    fn json_round_trip_and_summary() {
        let mut r = sample();
        r.compare("baseline-raw-echo", &["req/s"]);
        let text = serde_json::to_string(&r).unwrap_or_default();
        let back: Report = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(back.targets.len(), 3);
        assert_eq!(back.targets[2].status, Status::Skipped);
        let human = back.human_summary();
        assert!(human.contains("taskwire bench") || human.contains("throughput"));
        assert!(human.contains("0.900"));
        let md = back.markdown();
        assert!(md.contains("| req/s | 90000 | 100000 |"), "{md}");
        assert!(md.contains("baseline-naive not measured"));
    }

    #[test]
    fn splicing_keeps_hand_written_text() {
        let fresh = splice("", "X\n");
        assert!(fresh.contains(BEGIN_MARKER) && fresh.contains("X\n"));
        let existing = format!("intro\n{BEGIN_MARKER}\nold\n{END_MARKER}\noutro\n");
        let spliced = splice(&existing, "new\n");
        assert_eq!(
            spliced,
            format!("intro\n{BEGIN_MARKER}\nnew\n{END_MARKER}\noutro\n")
        );
        let appended = splice("just text", "new\n");
        assert!(appended.starts_with("just text\n\n"));
        assert!(appended.contains("new\n"));
    }

    #[test]
    fn numbers() {
        assert_eq!(fmt_num(123456.7), "123457");
        assert_eq!(fmt_num(42.0), "42");
        assert_eq!(fmt_num(123.45), "123.5");
        assert_eq!(fmt_num(1.2345), "1.23");
        assert_eq!(fmt_num(0.01234), "0.012");
        assert_eq!(fmt_ratio(0.000172), "0.000172");
        assert_eq!(fmt_ratio(1.2251), "1.23");
        assert_eq!(fmt_ratio(36.32), "36.3");
        assert_eq!(fmt_ratio(0.9), "0.900");
    }
}
