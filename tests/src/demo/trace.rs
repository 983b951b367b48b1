//! The demo's traffic shape: a stretch of the WorldCup98 per-minute request trace, time
//! compressed (one trace minute per schedule step) and scaled so its peak is a chosen rate.

use std::path::Path;

/// One stretch of the trace.
#[derive(Debug, Clone)]
pub struct Stretch {
    /// Timestamp of the first minute, as the trace writes it.
    pub start: String,
    /// Requests per minute, one per minute.
    pub counts: Vec<f64>,
}

impl Stretch {
    /// Reads `minutes` rows from `csv` (columns `timestamp,num_request,size`) starting at the
    /// row whose timestamp is `start`.
    pub fn read(csv: &Path, start: &str, minutes: usize) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(csv)
            .map_err(|e| anyhow::anyhow!("reading the trace {}: {e}", csv.display()))?;
        let mut rows = text.lines().skip(1).skip_while(|l| !l.starts_with(start));
        let mut counts = Vec::with_capacity(minutes);
        for (i, line) in rows.by_ref().take(minutes).enumerate() {
            let count = line
                .split(',')
                .nth(1)
                .and_then(|c| c.trim().parse::<f64>().ok())
                .ok_or_else(|| {
                    anyhow::anyhow!("{}: row {i} after {start}: no request count", csv.display())
                })?;
            counts.push(count);
        }
        anyhow::ensure!(
            counts.len() == minutes,
            "{}: {} rows from {start}, {minutes} wanted",
            csv.display(),
            counts.len()
        );
        Ok(Self {
            start: start.to_owned(),
            counts,
        })
    }

    /// A stand-in with the WorldCup98 stretch's shape (a fifth of the peak for the first
    /// fifth, a rise to the peak at 70 % of the way, a fall to a third), for machines without
    /// the trace files.
    pub fn synthetic(minutes: usize) -> Self {
        let n = minutes.max(1) as f64;
        let counts = (0..minutes)
            .map(|i| {
                let x = i as f64 / n;
                if x < 0.2 {
                    0.2
                } else if x < 0.7 {
                    0.2 + 0.8 * ((x - 0.2) / 0.5).powf(1.5)
                } else {
                    1.0 - 0.65 * ((x - 0.7) / 0.3).min(1.0)
                }
            })
            .collect();
        Self {
            start: "synthetic".into(),
            counts,
        }
    }

    /// Requests per second per step, scaled so the busiest minute is `peak_rps`.
    pub fn rates(&self, peak_rps: f64) -> Vec<f64> {
        let peak = self.counts.iter().copied().fold(0.0, f64::max);
        if peak <= 0.0 {
            return vec![0.0; self.counts.len()];
        }
        self.counts.iter().map(|c| c / peak * peak_rps).collect()
    }

    /// The step of the busiest minute.
    pub fn peak_step(&self) -> usize {
        self.counts
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map_or(0, |(i, _)| i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stretch_is_read_from_its_timestamp_and_scaled_to_its_peak() {
        let dir = std::env::temp_dir().join(format!("doppel-trace-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let csv = dir.join("t.csv");
        std::fs::write(
            &csv,
            "timestamp,num_request,size\n1998-01-01 00:00,5,1\n1998-01-01 00:01,10,1\n\
             1998-01-01 00:02,40,1\n1998-01-01 00:03,20,1\n",
        )
        .unwrap();
        let s = Stretch::read(&csv, "1998-01-01 00:01", 3).unwrap();
        assert_eq!(s.counts, [10.0, 40.0, 20.0]);
        assert_eq!(s.rates(100.0), [25.0, 100.0, 50.0]);
        assert_eq!(s.peak_step(), 1);
        let synthetic = Stretch::synthetic(100);
        assert_eq!(synthetic.peak_step(), 70);
        assert!(synthetic.counts[0] < 0.25 && synthetic.counts[99] < 0.4);
        let short = Stretch::read(&csv, "1998-01-01 00:02", 3).unwrap_err();
        assert!(short.to_string().contains("2 rows"), "{short}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
