//! CPU time of processes, from `/proc/PID/stat` (`utime + stime`, every thread of the
//! process, in clock ticks). The generator reads its own through `/proc/self/stat`. Also the
//! resident set size of a process (`VmRSS` of `/proc/PID/status`), sampled during the window
//! by [`crate::resources`].
//!
//! Each process's CPU is also split by thread name (`/proc/PID/task/TID/comm`): the gateway's
//! `sqlite` store thread apart from its `tokio-rt-worker`s, to set beside the store's floor.
//!
//! Clock ticks are `USER_HZ`, which Linux fixes at 100 per second on every architecture it
//! exposes to user space (the kernel's own `HZ` may differ; `/proc` converts). So a reading
//! has 10 ms resolution: over a measured window of 10 s or more, well under 1 % of a core.

use std::collections::BTreeMap;
use std::io;
use std::time::Duration;

use serde::Serialize;

/// Clock ticks per second of `/proc/PID/stat`.
pub const USER_HZ: u64 = 100;

/// A process to measure: a name for the report and its pid (`None`: this process).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessSpec {
    pub name: String,
    pub pid: Option<u32>,
}

impl ProcessSpec {
    /// The generator itself.
    pub fn this_process() -> Self {
        Self {
            name: "loadtest".into(),
            pid: None,
        }
    }

    /// `NAME=PID`, e.g. `gateway=1234`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let (name, pid) = text
            .split_once('=')
            .ok_or_else(|| format!("{text:?}: expected NAME=PID"))?;
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(format!(
                "{text:?}: the name must be letters, digits, '-' or '_'"
            ));
        }
        let pid: u32 = pid
            .parse()
            .ok()
            .filter(|&p| p > 0)
            .ok_or_else(|| format!("{text:?}: the pid must be a positive integer"))?;
        Ok(Self {
            name: name.to_owned(),
            pid: Some(pid),
        })
    }

    fn stat_path(&self) -> String {
        match self.pid {
            Some(pid) => format!("/proc/{pid}/stat"),
            None => "/proc/self/stat".to_owned(),
        }
    }

    /// CPU time used so far (user + system, all threads).
    pub fn cpu_time(&self) -> io::Result<Duration> {
        let text = std::fs::read_to_string(self.stat_path())?;
        let ticks = parse_cpu_ticks(&text).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: unexpected format", self.stat_path()),
            )
        })?;
        Ok(ticks_to_duration(ticks))
    }
}

/// Threads read per process at most (a runaway process must not make a reading unbounded).
pub const MAX_THREADS: usize = 4_096;

impl ProcessSpec {
    fn task_dir(&self) -> String {
        match self.pid {
            Some(pid) => format!("/proc/{pid}/task"),
            None => "/proc/self/task".to_owned(),
        }
    }

    /// CPU time used so far by each thread name (user + system; threads of one name, like a
    /// runtime's workers, added up). A thread that ends while it is read is left out.
    pub fn thread_cpu(&self) -> io::Result<BTreeMap<String, Duration>> {
        let mut by_name = BTreeMap::new();
        for entry in std::fs::read_dir(self.task_dir())?.take(MAX_THREADS) {
            let dir = entry?.path();
            let (Ok(comm), Ok(stat)) = (
                std::fs::read_to_string(dir.join("comm")),
                std::fs::read_to_string(dir.join("stat")),
            ) else {
                continue;
            };
            if let Some(ticks) = parse_cpu_ticks(&stat) {
                *by_name
                    .entry(comm.trim().to_owned())
                    .or_insert(Duration::ZERO) += ticks_to_duration(ticks);
            }
        }
        Ok(by_name)
    }
}

impl ProcessSpec {
    fn status_path(&self) -> String {
        match self.pid {
            Some(pid) => format!("/proc/{pid}/status"),
            None => "/proc/self/status".to_owned(),
        }
    }

    /// Resident set size now, in kB (`VmRSS`: anonymous, file-backed and shared-memory pages
    /// resident; what grows when the process leaks).
    pub fn rss_kb(&self) -> io::Result<u64> {
        let text = std::fs::read_to_string(self.status_path())?;
        parse_vm_rss_kb(&text).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{}: no VmRSS line (a kernel thread, or a zombie)",
                    self.status_path()
                ),
            )
        })
    }
}

/// The `VmRSS:   41234 kB` line of a `/proc/PID/status` text, in kB (the kernel always
/// writes kB there).
pub fn parse_vm_rss_kb(status: &str) -> Option<u64> {
    let line = status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?;
    let mut words = line.split_ascii_whitespace();
    let kb: u64 = words.next()?.parse().ok()?;
    match words.next() {
        Some(unit) if unit.eq_ignore_ascii_case("kB") => Some(kb),
        _ => None,
    }
}

fn ticks_to_duration(ticks: u64) -> Duration {
    Duration::from_micros(ticks.saturating_mul(1_000_000 / USER_HZ))
}

