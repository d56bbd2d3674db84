//! /proc readings: CPU time and RSS of process trees, box-wide CPU, and the foreign-load guard.

use std::collections::{BTreeSet, HashMap};
use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

/// Kernel clock ticks per second for /proc/*/stat times (USER_HZ; 100 on every Linux we run on).
pub const CLK_TCK: f64 = 100.0;

fn stat_fields(pid: u32) -> Option<Vec<u64>> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    // rest starts at field 3 (state); keep the numeric ones, state becomes 0
    Some(
        rest.split_whitespace()
            .map(|f| f.parse().unwrap_or(0))
            .collect(),
    )
}

fn children_map() -> HashMap<u32, Vec<u32>> {
    let mut kids: HashMap<u32, Vec<u32>> = HashMap::new();
    let Ok(dir) = fs::read_dir("/proc") else {
        return kids;
    };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        if let Some(f) = stat_fields(pid) {
            kids.entry(f[1] as u32).or_default().push(pid);
        }
    }
    kids
}

/// `roots` plus every live descendant.
pub fn tree(roots: &[u32]) -> Vec<u32> {
    let kids = children_map();
    let mut out = BTreeSet::new();
    let mut todo: Vec<u32> = roots.to_vec();
    while let Some(p) = todo.pop() {
        if out.insert(p) {
            if let Some(k) = kids.get(&p) {
                todo.extend(k);
            }
        }
    }
    out.into_iter()
        .filter(|p| Path::new(&format!("/proc/{p}")).exists())
        .collect()
}

/// utime+stime of these processes (all their threads), in ticks.
pub fn cpu_ticks(pids: &[u32]) -> u64 {
    pids.iter()
        .filter_map(|&p| stat_fields(p))
        .map(|f| f[11] + f[12])
        .sum()
}

/// This process's CPU plus that of its reaped children (wrk), in ticks.
pub fn own_ticks() -> u64 {
    stat_fields(std::process::id()).map_or(0, |f| f[11] + f[12] + f[13] + f[14])
}

/// Sum of VmRSS over these processes, kB.
pub fn rss_kb(pids: &[u32]) -> u64 {
    pids.iter()
        .filter_map(|p| fs::read_to_string(format!("/proc/{p}/status")).ok())
        .filter_map(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .sum()
}

/// Box busy ticks (user+nice+system+irq+softirq) and steal ticks from /proc/stat.
pub fn box_ticks() -> (u64, u64) {
    let s = fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<u64> = s
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    if v.len() < 8 {
        return (0, 0);
    }
    (v[0] + v[1] + v[2] + v[5] + v[6], v[7])
}

/// Reads a pid file (first token).
pub fn read_pidfile(path: &Path) -> Option<u32> {
    fs::read_to_string(path)
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Foreign-load accounting: everything the box did minus our servers, our load generators and us.
#[derive(Debug, Clone, Copy)]
pub struct Snap {
    at: Instant,
    boxt: u64,
    steal: u64,
    ours: u64,
    own: u64,
}

impl Snap {
    /// `ours` = every server / sidecar process tree we measure.
    pub fn take(ours: &[u32]) -> Snap {
        let (boxt, steal) = box_ticks();
        Snap {
            at: Instant::now(),
            boxt,
            steal,
            ours: cpu_ticks(ours),
            own: own_ticks(),
        }
    }

    /// (foreign cores, steal cores) averaged between `self` and `later`.
    pub fn foreign(&self, later: &Snap) -> (f64, f64) {
        let wall = later.at.duration_since(self.at).as_secs_f64().max(1e-3);
        let f = later.boxt as f64
            - self.boxt as f64
            - (later.ours as f64 - self.ours as f64)
            - (later.own as f64 - self.own as f64);
        (
            (f / CLK_TCK / wall).max(0.0),
            (later.steal - self.steal) as f64 / CLK_TCK / wall,
        )
    }
}

/// Waits (bounded by `max_wait`) until the foreign load over 1 s is below `quiet` cores.
/// Returns the seconds waited.
pub fn wait_quiet(ours: &dyn Fn() -> Vec<u32>, quiet: f64, max_wait: Duration) -> f64 {
    let t0 = Instant::now();
    let mut said = false;
    loop {
        let pids = ours();
        let a = Snap::take(&pids);
        std::thread::sleep(Duration::from_secs(1));
        let b = Snap::take(&pids);
        let (f, _) = a.foreign(&b);
        let waited = t0.elapsed();
        if f < quiet {
            if said {
                eprintln!("   (box quiet after {:.0} s)", waited.as_secs_f64());
            }
            return waited.as_secs_f64();
        }
        if waited > max_wait {
            eprintln!(
                "   !! box still busy after {:.0} s (foreign {f:.2} cores); measuring anyway",
                waited.as_secs_f64()
            );
            return waited.as_secs_f64();
        }
        if !said {
            eprintln!("   waiting for a quiet box: foreign load {f:.2} cores");
            said = true;
        }
    }
}

/// Median and (min, max) of a non-empty slice.
pub fn med(xs: &[f64]) -> Option<(f64, f64, f64)> {
    let mut v: Vec<f64> = xs.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let m = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    Some((m, v[0], v[n - 1]))
}

/// Percentile (0..=100) of sorted micros.
pub fn pct(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    f64::from(sorted[i.min(sorted.len() - 1)])
}
