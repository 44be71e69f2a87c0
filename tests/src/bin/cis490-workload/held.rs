//! The start and end the benchmark workloads (`storm`, `wakeburn`) share.

use std::path::PathBuf;
use std::thread;
use std::time::Duration;

use anyhow::Result;
use clap::Args;
use serde::Serialize;

use crate::report::write_json_atomic;
use crate::signals::ready_then_wait;

/// A benchmark workload's start and end: held until SIGUSR1 (optionally),
/// then a report, then a linger.
#[derive(Args, Debug)]
pub struct Held {
    /// Write PATH.ready and wait for SIGUSR1 before the work.
    #[arg(long)]
    wait_signal: bool,
    /// With --wait-signal: give up (error, exit code 2) if no SIGUSR1 arrives within this
    /// many ms; 0 waits forever.
    #[arg(long, value_name = "MS", default_value_t = 60_000)]
    timeout_ms: u64,
    /// Sleep this long after writing the report, before exiting.
    #[arg(long, value_name = "MS", default_value_t = 0)]
    linger_ms: u64,
    /// Where to write the JSON report; the ready file is PATH.ready.
    #[arg(long, value_name = "PATH")]
    out: PathBuf,
}

impl Held {
    /// With --wait-signal: writes PATH.ready and waits for SIGUSR1.
    pub fn start(&self) -> Result<()> {
        if self.wait_signal {
            ready_then_wait(&self.out, self.timeout_ms)?;
        }
        Ok(())
    }

    /// Writes the report, then lingers.
    pub fn finish(&self, report: &impl Serialize) -> Result<()> {
        write_json_atomic(&self.out, report)?;
        thread::sleep(Duration::from_millis(self.linger_ms));
        Ok(())
    }
}
