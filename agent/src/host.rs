//! Host figures through sysinfo: CPU utilization and memory.

use sysinfo::{CpuRefreshKind, MemoryRefreshKind, RefreshKind, System};

use capwatch_proto::v1::{HostInfo, HostSample};

pub struct Host {
    sys: System,
}

impl Host {
    pub fn new() -> Self {
        let sys = System::new_with_specifics(
            RefreshKind::nothing()
                .with_cpu(CpuRefreshKind::nothing().with_cpu_usage())
                .with_memory(MemoryRefreshKind::nothing().with_ram()),
        );
        Self { sys }
    }

    /// The machine's hostname, the default node id.
    pub fn hostname() -> Option<String> {
        System::host_name().filter(|h| !h.is_empty())
    }

    pub fn info(&self) -> HostInfo {
        HostInfo {
            hostname: Self::hostname().unwrap_or_default(),
            cpu_count: self.sys.cpus().len() as u32,
            memory_total_bytes: self.sys.total_memory(),
        }
    }

    /// CPU utilization since the previous call and memory now.
    pub fn sample(&mut self) -> HostSample {
        self.sys.refresh_cpu_usage();
        self.sys.refresh_memory();
        let cpu = self.sys.global_cpu_usage();
        HostSample {
            cpu_utilization_percent: cpu.is_finite().then_some(cpu),
            memory_used_bytes: Some(self.sys.used_memory()),
            memory_total_bytes: Some(self.sys.total_memory()),
        }
    }
}

impl Default for Host {
    fn default() -> Self {
        Self::new()
    }
}
