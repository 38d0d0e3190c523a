//! A background thread that samples, at a fixed interval, the group's committed offsets and the
//! log end offsets (→ lag) and the daemon's RSS and CPU time.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::world::{KafkaProbe, World, clock_ticks, proc_stats};

/// One sample; `t` in seconds since the phase's origin.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Sample {
    pub t: f64,
    /// Sum of the committed offsets over the 12 partitions.
    pub committed: i64,
    /// Sum of the log end offsets.
    pub end: i64,
    pub rss_bytes: u64,
    /// The daemon process's user + system CPU seconds since it started.
    pub cpu_seconds: f64,
}

impl Sample {
    pub fn lag(&self) -> i64 {
        (self.end - self.committed).max(0)
    }
}

pub struct Sampler {
    stop: Arc<AtomicBool>,
    pid: Arc<AtomicU32>,
    samples: Arc<Mutex<Vec<Sample>>>,
    handle: Option<JoinHandle<()>>,
}

impl Sampler {
    /// Starts sampling the daemon `pid` every `interval`, times relative to `origin`.
    pub fn start(
        world: &World,
        pid: u32,
        interval: Duration,
        origin: Instant,
    ) -> anyhow::Result<Sampler> {
        let probe = KafkaProbe::new(world)?;
        let stop = Arc::new(AtomicBool::new(false));
        let pid = Arc::new(AtomicU32::new(pid));
        let samples = Arc::new(Mutex::new(Vec::new()));
        let ticks = clock_ticks();
        let handle = {
            let (stop, pid, samples) = (stop.clone(), pid.clone(), samples.clone());
            std::thread::Builder::new()
                .name("e2e-sampler".into())
                .spawn(move || {
                    let mut next = Instant::now();
                    while !stop.load(Ordering::Relaxed) {
                        // A failed probe (broker busy) skips the sample rather than guessing.
                        if let (Ok(committed), Ok(end)) = (probe.committed(), probe.end()) {
                            let t = origin.elapsed().as_secs_f64();
                            let stats =
                                proc_stats(pid.load(Ordering::Relaxed), ticks).unwrap_or_default();
                            if let Ok(mut samples) = samples.lock() {
                                samples.push(Sample {
                                    t,
                                    committed,
                                    end,
                                    rss_bytes: stats.rss_bytes,
                                    cpu_seconds: stats.cpu_seconds,
                                });
                            }
                        }
                        next += interval;
                        let now = Instant::now();
                        if next > now {
                            std::thread::sleep(next - now);
                        } else {
                            next = now;
                        }
                    }
                })?
        };
        Ok(Sampler {
            stop,
            pid,
            samples,
            handle: Some(handle),
        })
    }

    /// Follows a restarted daemon.
    pub fn set_pid(&self, pid: u32) {
        self.pid.store(pid, Ordering::Relaxed);
    }

    /// The newest sample.
    pub fn latest(&self) -> Option<Sample> {
        self.samples.lock().ok().and_then(|s| s.last().copied())
    }

    /// Number of samples so far.
    pub fn len(&self) -> usize {
        self.samples.lock().map_or(0, |s| s.len())
    }

    /// Samples so far.
    pub fn snapshot(&self) -> Vec<Sample> {
        self.samples.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Stops the thread and returns every sample.
    pub fn stop(mut self) -> Vec<Sample> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
        self.snapshot()
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
