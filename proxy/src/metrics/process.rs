//! The standard `process_*` series, read from `/proc` at each scrape (Linux; elsewhere
//! they are left out).

use std::fs;

/// What a scrape reports about the process.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct Process {
    pub(crate) cpu_seconds: f64,
    pub(crate) resident_bytes: u64,
    pub(crate) virtual_bytes: u64,
    pub(crate) open_fds: u64,
    pub(crate) max_fds: Option<u64>,
    pub(crate) start_time_seconds: f64,
}

impl Process {
    /// The figures now, or `None` where `/proc` cannot be read.
    pub(crate) fn read() -> Option<Process> {
        let stat = fs::read_to_string("/proc/self/stat").ok()?;
        let boot = fs::read_to_string("/proc/stat").ok()?;
        let open_fds = fs::read_dir("/proc/self/fd").ok()?.count() as u64;
        let limits = fs::read_to_string("/proc/self/limits").unwrap_or_default();
        let ticks = rustix::param::clock_ticks_per_second() as f64;
        let page = rustix::param::page_size() as u64;
        Process::parse(&stat, &boot, &limits, ticks, page).map(|p| Process { open_fds, ..p })
    }

    /// The figures from the texts of `/proc/self/stat`, `/proc/stat` and
    /// `/proc/self/limits` (`open_fds` left at 0).
    fn parse(stat: &str, boot: &str, limits: &str, ticks: f64, page: u64) -> Option<Process> {
        // The command name (field 2) may hold spaces and parentheses: fields are counted
        // from after its closing parenthesis, field 3 first.
        let rest = &stat[stat.rfind(')')? + 1..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        let field = |n: usize| -> Option<u64> { f.get(n - 3)?.parse().ok() };
        let btime: u64 = boot
            .lines()
            .find_map(|l| l.strip_prefix("btime "))?
            .trim()
            .parse()
            .ok()?;
        let max_fds = limits
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .and_then(|l| l.split_whitespace().nth(3))
            .and_then(|v| v.parse().ok());
        Some(Process {
            cpu_seconds: (field(14)? + field(15)?) as f64 / ticks,
            start_time_seconds: btime as f64 + field(22)? as f64 / ticks,
            virtual_bytes: field(23)?,
            resident_bytes: field(24)? * page,
            open_fds: 0,
            max_fds,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_texts() {
        let stat = "4242 (l b) (x)) S 1 4242 4242 0 -1 4194560 300 0 0 0 150 50 0 0 20 0 3 0 \
                    1000 123456789 2000 18446744073709551615";
        let boot = "cpu  1 2 3\nbtime 1700000000\nprocesses 9\n";
        let limits = "Limit Soft Hard Units\nMax open files            1024                 \
                      4096                 files\n";
        let p = Process::parse(stat, boot, limits, 100.0, 4096).unwrap();
        assert_eq!(p.cpu_seconds, 2.0);
        assert_eq!(p.start_time_seconds, 1_700_000_010.0);
        assert_eq!(p.virtual_bytes, 123_456_789);
        assert_eq!(p.resident_bytes, 2000 * 4096);
        assert_eq!(p.max_fds, Some(1024));
    }

    #[test]
    fn reads_this_process() {
        let p = Process::read().expect("/proc is readable here");
        assert!(p.resident_bytes > 0 && p.open_fds > 0 && p.start_time_seconds > 1e9);
    }
}
