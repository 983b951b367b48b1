//! The traces the evaluations replay: read at run time from `../shared/traces` (or
//! `DOPPEL_TRACES`, or `--traces`), never copied into the project, each on its own regular grid.
//!
//! **Layout.** A trace directory declares its series in `traces.toml`:
//!
//! ```toml
//! [[traces]]
//! name = "worldcup98"                 # as reported
//! file = "worldcup98_per_minute.csv"  # a CSV, relative to the directory
//! step = "1m"                         # the series' own step: 1m, 5m, 30m, 1h or 1d
//! column = "num_request"              # the value column (default: the second)
//!
//! [[traces]]
//! name = "nab/"                       # a prefix when `dir` is given: "nab/<file stem>"
//! dir = "nab/realAWSCloudwatch"       # every *.csv in it, sorted by name
//! step = "5m"
//! ```
//!
//! Each CSV has a header row and `YYYY-MM-DD HH:MM[:SS[.ffffff]]` timestamps (UTC) in its first
//! column. Rows are averaged into the declared step; a step with no row carries the previous
//! value and is counted (`filled`). A series whose rows come further apart than its declared
//! step is refused: it would be filled onto a grid finer than its own, and the forecast would
//! be scored on values it copied. A directory without `traces.toml` is read with
//! [`SHARED_LAYOUT`], the layout of `../shared/traces`.

use std::path::{Path, PathBuf};

use anyhow::Context as _;

/// Environment override for where the traces live.
pub(crate) const TRACES_ENV: &str = "DOPPEL_TRACES";

/// The manifest a trace directory holds.
pub(crate) const MANIFEST: &str = "traces.toml";

/// The layout of `../shared/traces`, which has no manifest of its own.
pub(crate) const SHARED_LAYOUT: &str = r#"
[[traces]]
name = "worldcup98"
file = "worldcup98_per_minute.csv"
step = "1m"
column = "num_request"

[[traces]]
name = "nab/"
dir = "nab/realAWSCloudwatch"
step = "5m"
"#;

/// A trace resampled onto a regular grid.
pub(crate) struct Trace {
    pub(crate) name: String,
    pub(crate) start: u64,
    pub(crate) step_secs: u64,
    pub(crate) values: Vec<f64>,
    /// Grid steps that had no observation and carry the previous value.
    pub(crate) filled: usize,
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Manifest {
    traces: Vec<Entry>,
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    name: String,
    file: Option<PathBuf>,
    dir: Option<PathBuf>,
    step: String,
    column: Option<String>,
}

/// The steps a trace may declare, in seconds.
pub(crate) fn step_secs(step: &str) -> anyhow::Result<u64> {
    Ok(match step {
        "1m" => 60,
        "5m" => 300,
        "30m" => 1800,
        "1h" => 3600,
        "1d" => 86_400,
        other => anyhow::bail!("step {other:?}: one of 1m, 5m, 30m, 1h, 1d"),
    })
}

pub(crate) fn load_traces(dir: &Path) -> anyhow::Result<Vec<Trace>> {
    let path = dir.join(MANIFEST);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => SHARED_LAYOUT.to_owned(),
        Err(e) => return Err(e).with_context(|| format!("read {}", path.display())),
    };
    let manifest: Manifest =
        toml::from_str(&text).with_context(|| format!("{}: bad manifest", path.display()))?;
    let mut traces = Vec::new();
    for (i, entry) in manifest.traces.iter().enumerate() {
        let step = step_secs(&entry.step).with_context(|| format!("traces[{i}].step"))?;
        let column = entry.column.as_deref();
        match (&entry.file, &entry.dir) {
            (Some(file), None) => {
                traces.push(load_csv(&dir.join(file), &entry.name, step, column)?);
            }
            (None, Some(sub)) => {
                let sub = dir.join(sub);
                let mut files: Vec<PathBuf> = std::fs::read_dir(&sub)
                    .with_context(|| {
                        format!(
                            "read {} (set {TRACES_ENV} or --traces to the traces directory)",
                            sub.display()
                        )
                    })?
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.extension().is_some_and(|e| e == "csv"))
                    .collect();
                files.sort();
                for file in files {
                    let name = file
                        .file_stem()
                        .map(|s| format!("{}{}", entry.name, s.to_string_lossy()))
                        .unwrap_or_default();
                    traces.push(load_csv(&file, &name, step, column)?);
                }
            }
            _ => anyhow::bail!("traces[{i}]: give exactly one of `file` and `dir`"),
        }
    }
    Ok(traces)
}

