//! A `doppel-agent` started in a testbed host with a configuration file, and the JSON lines it
//! prints (one per report interval), for the end-to-end tests of both roles.

use std::{
    io::{BufRead as _, BufReader},
    path::PathBuf,
    process::Stdio,
    sync::{Arc, Mutex},
    thread,
    time::Duration,
};

use serde_json::Value;

use crate::testbed::{Host, Process, wait_for, workspace_binary};

/// A running agent and the JSON lines it printed so far.
#[derive(Debug)]
pub struct AgentProcess {
    /// The agent process (signal it to test reloads and crashes).
    pub process: Process,
    /// Its configuration file (rewrite it and send SIGHUP to test reloads).
    pub config_path: PathBuf,
    label: String,
    lines: Arc<Mutex<Vec<Value>>>,
    /// Its log (stderr), kept and passed on to the test's stderr.
    log: Arc<Mutex<String>>,
    /// The threads reading its stdout and stderr, which end when the agent closes them.
    readers: Vec<thread::JoinHandle<()>>,
}

impl AgentProcess {
    /// Writes `config` to a file, starts `doppel-agent --config FILE` inside `host`, and waits
    /// for its first report line (so everything is attached). `label` names it in messages.
    pub fn start(host: &Host, label: &str, config: &str) -> Self {
        let config_path = std::env::temp_dir().join(format!(
            "doppel-{label}-{}-{}.toml",
            std::process::id(),
            host.netns()
        ));
        std::fs::write(&config_path, config).expect("write config");
        let mut command = host.command(workspace_binary("doppel-agent").to_str().expect("utf-8"));
        command
            .arg("--config")
            .arg(&config_path)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut process = host.spawn(command).expect("spawn agent");
        let stdout = process.child_mut().stdout.take().expect("stdout");
        let stderr = process.child_mut().stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(String::new()));
        let log_sink = Arc::clone(&log);
        let log_reader = thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("{line}");
                let mut log = log_sink.lock().expect("lock");
                log.push_str(&line);
                log.push('\n');
            }
        });
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&lines);
        let line_reader = thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let value: Value = serde_json::from_str(&line).expect("agent prints JSON lines");
                sink.lock().expect("lock").push(value);
            }
        });
        // The first report arrives one interval after everything is attached.
        for _ in 0..200 {
            if !lines.lock().expect("lock").is_empty() {
                break;
            }
            if let Some(status) = process.wait_timeout(Duration::from_millis(25)) {
                panic!("{label} agent exited early: {status:?}");
            }
        }
        assert!(
            !lines.lock().expect("lock").is_empty(),
            "{label} agent printed no report"
        );
        Self {
            process,
            config_path,
            label: label.to_owned(),
            lines,
            log,
            readers: vec![line_reader, log_reader],
        }
    }

    /// What the agent logged so far.
    pub fn log(&self) -> String {
        self.log.lock().expect("lock").clone()
    }

    /// The lines printed so far.
    pub fn lines(&self) -> Vec<Value> {
        self.lines.lock().expect("lock").clone()
    }

    /// A counter summed over the lines printed so far.
    pub fn counter(&self, name: &str) -> u64 {
        counter(&self.lines(), name)
    }

    /// Waits up to `limit` until `done` holds for the lines printed so far (polled as
    /// [`wait_for`] does); returns its last answer. Tests wait on what a line must show
    /// instead of sleeping, and leave the verdict to their assertions.
    pub fn wait_for_lines(&self, limit: Duration, mut done: impl FnMut(&[Value]) -> bool) -> bool {
        wait_for(limit, || done(&self.lines.lock().expect("lock")))
    }

    /// Waits up to `limit` until the agent prints a line after the ones printed so far: its
    /// counters then cover everything that happened before this call. Returns whether it did.
    pub fn wait_for_next_line(&self, limit: Duration) -> bool {
        let printed = self.lines.lock().expect("lock").len();
        self.wait_for_lines(limit, |lines| lines.len() > printed)
    }

    /// Waits up to `limit` until the agent's log contains `text`; returns whether it does.
    pub fn wait_for_log(&self, limit: Duration, text: &str) -> bool {
        wait_for(limit, || self.log.lock().expect("lock").contains(text))
    }

    /// Stops the agent (SIGTERM), checks it exits cleanly, and returns every line, including
    /// the final partial interval.
    pub fn stop(self) -> Vec<Value> {
        self.stop_with_log().0
    }

    /// [`Self::stop`], and the agent's whole log: what it logged while closing its last
    /// interval included, which [`Self::log`] before stopping cannot show.
    pub fn stop_with_log(mut self) -> (Vec<Value>, String) {
        let status = self.process.stop(Duration::from_secs(10));
        assert!(
            status.success(),
            "{} agent exit status {status:?}",
            self.label
        );
        // Every line is read once the readers reach the end of the agent's output.
        assert!(
            wait_for(Duration::from_secs(10), || self
                .readers
                .iter()
                .all(|r| r.is_finished())),
            "{}: the agent exited but its output is still open",
            self.label
        );
        for reader in self.readers.drain(..) {
            reader.join().expect("reader thread");
        }
        let _ = std::fs::remove_file(&self.config_path);
        (self.lines(), self.log())
    }
}

/// A counter (`counters.NAME`) summed over report lines.
pub fn counter(lines: &[Value], name: &str) -> u64 {
    lines
        .iter()
        .map(|l| l["counters"][name].as_u64().unwrap_or(0))
        .sum()
}
