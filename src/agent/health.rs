//! The agent's health, as the kubelet judges its node's: the container runtime answers
//! and works, and memory, disk and process IDs are not running out (the kubelet's
//! default hard eviction thresholds). An unhealthy agent bids for nothing and takes no
//! assignment; its heartbeat tells the node why.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::runtime::{labels, Runtime};
use crate::wire::AgentHealth;

/// How often the runtime is checked and the host sampled.
pub const CHECK_INTERVAL: Duration = Duration::from_secs(5);
/// A runtime check that takes longer fails. Podman answers slowly while it creates
/// or removes many containers (seconds per call on a loaded host), which is no
/// failure: only a runtime that refuses, errs or hangs this long is unhealthy (the
/// kubelet allows its runtime's relisting 3 minutes).
const CHECK_TIMEOUT: Duration = Duration::from_secs(60);

/// The kubelet's `memory.available<100Mi`.
const MIN_MEMORY_AVAILABLE: u64 = 100 << 20;
/// The kubelet's `nodefs.available<10%` and `nodefs.inodesFree<5%`, for the filesystem
/// of the agent's state directory (the pods' emptyDirs).
const MIN_DISK_AVAILABLE_PERCENT: u64 = 10;
const MIN_INODES_FREE_PERCENT: u64 = 5;
/// Process IDs: the kubelet has no default threshold; 10 % of `pid_max` left.
const MIN_PIDS_AVAILABLE_PERCENT: u64 = 10;

/// What the host has left.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HostSample {
    pub memory_available: u64,
    pub disk_available: u64,
    pub disk_total: u64,
    pub inodes_free: u64,
    pub inodes_total: u64,
    pub pids_in_use: u64,
    pub pid_max: u64,
}

/// Whether `part` is below `percent` of `whole` (a whole of 0 is unknown, not empty).
fn below_percent(part: u64, whole: u64, percent: u64) -> bool {
    whole > 0 && (part as u128) * 100 < (whole as u128) * percent as u128
}

/// Sets the pressure flags of `health` from a sample.
pub fn judge_pressure(sample: &HostSample, health: &mut AgentHealth) {
    health.memory_pressure = sample.memory_available < MIN_MEMORY_AVAILABLE;
    health.disk_pressure = below_percent(
        sample.disk_available,
        sample.disk_total,
        MIN_DISK_AVAILABLE_PERCENT,
    ) || below_percent(
        sample.inodes_free,
        sample.inodes_total,
        MIN_INODES_FREE_PERCENT,
    );
    health.pid_pressure = below_percent(
        sample.pid_max.saturating_sub(sample.pids_in_use),
        sample.pid_max,
        MIN_PIDS_AVAILABLE_PERCENT,
    );
}

/// Samples the host; `state_dir` names the filesystem of the pods' data.
pub fn sample(state_dir: &Path) -> std::io::Result<HostSample> {
    use std::os::unix::ffi::OsStrExt;
    let mut system = sysinfo::System::new();
    system.refresh_memory();
    let path = std::ffi::CString::new(state_dir.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // SAFETY: zeroed statvfs is a valid value for the call to fill in.
    let mut fs: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is a valid NUL-terminated string and `fs` a writable statvfs.
    if unsafe { libc::statvfs(path.as_ptr(), &mut fs) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let pid_max = std::fs::read_to_string("/proc/sys/kernel/pid_max")?
        .trim()
        .parse()
        .unwrap_or(0);
    // The fourth field of /proc/loadavg: runnable/total scheduling entities (threads,
    // which take process IDs too).
    let pids_in_use = std::fs::read_to_string("/proc/loadavg")?
        .split_whitespace()
        .nth(3)
        .and_then(|f| f.split_once('/'))
        .and_then(|(_, total)| total.parse().ok())
        .unwrap_or(0);
    #[allow(clippy::unnecessary_cast)] // statvfs field widths differ between platforms
    Ok(HostSample {
        memory_available: system.available_memory(),
        disk_available: fs.f_bavail as u64 * fs.f_frsize as u64,
        disk_total: fs.f_blocks as u64 * fs.f_frsize as u64,
        inodes_free: fs.f_favail as u64,
        inodes_total: fs.f_files as u64,
        pids_in_use,
        pid_max,
    })
}

/// Checks that the runtime answers and works: a ping, then a listing of this agent's
/// pods (which reads the runtime's state, as every operation does).
pub async fn check_runtime(runtime: Arc<dyn Runtime>, agent: String) -> Result<(), String> {
    let check = async {
        runtime.ping().await.map_err(|e| format!("ping: {e}"))?;
        runtime
            .list_pods(labels::AGENT, &agent)
            .await
            .map(drop)
            .map_err(|e| format!("listing pods: {e}"))
    };
    match tokio::time::timeout(CHECK_TIMEOUT, check).await {
        Ok(result) => result,
        Err(_) => Err(format!("no answer within {} s", CHECK_TIMEOUT.as_secs())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roomy() -> HostSample {
        HostSample {
            memory_available: 4 << 30,
            disk_available: 50 << 30,
            disk_total: 100 << 30,
            inodes_free: 500_000,
            inodes_total: 1_000_000,
            pids_in_use: 300,
            pid_max: 4_194_304,
        }
    }

    #[test]
    fn pressure_follows_the_kubelet_s_default_thresholds() {
        let mut health = AgentHealth::default();
        judge_pressure(&roomy(), &mut health);
        assert_eq!(health, AgentHealth::default());

        let tight = HostSample {
            memory_available: (100 << 20) - 1,
            disk_available: (10 << 30) - 1,
            pids_in_use: 4_194_304 - 400_000,
            ..roomy()
        };
        judge_pressure(&tight, &mut health);
        assert!(health.memory_pressure && health.disk_pressure && health.pid_pressure);

        let no_inodes = HostSample {
            inodes_free: 49_999,
            ..roomy()
        };
        judge_pressure(&no_inodes, &mut health);
        assert!(!health.memory_pressure && health.disk_pressure && !health.pid_pressure);
    }

    #[test]
    fn an_unknown_total_is_no_pressure_and_the_runtime_error_is_kept() {
        let mut health = AgentHealth {
            runtime_error: Some("ping: refused".into()),
            ..AgentHealth::default()
        };
        judge_pressure(
            &HostSample {
                memory_available: 1 << 30,
                ..HostSample::default()
            },
            &mut health,
        );
        assert!(!health.disk_pressure && !health.pid_pressure);
        assert_eq!(health.runtime_error.as_deref(), Some("ping: refused"));
    }

    #[test]
    fn this_host_can_be_sampled() {
        let sample = sample(Path::new("/")).expect("sample");
        assert!(sample.memory_available > 0 && sample.disk_total > 0 && sample.pid_max > 0);
        assert!(sample.pids_in_use > 0);
    }
}
