//! The demo's workload: nginx compressing a page with gzip at level 9 on every request, so each
//! request costs real CPU and a VM type's CPU share decides how many requests per second it
//! holds. Same files and command for the live instance and every shadow.

use std::{
    fmt::Write as _,
    net::SocketAddr,
    path::{Path, PathBuf},
};

/// The port the workload listens on, live and in every shadow.
pub const PORT: u16 = 8080;
/// The path the load generator asks for.
pub const PATH: &str = "/page.html";

/// The workload's files: the page and an nginx config per instance.
#[derive(Debug, Clone)]
pub struct WorkloadFiles {
    /// Directory holding `page.html`.
    pub root: PathBuf,
}

impl WorkloadFiles {
    /// Writes the page (deterministic pseudo-text of `bytes` bytes) into `root`.
    pub fn create(root: &Path, bytes: usize) -> anyhow::Result<Self> {
        std::fs::create_dir_all(root)?;
        // A small word list drawn with an LCG: compressible like real text, but not trivially.
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = || {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            state >> 33
        };
        let words: Vec<String> = (0..2000)
            .map(|_| {
                let len = 3 + next() % 7;
                (0..len)
                    .map(|_| char::from(b'a' + (next() % 26) as u8))
                    .collect()
            })
            .collect();
        let mut page = String::with_capacity(bytes + 16);
        while page.len() < bytes {
            let _ = write!(page, "{} ", words[(next() % 2000) as usize]);
        }
        std::fs::write(root.join("page.html"), page)?;
        Ok(Self {
            root: root.to_owned(),
        })
    }

    /// An nginx config listening on `listen`. Its scratch files are relative to nginx's
    /// prefix (`-p DIR/`), so one file serves the live instance and every shadow. The access log
    /// has one line per response: the bytes sent.
    pub fn nginx_conf(&self, listen: SocketAddr) -> String {
        format!(
            "worker_processes 1;\ndaemon off;\npid nginx.pid;\nerror_log error.log;\n\
             events {{ worker_connections 4096; }}\n\
             http {{\n log_format sent '$bytes_sent';\n\
             access_log access.log sent buffer=64k flush=1s;\n gzip on;\n gzip_comp_level 9;\n gzip_types *;\n\
             gzip_min_length 0;\n client_body_temp_path tmp;\n proxy_temp_path tmp;\n\
             fastcgi_temp_path tmp;\n uwsgi_temp_path tmp;\n scgi_temp_path tmp;\n\
             server {{ listen {listen}; root {root}; location / {{ }} }}\n}}\n",
            root = self.root.display(),
        )
    }
}

/// Responses an instance logged and the bytes it sent, from `DIR/access.log`.
pub fn served(prefix: &Path) -> anyhow::Result<(u64, u64)> {
    let log = std::fs::read_to_string(prefix.join("access.log"))?;
    let mut responses = 0;
    let mut bytes = 0;
    for line in log.lines() {
        responses += 1;
        bytes += line.trim().parse::<u64>()?;
    }
    Ok((responses, bytes))
}