/// Reads `timestamp,value,...` rows, taking the column named `column` (default: the second),
/// onto a `step_secs` grid: rows within a step are averaged, missing steps carry the previous
/// value. Refuses a series whose rows are further apart than the step (see the module docs).
fn load_csv(
    path: &Path,
    name: &str,
    step_secs: u64,
    column: Option<&str>,
) -> anyhow::Result<Trace> {
    let text = std::fs::read_to_string(path).with_context(|| {
        format!(
            "read {} (set {TRACES_ENV} or --traces to the traces directory)",
            path.display()
        )
    })?;
    let header = text.lines().next().unwrap_or_default();
    let column = match column {
        None => 1,
        Some(wanted) => header
            .split(',')
            .position(|h| h.trim() == wanted)
            .with_context(|| format!("{}: no column {wanted:?} in {header:?}", path.display()))?,
    };
    anyhow::ensure!(column > 0, "{}: column 0 is the timestamp", path.display());
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
    let mut gaps: Vec<u64> = rows
        .windows(2)
        .map(|w| w[1].0 - w[0].0)
        .filter(|g| *g > 0)
        .collect();
    gaps.sort_unstable();
    if let Some(&typical) = gaps.get(gaps.len() / 2) {
        anyhow::ensure!(
            typical <= step_secs,
            "{}: rows are {typical} s apart but the declared step is {step_secs} s: declare the \
             series' own step (filling it onto a finer grid would score copied values)",
            path.display()
        );
    }
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
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) {
        std::fs::write(dir.join(name), text).expect("write");
    }

    #[test]
    fn a_manifest_declares_files_and_directories_with_their_own_steps() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(
            dir.path(),
            "hourly.csv",
            "timestamp,orders,other\n2024-01-01 00:00,3,9\n2024-01-01 01:00,5,9\n2024-01-01 03:00,7,9\n\
             2024-01-01 04:00,8,9\n2024-01-01 05:00,9,9\n",
        );
        std::fs::create_dir(dir.path().join("daily")).expect("mkdir");
        write(
            &dir.path().join("daily"),
            "b.csv",
            "timestamp,value\n2024-01-01 00:00,1\n2024-01-02 00:00,2\n",
        );
        write(
            dir.path(),
            MANIFEST,
            "[[traces]]\nname = \"shop\"\nfile = \"hourly.csv\"\nstep = \"1h\"\ncolumn = \"orders\"\n\
             [[traces]]\nname = \"d/\"\ndir = \"daily\"\nstep = \"1d\"\n",
        );
        let traces = load_traces(dir.path()).expect("loads");
        assert_eq!(traces.len(), 2);
        assert_eq!(
            (traces[0].name.as_str(), traces[0].step_secs),
            ("shop", 3600)
        );
        // 02:00 had no row: carried forward, and counted.
        assert_eq!(traces[0].values, [3.0, 5.0, 5.0, 7.0, 8.0, 9.0]);
        assert_eq!(traces[0].filled, 1);
        assert_eq!(
            (traces[1].name.as_str(), traces[1].values.len()),
            ("d/b", 2)
        );
    }

    #[test]
    fn a_coarse_series_declared_on_a_finer_grid_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(
            dir.path(),
            "five.csv",
            "timestamp,value\n2024-01-01 00:00,1\n2024-01-01 00:05,2\n2024-01-01 00:10,3\n",
        );
        write(
            dir.path(),
            MANIFEST,
            "[[traces]]\nname = \"x\"\nfile = \"five.csv\"\nstep = \"1m\"\n",
        );
        let error = format!("{:#}", load_traces(dir.path()).err().expect("refused"));
        assert!(error.contains("300 s apart"), "{error}");
        write(
            dir.path(),
            MANIFEST,
            "[[traces]]\nname = \"x\"\nfile = \"five.csv\"\nstep = \"2m\"\n",
        );
        let error = format!("{:#}", load_traces(dir.path()).err().expect("refused"));
        assert!(error.contains("traces[0].step"), "{error}");
    }

    #[test]
    fn timestamps_parse_to_epoch_seconds() {
        assert_eq!(parse_timestamp("1970-01-01 00:00"), Some(0));
        assert_eq!(parse_timestamp("2014-02-14 14:30:00"), Some(1_392_388_200));
        assert_eq!(
            parse_timestamp("2014-02-26 13:45:00.000000"),
            Some(1_393_422_300)
        );
        assert_eq!(parse_timestamp("garbage"), None);
    }
}
