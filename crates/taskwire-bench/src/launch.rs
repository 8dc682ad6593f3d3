//! Starting, locating and stopping the servers under test.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::BenchError;

/// How long a server may take to print `listening on HOST:PORT`.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// A server the bench can start and measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum Target {
    /// The real server: `taskwire serve`.
    Taskwire,
    /// The same binary with least attained service throughout within a
    /// connection (`--las-threshold-ms` far beyond any task): the policy before
    /// the threshold, as a same-binary baseline.
    TaskwireLas,
    /// `baseline-raw-echo`: echoes every frame, the round-trip ceiling.
    RawEcho,
    /// `baseline-textbook`: spawn per request, mpsc writer, `spawn_blocking`.
    Textbook,
    /// `baseline-naive`: awaits each task before reading the next message.
    Naive,
}

impl Target {
    /// The name used in reports (the binary's name).
    pub fn name(self) -> &'static str {
        match self {
            Target::Taskwire => "taskwire",
            Target::TaskwireLas => "taskwire-las",
            Target::RawEcho => "baseline-raw-echo",
            Target::Textbook => "baseline-textbook",
            Target::Naive => "baseline-naive",
        }
    }

    /// Whether the server runs JSON-RPC tasks (the raw echo server does not).
    pub fn speaks_json_rpc(self) -> bool {
        !matches!(self, Target::RawEcho)
    }

    /// Whether it has `runaway` (the baselines do not: they get a long `spin`).
    pub fn has_runaway(self) -> bool {
        self.is_taskwire()
    }

    /// Whether it is the `taskwire` binary (whatever its flags).
    pub fn is_taskwire(self) -> bool {
        matches!(self, Target::Taskwire | Target::TaskwireLas)
    }

    fn binary(self) -> &'static str {
        if self.is_taskwire() {
            "taskwire"
        } else {
            self.name()
        }
    }

    fn args(self) -> &'static [&'static str] {
        match self {
            Target::Taskwire => &["serve", "--addr", "127.0.0.1:0"],
            // ~31 years of CPU: no task ever reaches it.
            Target::TaskwireLas => &[
                "serve",
                "--addr",
                "127.0.0.1:0",
                "--las-threshold-ms",
                "1000000000000",
            ],
            _ => &["--addr", "127.0.0.1:0"],
        }
    }
}

/// Where to look for server binaries: `--bin-dir`, else the directory of the
/// running executable (and its parent when that is a `deps/` directory, as for
/// test binaries).
pub fn bin_dirs(explicit: Option<&Path>) -> Vec<PathBuf> {
    if let Some(dir) = explicit {
        return vec![dir.to_path_buf()];
    }
    let mut dirs = Vec::new();
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(Path::to_path_buf))
    {
        if dir.file_name().is_some_and(|n| n == "deps") {
            if let Some(parent) = dir.parent() {
                dirs.push(parent.to_path_buf());
            }
        }
        dirs.push(dir);
    }
    dirs
}

/// Finds a target's binary in `dirs`.
pub fn locate(target: Target, dirs: &[PathBuf]) -> Result<PathBuf, BenchError> {
    dirs.iter()
        .map(|d| d.join(target.binary()))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            BenchError::BinaryNotFound(dirs.first().map_or_else(
                || PathBuf::from(target.binary()),
                |d| d.join(target.binary()),
            ))
        })
}

/// Where a started server's stderr goes.
#[derive(Debug, Clone)]
pub enum StderrTo {
    /// Discarded (the default: the bench's own output stays readable).
    Null,
    /// Passed through to the bench's stderr (`--server-logs`).
    Inherit,
    /// Written to this file (created or truncated), to be read afterwards.
    File(PathBuf),
}

/// Whether `target`'s binary lists `flag` in its `serve --help` (bounded to
/// 10 s): flags come and go between versions, and the bench measures any version.
pub async fn accepts_flag(path: &Path, target: Target, flag: &str) -> bool {
    let mut cmd = Command::new(path);
    if target.is_taskwire() {
        cmd.arg("serve");
    }
    cmd.arg("--help")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    match tokio::time::timeout(Duration::from_secs(10), cmd.output()).await {
        Ok(Ok(out)) => String::from_utf8_lossy(&out.stdout)
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
            .any(|word| word == flag),
        _ => false,
    }
}

/// A running server process, killed when dropped.
#[derive(Debug)]
pub struct ServerProcess {
    child: Child,
    /// The address it listens on.
    pub addr: SocketAddr,
    /// Its process id (for /proc).
    pub pid: u32,
}