/// `utime + stime` (fields 14 and 15) of a `/proc/PID/stat` line. The second field, the
/// command name in parentheses, may itself contain spaces and parentheses, so the fields are
/// counted from the *last* `)`.
pub fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    let mut fields = after_name.split_ascii_whitespace();
    // Fields after the name start at field 3 (state); utime is field 14, stime field 15.
    let utime: u64 = fields.nth(14 - 3)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    utime.checked_add(stime)
}

/// One process's CPU over the measured window.
#[derive(Debug, Clone, Serialize)]
pub struct ProcessCpu {
    pub name: String,
    /// `null` for the generator itself.
    pub pid: Option<u32>,
    /// CPU seconds used in the window (user + system).
    pub cpu_seconds: f64,
    /// Average cores busy: CPU seconds / window seconds.
    pub cores: f64,
    /// CPU µs per request answered in the window.
    pub us_per_request: Option<f64>,
    /// CPU µs per payment settled in the window (checkout, top-up).
    pub us_per_settled: Option<f64>,
    /// Why the process could not be measured (it exited, no permission).
    pub error: Option<String>,
    /// The same by thread name, largest first (threads of a name that were all gone by the
    /// window's end are not counted: their share of the process's figure is in no row).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub threads: Vec<ThreadCpu>,
}

/// The CPU of one process's threads of one name over the measured window.
#[derive(Debug, Clone, Serialize)]
pub struct ThreadCpu {
    pub name: String,
    pub cpu_seconds: f64,
    pub us_per_request: Option<f64>,
    pub us_per_settled: Option<f64>,
}

/// Per thread name, `after - before` (a name new in the window counts from zero), largest
/// first.
fn thread_deltas(
    before: &BTreeMap<String, Duration>,
    after: &BTreeMap<String, Duration>,
    per: impl Fn(Duration) -> (Option<f64>, Option<f64>),
) -> Vec<ThreadCpu> {
    let mut out: Vec<ThreadCpu> = after
        .iter()
        .map(|(name, &cpu)| {
            let cpu = cpu.saturating_sub(before.get(name).copied().unwrap_or(Duration::ZERO));
            let (us_per_request, us_per_settled) = per(cpu);
            ThreadCpu {
                name: name.clone(),
                cpu_seconds: cpu.as_secs_f64(),
                us_per_request,
                us_per_settled,
            }
        })
        .filter(|t| t.cpu_seconds > 0.0)
        .collect();
    out.sort_by(|a, b| b.cpu_seconds.total_cmp(&a.cpu_seconds));
    out
}

/// Readings taken at the start of the window: each process's CPU, and by thread name.
#[derive(Debug)]
pub struct Readings(
    Vec<(
        ProcessSpec,
        io::Result<Duration>,
        BTreeMap<String, Duration>,
    )>,
);

pub fn read_all(processes: &[ProcessSpec]) -> Readings {
    Readings(
        processes
            .iter()
            .map(|p| (p.clone(), p.cpu_time(), p.thread_cpu().unwrap_or_default()))
            .collect(),
    )
}

