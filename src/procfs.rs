//! What the process uses, read from Linux's `/proc/self`: the figures of
//! the standard `process_*` metrics.

/// One reading of the process's resources.
#[derive(Debug, Clone, Copy)]
pub struct ProcessStats {
    /// User plus system CPU time, seconds.
    pub cpu_seconds: f64,
    /// Resident memory, bytes.
    pub resident_bytes: u64,
    /// Virtual memory, bytes.
    pub virtual_bytes: u64,
    /// Open descriptors.
    pub open_fds: u64,
    /// The soft open-file limit.
    pub max_fds: Option<u64>,
    /// When the process started, seconds since the Unix epoch.
    pub start_time_seconds: f64,
}

/// Reads the process's figures; `None` where `/proc` is not there (not
/// Linux) or unreadable.
#[cfg(not(unix))]
pub fn read_self() -> Option<ProcessStats> {
    None
}

/// Reads the process's figures; `None` where `/proc` is not there (not
/// Linux) or unreadable.
#[cfg(unix)]
pub fn read_self() -> Option<ProcessStats> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    // The command name may hold spaces and parentheses: fields count from
    // after its closing one. utime and stime are fields 14 and 15.
    let after = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok());
    let (utime, stime, start_ticks) = (ticks(11)?, ticks(12)?, ticks(19)?);
    let boot = std::fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse::<u64>()
        .ok()?;
    let mut pages = statm.split_whitespace().map(|v| v.parse::<u64>().ok());
    let (size, resident) = (pages.next()??, pages.next()??);
    // SAFETY: sysconf only reads a configuration value.
    let (hz, page) = unsafe {
        (
            libc::sysconf(libc::_SC_CLK_TCK),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    let hz = u64::try_from(hz).ok().filter(|h| *h > 0)?;
    let page = u64::try_from(page).ok().filter(|p| *p > 0)?;
    let open_fds = std::fs::read_dir("/proc/self/fd").ok()?.count() as u64;
    Some(ProcessStats {
        cpu_seconds: (utime + stime) as f64 / hz as f64,
        resident_bytes: resident * page,
        virtual_bytes: size * page,
        open_fds,
        max_fds: max_fds(),
        start_time_seconds: boot as f64 + start_ticks as f64 / hz as f64,
    })
}

#[cfg(unix)]
fn max_fds() -> Option<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct passed by pointer, which lives
    // on this stack frame.
    (unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0).then_some(lim.rlim_cur)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_process_reads_its_own_figures() {
        let read = read_self();
        #[cfg(target_os = "linux")]
        let p = read.expect("/proc/self is readable on Linux");
        #[cfg(not(target_os = "linux"))]
        let Some(p) = read
        else {
            return;
        };
        assert!(p.resident_bytes > 0 && p.virtual_bytes >= p.resident_bytes);
        assert!(p.open_fds >= 3);
        assert!(p.cpu_seconds >= 0.0);
        assert!(p.max_fds.is_some_and(|m| m >= p.open_fds));
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        // Started before now, and not before this test binary could have.
        assert!(p.start_time_seconds <= now + 1.0, "{p:?}");
        assert!(p.start_time_seconds > now - 3600.0, "{p:?}");
    }
}
