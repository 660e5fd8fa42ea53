//! The `process_*` series, read from /proc on each scrape. The prometheus crate's own process
//! collector needs its `process` feature (and the procfs crate); what the dashboard needs is a
//! few lines of /proc.

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::IntGauge;

/// `process_*` metrics of the standard names (as the prometheus crate's process collector and
/// every official client export them), read from /proc/self on each scrape. Elsewhere than on
/// Linux it exports nothing.
#[derive(Clone)]
pub(super) struct ProcessCollector {
    resident_memory: IntGauge,
    virtual_memory: IntGauge,
    threads: IntGauge,
    open_fds: IntGauge,
    descs: Vec<Desc>,
}

impl ProcessCollector {
    pub(super) fn new() -> Result<ProcessCollector, prometheus::Error> {
        let resident_memory = IntGauge::new(
            "process_resident_memory_bytes",
            "Resident memory size in bytes.",
        )?;
        let virtual_memory = IntGauge::new(
            "process_virtual_memory_bytes",
            "Virtual memory size in bytes.",
        )?;
        let threads = IntGauge::new("process_threads", "Number of OS threads in the process.")?;
        let open_fds = IntGauge::new("process_open_fds", "Number of open file descriptors.")?;
        let descs = [&resident_memory, &virtual_memory, &threads, &open_fds]
            .iter()
            .flat_map(|g| g.desc().into_iter().cloned())
            .collect();
        Ok(ProcessCollector {
            resident_memory,
            virtual_memory,
            threads,
            open_fds,
            descs,
        })
    }
}

/// A `Name:   value` line of /proc/self/status, e.g. `VmRSS:  12345 kB` -> 12345.
fn status_field(status: &str, name: &str) -> Option<i64> {
    status
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

impl Collector for ProcessCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
            return Vec::new();
        };
        let mut families = Vec::new();
        // /proc/self/status gives memory in kB (KiB, whatever the page size).
        for (gauge, field, scale) in [
            (&self.resident_memory, "VmRSS", 1024),
            (&self.virtual_memory, "VmSize", 1024),
            (&self.threads, "Threads", 1),
        ] {
            if let Some(value) = status_field(&status, field) {
                gauge.set(value.saturating_mul(scale));
                families.extend(gauge.collect());
            }
        }
        if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
            // The count includes the descriptor read_dir itself holds open: subtract it.
            self.open_fds.set(fds.count().saturating_sub(1) as i64);
            families.extend(self.open_fds.collect());
        }
        families
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_fields_parse() {
        let status = "Name:\tworker\nVmSize:\t  123456 kB\nVmRSS:\t    2048 kB\nThreads:\t7\n";
        assert_eq!(status_field(status, "VmRSS"), Some(2048));
        assert_eq!(status_field(status, "VmSize"), Some(123456));
        assert_eq!(status_field(status, "Threads"), Some(7));
        assert_eq!(status_field(status, "VmSwap"), None);
    }
}