impl Readings {
    /// The CPU each process used between `self` and `now`, over `window`.
    pub fn since(
        self,
        now: Readings,
        window: Duration,
        answered: u64,
        settled: Option<u64>,
    ) -> Vec<ProcessCpu> {
        self.0
            .into_iter()
            .zip(now.0)
            .map(
                |((spec, before, threads_before), (_, after, threads_after))| {
                    let per = |count: u64, cpu: Duration| {
                        (count > 0).then(|| cpu.as_secs_f64() * 1e6 / count as f64)
                    };
                    match (before, after) {
                        (Ok(before), Ok(after)) => {
                            let cpu = after.saturating_sub(before);
                            let threads = thread_deltas(&threads_before, &threads_after, |cpu| {
                                (per(answered, cpu), settled.and_then(|s| per(s, cpu)))
                            });
                            ProcessCpu {
                                name: spec.name,
                                pid: spec.pid,
                                cpu_seconds: cpu.as_secs_f64(),
                                cores: if window.is_zero() {
                                    0.0
                                } else {
                                    cpu.as_secs_f64() / window.as_secs_f64()
                                },
                                us_per_request: per(answered, cpu),
                                us_per_settled: settled.and_then(|s| per(s, cpu)),
                                error: None,
                                threads,
                            }
                        }
                        (Err(e), _) | (_, Err(e)) => ProcessCpu {
                            name: spec.name,
                            pid: spec.pid,
                            cpu_seconds: 0.0,
                            cores: 0.0,
                            us_per_request: None,
                            us_per_settled: None,
                            error: Some(e.to_string()),
                            threads: Vec::new(),
                        },
                    }
                },
            )
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_parse_even_with_odd_command_names() {
        let plain =
            "1234 (gateway) S 1 1234 1234 0 -1 4194560 5000 0 0 0 250 75 0 0 20 0 8 0 100 0 0";
        assert_eq!(parse_cpu_ticks(plain), Some(325));
        let odd = "42 (a (weird) name) R 1 42 42 0 -1 0 0 0 0 0 7 3 0 0 20 0 1 0 5 0 0";
        assert_eq!(parse_cpu_ticks(odd), Some(10));
        assert_eq!(parse_cpu_ticks("42 (short) R 1 2"), None);
        assert_eq!(parse_cpu_ticks("no parenthesis"), None);
        assert_eq!(ticks_to_duration(325), Duration::from_millis(3_250));
    }

    #[test]
    fn this_process_can_be_read() {
        let me = ProcessSpec::this_process();
        let before = me.cpu_time().unwrap();
        // Burn a little CPU so the reading moves (without asserting on time).
        let mut x = 0u64;
        for i in 0..2_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        assert!(me.cpu_time().unwrap() >= before);
        let pid = std::process::id();
        let spec = ProcessSpec::parse(&format!("me={pid}")).unwrap();
        assert!(spec.cpu_time().is_ok());
    }

    #[test]
    fn rss_is_read_from_a_status_text() {
        let status = "Name:\tgateway\nUmask:\t0022\nState:\tS (sleeping)\nVmPeak:\t  812340 kB\nVmSize:\t  812340 kB\nVmHWM:\t   45120 kB\nVmRSS:\t   42188 kB\nRssAnon:\t   30000 kB\nThreads:\t9\n";
        assert_eq!(parse_vm_rss_kb(status), Some(42_188));
        // A kernel thread has no VmRSS line; a line without its unit is not trusted.
        assert_eq!(
            parse_vm_rss_kb("Name:\tkworker/0:1\nState:\tI (idle)\n"),
            None
        );
        assert_eq!(parse_vm_rss_kb("VmRSS:\t 12\n"), None);
        assert_eq!(parse_vm_rss_kb("VmRSS:\t x kB\n"), None);
        // This process has one.
        assert!(ProcessSpec::this_process().rss_kb().unwrap() > 0);
    }

    #[test]
    fn specs_parse() {
        assert_eq!(
            ProcessSpec::parse("redis-server=77"),
            Ok(ProcessSpec {
                name: "redis-server".into(),
                pid: Some(77)
            })
        );
        for bad in [
            "gateway",
            "=12",
            "gateway=",
            "gateway=0",
            "gateway=-1",
            "a b=1",
        ] {
            assert!(ProcessSpec::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn usage_per_request_is_cpu_over_count() {
        let spec = ProcessSpec::this_process();
        let threads = |worker_ms: u64, store_ms: u64| {
            BTreeMap::from([
                ("worker".to_owned(), Duration::from_millis(worker_ms)),
                ("store".to_owned(), Duration::from_millis(store_ms)),
            ])
        };
        let before = Readings(vec![(
            spec.clone(),
            Ok(Duration::from_millis(1_000)),
            threads(600, 400),
        )]);
        let after = Readings(vec![(
            spec,
            Ok(Duration::from_millis(3_000)),
            threads(2_100, 900),
        )]);
        let cpu = before.since(after, Duration::from_secs(4), 10_000, Some(4_000));
        assert_eq!(cpu[0].cpu_seconds, 2.0);
        assert_eq!(cpu[0].cores, 0.5);
        assert_eq!(cpu[0].us_per_request, Some(200.0));
        assert_eq!(cpu[0].us_per_settled, Some(500.0));
        // By thread, largest first: 1.5 s and 0.5 s of the 2.
        let names: Vec<&str> = cpu[0].threads.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["worker", "store"]);
        assert_eq!(cpu[0].threads[0].us_per_request, Some(150.0));
        assert_eq!(cpu[0].threads[1].us_per_settled, Some(125.0));
        let gone = Readings(vec![(
            ProcessSpec::this_process(),
            Err(io::Error::from(io::ErrorKind::NotFound)),
            BTreeMap::new(),
        )]);
        let before = Readings(vec![(
            ProcessSpec::this_process(),
            Ok(Duration::ZERO),
            BTreeMap::new(),
        )]);
        let cpu = before.since(gone, Duration::from_secs(1), 1, None);
        assert!(cpu[0].error.is_some());
        assert!(cpu[0].threads.is_empty());
    }

    #[test]
    fn thread_deltas_count_new_names_from_zero_and_drop_idle_ones() {
        let before = BTreeMap::from([
            ("idle".to_owned(), Duration::from_millis(50)),
            ("gone".to_owned(), Duration::from_millis(70)),
        ]);
        let after = BTreeMap::from([
            ("idle".to_owned(), Duration::from_millis(50)),
            ("born".to_owned(), Duration::from_millis(30)),
        ]);
        let out = thread_deltas(&before, &after, |_| (None, None));
        assert_eq!(out.len(), 1, "{out:?}");
        assert_eq!(out[0].name, "born");
        assert_eq!(out[0].cpu_seconds, 0.03);
    }

    #[test]
    fn this_process_threads_are_read_by_name() {
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let (ready, started) = std::sync::mpsc::channel::<()>();
        let named = std::thread::Builder::new()
            .name("lt-procstat".into())
            .spawn(move || {
                // The new thread names itself when it starts: read only after that.
                ready.send(()).unwrap();
                let _ = stopped.recv();
            })
            .unwrap();
        started.recv().unwrap();
        let threads = ProcessSpec::this_process().thread_cpu().unwrap();
        stop.send(()).unwrap();
        named.join().unwrap();
        assert!(threads.contains_key("lt-procstat"), "{threads:?}");
    }
}
