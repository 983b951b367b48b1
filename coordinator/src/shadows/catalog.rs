//! The VM catalog (`[[vm_types]]` in the serve config): what each VM type costs, what it is made
//! of, what is known about its speed, and the CPU and memory limits that stand for it when the
//! `local` provisioner makes a shadow out of a network namespace and a cgroup.
//!
//! ```toml
//! [[vm_types]]
//! name = "c7.large"
//! price_per_hour = 0.085
//! vcpus = 2
//! memory_mib = 4096
//! benchmark_score = 2400.0     # optional priors for pool steering
//! cpu_family = "graviton3"
//! network_gbps = 12.5
//! local = { cpu = 0.5, memory_bytes = 268435456 }   # half a core, 256 MiB
//! ```
//!
//! Only `name` and `price_per_hour` are required: a type without `vcpus` and `memory_mib` is
//! priced (comparisons, recommendations) but never given a shadow, and the `local` provisioner
//! only uses types with `local` limits.

use std::collections::{HashMap, HashSet};

use serde::{Deserialize, Serialize};

/// One VM type of the catalog.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmType {
    /// VM type name, as workloads use it.
    pub name: String,
    /// Price per instance-hour, in whatever currency the operator uses throughout.
    pub price_per_hour: f64,
    /// Virtual CPUs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpus: Option<u32>,
    /// Memory, MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<u64>,
    /// A throughput benchmark score of the whole instance (prior for pool steering).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub benchmark_score: Option<f64>,
    /// CPU family, e.g. `icelake`, `graviton3` (informational).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_family: Option<String>,
    /// Network bandwidth, Gbit/s (informational).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_gbps: Option<f64>,
    /// Limits of a `local` shadow standing for this type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local: Option<LocalLimits>,
}

/// The cgroup limits a `local` shadow of a VM type runs under.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalLimits {
    /// CPU bandwidth as a fraction of one core (1.5 = one and a half cores).
    pub cpu: f64,
    /// Memory limit, bytes.
    pub memory_bytes: u64,
}

impl LocalLimits {
    /// The CFS quota for `period_us`, at least the kernel's 1 ms minimum.
    pub fn cpu_quota_us(&self, period_us: u64) -> u64 {
        ((self.cpu * period_us as f64).round() as u64).max(1000)
    }
}

/// A catalog entry that cannot be used; `field` is its path in the serve config.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid `{field}`: {reason}")]
pub struct InvalidCatalog {
    /// The offending field, e.g. `vm_types[2].local.cpu`.
    pub field: String,
    /// Why.
    pub reason: String,
}

/// Smallest memory limit accepted for a local shadow: the shadow agent alone needs more.
pub const MIN_LOCAL_MEMORY_BYTES: u64 = 32 << 20;

/// Checks every entry, naming the first bad field.
pub fn validate(catalog: &[VmType]) -> Result<(), InvalidCatalog> {
    let mut names = HashSet::new();
    for (i, t) in catalog.iter().enumerate() {
        let bad = |field: &str, reason: &str| {
            Err(InvalidCatalog {
                field: format!("vm_types[{i}].{field}"),
                reason: reason.to_owned(),
            })
        };
        if t.name.is_empty() {
            return bad("name", "must not be empty");
        }
        if !crate::policy::valid_name(&t.name) {
            return bad("name", "use 1-64 characters of [A-Za-z0-9._-]");
        }
        if !names.insert(t.name.as_str()) {
            return bad("name", "listed twice");
        }
        if !(t.price_per_hour.is_finite() && t.price_per_hour >= 0.0) {
            return bad("price_per_hour", "must be a non-negative number");
        }
        if t.vcpus == Some(0) {
            return bad("vcpus", "must be positive");
        }
        if t.memory_mib == Some(0) {
            return bad("memory_mib", "must be positive");
        }
        if t.vcpus.is_some() != t.memory_mib.is_some() {
            let missing = if t.vcpus.is_some() {
                "memory_mib"
            } else {
                "vcpus"
            };
            return bad(missing, "give both vcpus and memory_mib, or neither");
        }
        if t.benchmark_score
            .is_some_and(|s| !(s.is_finite() && s > 0.0))
        {
            return bad("benchmark_score", "must be positive");
        }
        if t.network_gbps.is_some_and(|s| !(s.is_finite() && s > 0.0)) {
            return bad("network_gbps", "must be positive");
        }
        if let Some(local) = t.local {
            if !(local.cpu.is_finite() && local.cpu >= 0.01 && local.cpu <= 1024.0) {
                return bad("local.cpu", "must be a fraction of a core in 0.01..=1024");
            }
            if local.memory_bytes < MIN_LOCAL_MEMORY_BYTES {
                return bad("local.memory_bytes", "must be at least 32 MiB (33554432)");
            }
        }
    }
    Ok(())
}

/// Prices by type name.
pub fn price_table(catalog: &[VmType]) -> HashMap<String, f64> {
    catalog
        .iter()
        .map(|t| (t.name.clone(), t.price_per_hour))
        .collect()
}

impl VmType {
    /// The type as pool steering sees it, if the catalog says enough about it (vCPUs, memory,
    /// a positive price).
    pub fn steering(&self) -> Option<doppel_engine::VmType> {
        let (vcpus, memory_mib) = (self.vcpus?, self.memory_mib?);
        (self.price_per_hour > 0.0).then(|| doppel_engine::VmType {
            name: self.name.clone(),
            vcpus,
            memory_gib: memory_mib as f64 / 1024.0,
            price_per_hour: self.price_per_hour,
            benchmark_score: self.benchmark_score,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Vec<VmType> {
        #[derive(Deserialize)]
        struct Doc {
            vm_types: Vec<VmType>,
        }
        toml::from_str::<Doc>(text).expect("toml").vm_types
    }

    const GOOD: &str = r#"
        [[vm_types]]
        name = "small"
        price_per_hour = 0.05
        vcpus = 1
        memory_mib = 2048
        benchmark_score = 1000.0
        local = { cpu = 0.5, memory_bytes = 268435456 }
        [[vm_types]]
        name = "priced-only"
        price_per_hour = 0.2
    "#;

    #[test]
    fn a_good_catalog_passes_and_steers_only_described_types() {
        let catalog = parse(GOOD);
        validate(&catalog).expect("valid");
        assert_eq!(
            catalog[0].local.expect("local").cpu_quota_us(100_000),
            50_000
        );
        assert!(catalog[0].steering().is_some());
        assert!(catalog[1].steering().is_none());
    }

    #[test]
    fn bad_entries_name_the_field() {
        let field = |text: &str| validate(&parse(text)).expect_err("invalid").field;
        assert_eq!(
            field(&GOOD.replace("cpu = 0.5", "cpu = 0")),
            "vm_types[0].local.cpu"
        );
        assert_eq!(
            field(&GOOD.replace("268435456", "1024")),
            "vm_types[0].local.memory_bytes"
        );
        assert_eq!(field(&GOOD.replace("vcpus = 1\n", "")), "vm_types[0].vcpus");
        assert_eq!(
            field(&GOOD.replace("vcpus = 1", "vcpus = 0")),
            "vm_types[0].vcpus"
        );
        assert_eq!(
            field(&GOOD.replace("\"priced-only\"", "\"small\"")),
            "vm_types[1].name"
        );
        assert_eq!(
            field(&GOOD.replace("0.2", "-1.0")),
            "vm_types[1].price_per_hour"
        );
        assert_eq!(
            field(&GOOD.replace("1000.0", "-5.0")),
            "vm_types[0].benchmark_score"
        );
    }
}
