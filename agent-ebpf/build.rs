//! Rebuild the eBPF object when `bpf-linker` changes.
//!
//! Building this crate depends on the `bpf-linker` binary, which cargo cannot express (artifact
//! dependencies would, see <https://github.com/rust-lang/cargo/issues/12385>), so key the build on
//! its path's mtime, as aya's template does.

fn main() {
    match which::which("bpf-linker") {
        Ok(path) => println!("cargo:rerun-if-changed={}", path.display()),
        Err(e) => {
            println!("cargo:warning=bpf-linker not found on PATH ({e}); run `cargo xtask setup`")
        }
    }
}
