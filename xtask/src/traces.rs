//! The traces the evaluations replay: read at run time from `../shared/traces` (or
//! `DOPPEL_TRACES`), never copied into the project, and put on a regular grid.

use std::path::{Path, PathBuf};

use anyhow::Context as _;

/// Environment override for where the traces live.
pub(crate) const TRACES_ENV: &str = "DOPPEL_TRACES";

/// A trace resampled onto a regular grid.
pub(crate) struct Trace {
    pub(crate) name: String,
    pub(crate) start: u64,
    pub(crate) step_secs: u64,
    pub(crate) values: Vec<f64>,
    /// Grid steps that had no observation and carry the previous value.
    pub(crate) filled: usize,
}

pub(crate) fn load_traces(dir: &Path) -> anyhow::Result<Vec<Trace>> {
    let mut traces = Vec::new();
    let worldcup = dir.join("worldcup98_per_minute.csv");
    traces.push(load_csv(&worldcup, "worldcup98", 60, 1)?);
    let nab = dir.join("nab/realAWSCloudwatch");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&nab)
        .with_context(|| {
            format!(
                "read {} (set {TRACES_ENV} to the traces directory)",
                nab.display()
            )
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "csv"))
        .collect();
    files.sort();
    for file in files {
        let name = file
            .file_stem()
            .map(|s| format!("nab/{}", s.to_string_lossy()))
            .unwrap_or_default();
        traces.push(load_csv(&file, &name, 300, 1)?);
    }
    Ok(traces)
}

/// Reads `timestamp,value,...` rows, taking column `column`, onto a `step_secs` grid: duplicate
/// stamps are averaged, missing steps carry the previous value.
fn load_csv(path: &Path, name: &str, step_secs: u64, column: usize) -> anyhow::Result<Trace> {
    let text = std::fs::read_to_string(path).with_context(|| {
        format!(
            "read {} (set {TRACES_ENV} to the traces directory)",
            path.display()
        )
    })?;
    let mut rows: Vec<(u64, f64)> = Vec::new();
    for (line_no, line) in text.lines().enumerate().skip(1) {
        let mut fields = line.split(',');
        let stamp = fields.next().unwrap_or_default();
        let value = fields.nth(column - 1).with_context(|| {
            format!(
                "{}:{}: missing column {column}",
                path.display(),
                line_no + 1
            )
        })?;
        let t = parse_timestamp(stamp).with_context(|| {
            format!(
                "{}:{}: bad timestamp {stamp:?}",
                path.display(),
                line_no + 1
            )
        })?;
        let v: f64 = value
            .trim()
            .parse()
            .with_context(|| format!("{}:{}: bad value {value:?}", path.display(), line_no + 1))?;
        rows.push((t, v));
    }
    anyhow::ensure!(!rows.is_empty(), "{}: no rows", path.display());
    rows.sort_by_key(|r| r.0);
    let start = rows[0].0 / step_secs * step_secs;
    let len = ((rows[rows.len() - 1].0 - start) / step_secs + 1) as usize;
    let mut sums = vec![0.0; len];
    let mut counts = vec![0u32; len];
    for (t, v) in rows {
        let i = ((t - start) / step_secs) as usize;
        sums[i] += v;
        counts[i] += 1;
    }
    let mut values = Vec::with_capacity(len);
    let mut filled = 0;
    for (s, c) in sums.iter().zip(&counts) {
        if *c > 0 {
            values.push(s / f64::from(*c));
        } else {
            filled += 1;
            values.push(values.last().copied().unwrap_or(0.0));
        }
    }
    Ok(Trace {
        name: name.to_owned(),
        start,
        step_secs,
        values,
        filled,
    })
}

/// `YYYY-MM-DD HH:MM[:SS[.ffffff]]` as seconds since the Unix epoch (UTC; the traces carry no
/// zone, and only differences and time of day matter here).
fn parse_timestamp(s: &str) -> Option<u64> {
    let (date, time) = s.trim().split_once(' ')?;
    let mut d = date.split('-').map(str::parse::<i64>);
    let (y, mo, da) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let mut t = time.split(':');
    let h: i64 = t.next()?.parse().ok()?;
    let mi: i64 = t.next()?.parse().ok()?;
    let se: i64 = t
        .next()
        .map_or(Some(0.0), |x| x.parse::<f64>().ok())?
        .floor() as i64;
    // Days from civil (Howard Hinnant's algorithm).
    let y = if mo <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if mo > 2 { mo - 3 } else { mo + 9 }) + 2) / 5 + da - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    u64::try_from(days * 86_400 + h * 3600 + mi * 60 + se).ok()
}

#[cfg(test)]
mod tests {
    #[test]
    fn timestamps_parse_to_epoch_seconds() {
        assert_eq!(super::parse_timestamp("1970-01-01 00:00"), Some(0));
        assert_eq!(
            super::parse_timestamp("2014-02-14 14:30:00"),
            Some(1_392_388_200)
        );
        assert_eq!(
            super::parse_timestamp("2014-02-26 13:45:00.000000"),
            Some(1_393_422_300)
        );
        assert_eq!(super::parse_timestamp("garbage"), None);
    }
}
