//! The standard `process_*` series (as every Prometheus client library
//! exports them, so that the usual dashboards and alerts work unchanged):
//! CPU seconds, resident and virtual memory, open and maximum file
//! descriptors, start time. Read from `/proc` at each scrape, on Linux only;
//! elsewhere they are not exported rather than exported as zeros.

#[cfg(not(target_os = "linux"))]
use prometheus_client::registry::Registry;

#[cfg(target_os = "linux")]
mod linux {
    use std::sync::atomic::{AtomicU64, Ordering};

    use prometheus_client::metrics::counter::Counter;
    use prometheus_client::metrics::gauge::Gauge;
    use prometheus_client::registry::Registry;

    /// Handles of the process series; [`ProcessMetrics::update`] refreshes them.
    pub(crate) struct ProcessMetrics {
        cpu: Counter<f64, AtomicU64>,
        resident: Gauge,
        virtual_memory: Gauge,
        open_fds: Gauge,
        max_fds: Gauge,
    }

    /// What `/proc/self/stat` tells, in the units of the metrics.
    #[derive(Debug, Default, PartialEq)]
    pub(super) struct Stat {
        pub cpu_seconds: f64,
        pub start_ticks: u64,
        pub virtual_bytes: u64,
        pub resident_pages: u64,
    }

    /// Parses `/proc/self/stat`. The command name (field 2) is in parentheses
    /// and may itself hold spaces and parentheses: fields are counted from
    /// the last `)`.
    pub(super) fn parse_stat(text: &str, ticks_per_second: f64) -> Option<Stat> {
        let rest = &text[text.rfind(')')? + 1..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        // `rest` starts at field 3 (state): field n is f[n - 3].
        let field = |n: usize| f.get(n - 3)?.parse::<u64>().ok();
        let utime = field(14)?;
        let stime = field(15)?;
        Some(Stat {
            cpu_seconds: (utime + stime) as f64 / ticks_per_second,
            start_ticks: field(22)?,
            virtual_bytes: field(23)?,
            resident_pages: field(24)?,
        })
    }

    /// The boot time in seconds since the Unix epoch (`btime` of `/proc/stat`).
    pub(super) fn parse_btime(text: &str) -> Option<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix("btime "))
            .and_then(|v| v.trim().parse().ok())
    }

    fn sysconf(name: libc::c_int, fallback: u64) -> u64 {
        // SAFETY: sysconf has no preconditions; it returns -1 on error.
        let v = unsafe { libc::sysconf(name) };
        if v > 0 {
            v as u64
        } else {
            fallback
        }
    }

    fn max_fds() -> Option<u64> {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes only into the struct it is given.
        let ok = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0;
        (ok && lim.rlim_cur != libc::RLIM_INFINITY).then_some(lim.rlim_cur)
    }

    impl ProcessMetrics {
        pub(crate) fn register(r: &mut Registry) -> ProcessMetrics {
            let m = ProcessMetrics {
                cpu: Counter::default(),
                resident: Gauge::default(),
                virtual_memory: Gauge::default(),
                open_fds: Gauge::default(),
                max_fds: Gauge::default(),
            };
            r.register(
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds",
                m.cpu.clone(),
            );
            r.register(
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
                m.resident.clone(),
            );
            r.register(
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes",
                m.virtual_memory.clone(),
            );
            r.register(
                "process_open_fds",
                "Number of open file descriptors",
                m.open_fds.clone(),
            );
            r.register(
                "process_max_fds",
                "Maximum number of open file descriptors",
                m.max_fds.clone(),
            );
            // The start time never changes: read once.
            let ticks = sysconf(libc::_SC_CLK_TCK, 100) as f64;
            let start = std::fs::read_to_string("/proc/self/stat")
                .ok()
                .and_then(|t| parse_stat(&t, ticks))
                .zip(
                    std::fs::read_to_string("/proc/stat")
                        .ok()
                        .and_then(|t| parse_btime(&t)),
                )
                .map(|(s, btime)| btime as f64 + s.start_ticks as f64 / ticks);
            if let Some(start) = start {
                let g: Gauge<f64, AtomicU64> = Gauge::default();
                g.set(start);
                r.register(
                    "process_start_time_seconds",
                    "Start time of the process since unix epoch in seconds",
                    g,
                );
            }
            m.update();
            m
        }

        /// Reads `/proc` (a few small files; scrapes are seconds apart).
        pub(crate) fn update(&self) {
            let ticks = sysconf(libc::_SC_CLK_TCK, 100) as f64;
            if let Some(s) = std::fs::read_to_string("/proc/self/stat")
                .ok()
                .and_then(|t| parse_stat(&t, ticks))
            {
                // Non-negative floats order as their bits do: never backwards.
                self.cpu
                    .inner()
                    .fetch_max(s.cpu_seconds.to_bits(), Ordering::Relaxed);
                let page = sysconf(libc::_SC_PAGESIZE, 4096);
                self.resident
                    .set(i64::try_from(s.resident_pages * page).unwrap_or(i64::MAX));
                self.virtual_memory
                    .set(i64::try_from(s.virtual_bytes).unwrap_or(i64::MAX));
            }
            if let Ok(d) = std::fs::read_dir("/proc/self/fd") {
                self.open_fds.set(d.count() as i64);
            }
            if let Some(m) = max_fds() {
                self.max_fds.set(i64::try_from(m).unwrap_or(i64::MAX));
            }
        }
    }
}

#[cfg(target_os = "linux")]
pub(crate) use linux::ProcessMetrics;

/// Not Linux: no `/proc` to read, so no `process_*` series.
#[cfg(not(target_os = "linux"))]
pub(crate) struct ProcessMetrics;

#[cfg(not(target_os = "linux"))]
impl ProcessMetrics {
    pub(crate) fn register(_: &mut Registry) -> ProcessMetrics {
        ProcessMetrics
    }
    pub(crate) fn update(&self) {}
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::linux::{parse_btime, parse_stat, Stat};

    #[test]
    fn stat_fields_are_counted_from_the_last_parenthesis() {
        // A command name with a space and a parenthesis of its own.
        let line = "4242 (tw (x) y) S 1 4242 4242 0 -1 4194560 900 0 0 0 250 50 0 0 20 0 8 0 \
                    12345 104857600 2560 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0";
        assert_eq!(
            parse_stat(line, 100.0),
            Some(Stat {
                cpu_seconds: 3.0,
                start_ticks: 12345,
                virtual_bytes: 104_857_600,
                resident_pages: 2560,
            })
        );
        assert_eq!(parse_stat("garbage", 100.0), None);
        assert_eq!(parse_stat("1 (x) S 1 2", 100.0), None);
    }

    #[test]
    fn boot_time_from_proc_stat() {
        let text = "cpu  1 2 3\nintr 5\nbtime 1764150000\nprocesses 9\n";
        assert_eq!(parse_btime(text), Some(1_764_150_000));
        assert_eq!(parse_btime("cpu 1\n"), None);
    }
}
