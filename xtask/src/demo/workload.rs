//! The demo's workload: nginx compressing a page with gzip at level 9 on every request, so each
//! request costs real CPU and a VM type's CPU share decides how many requests per second it
//! holds. Same files and command for the live instance and every shadow.

use std::{
    fmt::Write as _,
    net::SocketAddr,
    path::{Path, PathBuf},
};

/// The port the workload listens on, live and in every shadow.
pub(super) const PORT: u16 = 8080;
/// The path the load generator asks for.
pub(super) const PATH: &str = "/page.html";

/// The workload's files: the page and an nginx config per instance.
#[derive(Debug, Clone)]
pub(super) struct WorkloadFiles {
    /// Directory holding `page.html`.
    pub(super) root: PathBuf,
}

impl WorkloadFiles {
    /// Writes the page (deterministic pseudo-text of `bytes` bytes) into `root`.
    pub(super) fn create(root: &Path, bytes: usize) -> anyhow::Result<Self> {
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

    /// An nginx config for one instance listening on `listen`, its scratch files under `dir`.
    pub(super) fn nginx_conf(&self, listen: SocketAddr, dir: &Path) -> String {
        format!(
            "worker_processes 1;\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
             events {{ worker_connections 4096; }}\n\
             http {{\n access_log off;\n gzip on;\n gzip_comp_level 9;\n gzip_types *;\n\
             gzip_min_length 0;\n client_body_temp_path {d};\n proxy_temp_path {d};\n\
             fastcgi_temp_path {d};\n uwsgi_temp_path {d};\n scgi_temp_path {d};\n\
             server {{ listen {listen}; root {root}; location / {{ }} }}\n}}\n",
            d = dir.display(),
            root = self.root.display(),
        )
    }
}
