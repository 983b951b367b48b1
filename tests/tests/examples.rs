//! The configuration examples in `examples/` are what the real loaders accept: each is loaded and
//! validated exactly as `doppel-agent` and `doppel serve` do at start, and the workload as the
//! coordinator checks `doppel workload add`. The agent files are loaded inside a network
//! namespace holding the interfaces and addresses they name, since the agent checks those
//! against the host; their certificate paths point at files made for the test.

use std::path::{Path, PathBuf};

use doppel_agent::{config::LiveConfig, shadow::config::ShadowConfig};
use doppel_coordinator::{
    policy::{self, WorkloadSpec},
    serve::ServeConfig,
};
use doppel_tests::testbed::{Host, privileged_or_skip};

fn example(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Writes `name` with its `/etc/doppel/` certificate paths pointing at empty files in `dir`.
fn with_certificates(name: &str, dir: &Path) -> PathBuf {
    let text = example(name).replace("/etc/doppel/", &format!("{}/", dir.display()));
    for file in [
        "ca.crt",
        "web-1.crt",
        "web-1.key",
        "shadow-1.crt",
        "shadow-1.key",
    ] {
        std::fs::write(dir.join(file), "").expect("certificate stand-in");
    }
    let path = dir.join(name);
    std::fs::write(&path, text).expect("example copy");
    path
}

/// A host with the interface and addresses the agent examples name.
fn example_host() -> Host {
    let host = Host::new("examples").expect("host");
    // A veth pair (this kernel has no dummy device); only its name and addresses matter.
    host.ip(&[
        "link", "add", "eth0", "type", "veth", "peer", "name", "eth0p",
    ])
    .expect("eth0");
    for addr in ["10.0.0.2/24", "10.1.0.1/24"] {
        host.ip(&["addr", "add", addr, "dev", "eth0"])
            .expect("addr");
    }
    host.ip(&["link", "set", "eth0", "up"]).expect("eth0 up");
    host
}

#[test]
fn the_agent_examples_load_with_the_agents_own_loaders() {
    if !privileged_or_skip("the_agent_examples_load_with_the_agents_own_loaders") {
        return;
    }
    let host = example_host();
    let dir = tempfile::tempdir().expect("temp dir");
    let live = with_certificates("live.toml", dir.path());
    let shadow = with_certificates("shadow.toml", dir.path());
    let _inside = host.enter().expect("enter host");
    assert_eq!(
        doppel_agent::config::role_of(&live).expect("role"),
        doppel_agent::config::Role::Live
    );
    let live = LiveConfig::load(&live)
        .unwrap_or_else(|e| panic!("live.toml: {}", doppel_agent::datapath::error_chain(&e)));
    assert_eq!(live.mirror_sessions.len(), 1);
    assert!(live.coordinator.is_some());
    assert_eq!(
        doppel_agent::config::role_of(&shadow).expect("role"),
        doppel_agent::config::Role::Shadow
    );
    let shadow = ShadowConfig::load(&shadow)
        .unwrap_or_else(|e| panic!("shadow.toml: {}", doppel_agent::datapath::error_chain(&e)));
    assert_eq!(shadow.services.len(), 2);
}

#[test]
fn the_serve_and_workload_examples_are_accepted_by_the_coordinator() {
    let serve: ServeConfig = toml::from_str(&example("serve.toml")).expect("serve.toml parses");
    serve.validate().expect("serve.toml is valid");
    assert_eq!(serve.vm_types.len(), 3);
    let workload: WorkloadSpec =
        toml::from_str(&example("workload.toml")).expect("workload.toml parses");
    policy::validate(&workload, &[]).expect("workload.toml is valid");
    assert_eq!(workload.policy.classes.len(), 2);
}

#[test]
fn an_example_with_an_unknown_field_is_refused() {
    // The loaders refuse what they do not know, so the checks above can fail.
    let bad = example("serve.toml").replace("retention_days", "retention_dayz");
    assert!(toml::from_str::<ServeConfig>(&bad).is_err());
    let bad = example("workload.toml").replace("sample_rate = 0.05", "sample_rate = 5.0");
    let spec: WorkloadSpec = toml::from_str(&bad).expect("parses");
    assert!(policy::validate(&spec, &[]).is_err());
}