impl ServerProcess {
    /// Starts `target` on 127.0.0.1:0 and waits (bounded) for its `listening on` line.
    pub async fn start(
        target: Target,
        dirs: &[PathBuf],
        server_logs: bool,
    ) -> Result<ServerProcess, BenchError> {
        let stderr = if server_logs {
            StderrTo::Inherit
        } else {
            StderrTo::Null
        };
        Self::start_with(target, dirs, &[], stderr).await
    }

    /// Like [`ServerProcess::start`], with `extra_args` after the target's own
    /// arguments and stderr sent where `stderr` says.
    pub async fn start_with(
        target: Target,
        dirs: &[PathBuf],
        extra_args: &[String],
        stderr: StderrTo,
    ) -> Result<ServerProcess, BenchError> {
        let path = locate(target, dirs)?;
        let name = target.name().to_string();
        let stderr = match stderr {
            StderrTo::Null => Stdio::null(),
            StderrTo::Inherit => Stdio::inherit(),
            StderrTo::File(file) => Stdio::from(std::fs::File::create(file)?),
        };
        let mut command = Command::new(&path);
        if target.is_taskwire() {
            // The scenarios run `spin`, `runaway` and `crash`, which the server
            // offers only on request. By variable rather than `--demo`: a
            // server from before that setting ignores it and still starts.
            command.env("TASKWIRE_DEMO", "true");
        }
        let mut child = command
            .args(target.args())
            .args(extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            // The servers must never outlive a bench that panics or is interrupted.
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| BenchError::Spawn {
                name: name.clone(),
                source,
            })?;
        let pid = child.id().ok_or_else(|| BenchError::ServerNotReady {
            name: name.clone(),
            reason: "exited at once".into(),
        })?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| BenchError::ServerNotReady {
                name: name.clone(),
                reason: "no stdout pipe".into(),
            })?;
        let mut lines = BufReader::new(stdout).lines();
        let ready = tokio::time::timeout(READY_TIMEOUT, async {
            while let Some(line) = lines.next_line().await? {
                if let Some(addr) = parse_listening(&line) {
                    return Ok(Some(addr));
                }
            }
            Ok::<_, std::io::Error>(None)
        })
        .await;
        let addr = match ready {
            Ok(Ok(Some(addr))) => addr,
            Ok(Ok(None)) => {
                return Err(BenchError::ServerNotReady {
                    name,
                    reason: "exited (or closed stdout) before printing `listening on`".into(),
                })
            }
            Ok(Err(e)) => return Err(BenchError::Io(e)),
            Err(_) => {
                return Err(BenchError::ServerNotReady {
                    name,
                    reason: format!("no `listening on` line within {READY_TIMEOUT:?}"),
                })
            }
        };
        if !crate::client::is_allowed_ip(addr.ip()) {
            return Err(BenchError::NonLoopback(addr.to_string()));
        }
        // Keep draining stdout so that a chatty server never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(ServerProcess { child, addr, pid })
    }

    /// The server's WebSocket URL.
    pub fn url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    /// Whether the process is still running (not exited, not a zombie).
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Sends SIGTERM and waits up to `bound` for the process to exit: how long
    /// it took and its exit code (`None` when killed by a signal), or `None`
    /// when it was still running at the bound (it is then killed with SIGKILL).
    pub async fn terminate(&mut self, bound: Duration) -> Option<(Duration, Option<i32>)> {
        let start = Instant::now();
        let pid = libc::pid_t::try_from(self.pid).ok()?;
        // SAFETY: kill has no memory preconditions; the pid is our own child,
        // not yet reaped (we hold its handle), so it cannot have been reused.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        match tokio::time::timeout(bound, self.child.wait()).await {
            Ok(Ok(status)) => Some((start.elapsed(), status.code())),
            _ => {
                let _ = self.child.start_kill();
                let _ = tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await;
                None
            }
        }
    }

    /// Kills the server and reaps it (bounded).
    pub async fn stop(mut self) {
        let _ = self.child.start_kill();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await;
    }
}

/// Parses the `listening on HOST:PORT` readiness line.
fn parse_listening(line: &str) -> Option<SocketAddr> {
    line.trim()
        .strip_prefix("listening on ")?
        .trim()
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_line() {
        assert_eq!(
            parse_listening("listening on 127.0.0.1:4000"),
            Some(SocketAddr::from(([127, 0, 0, 1], 4000)))
        );
        assert_eq!(
            parse_listening("  listening on 127.0.0.1:1\n").map(|a| a.port()),
            Some(1)
        );
        assert_eq!(parse_listening("starting up"), None);
        assert_eq!(parse_listening("listening on nowhere"), None);
    }

    #[test]
    fn missing_binary_is_reported() {
        let dirs = vec![PathBuf::from("/nonexistent-dir")];
        assert!(matches!(
            locate(Target::Taskwire, &dirs),
            Err(BenchError::BinaryNotFound(p)) if p.ends_with("taskwire")
        ));
    }
}
