//! Translation of a workload's policy ([`AgentPolicy`], as the coordinator sends it or the
//! config file gives it) into the data path's map values, with validation that names the field.
//!
//! Pure functions: no maps are touched here, so every rule is unit-tested without a kernel.

use std::net::IpAddr;

use doppel_common::{
    maps::{
        CLASS_BUDGET_PRIORITY, ClassConfig, MAX_CLASSES, MAX_RULES, MAX_SERVICES, MAX_SESSIONS,
        MirrorSessionConfig, PAYLOAD_MATCH_LEN, RULE_MATCH_PORT, RULE_MATCH_PREFIX, Rule,
        ServiceKey,
    },
    wire::{AgentPolicy, ClassPolicy, ClassRule, IpPrefix, MirrorSession, ServiceAddr},
};

/// One million: sample rates are in parts per million.
pub const PPM: u32 = 1_000_000;

/// A policy the data path cannot apply; the message names the offending field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct PolicyError {
    /// Path of the field, e.g. `rules[3].payload_prefix`.
    pub field: String,
    /// What is wrong with it.
    pub reason: String,
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> PolicyError {
    PolicyError {
        field: field.into(),
        reason: reason.into(),
    }
}

/// The data path's form of a policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompiledPolicy {
    /// Service keys, in policy order: the position is the service id.
    pub services: Vec<ServiceKey>,
    /// Class table indexed by class id (`MAX_CLASSES` entries; unlisted classes sample nothing).
    pub classes: Vec<ClassConfig>,
    /// Rules in policy order.
    pub rules: Vec<Rule>,
    /// Mirror sessions in policy order.
    pub sessions: Vec<MirrorSessionConfig>,
    /// Sampling epoch seed.
    pub sampling_seed: u64,
    /// Mirror budget, new flows per second (0: no limit).
    pub mirror_budget_flows_per_s: u32,
}

/// Address words as the programs see them: network-order bytes, IPv4 mapped into IPv6.
pub fn addr_words(addr: IpAddr) -> [u32; 4] {
    let octets = match addr {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    };
    let word =
        |i: usize| u32::from_ne_bytes([octets[i], octets[i + 1], octets[i + 2], octets[i + 3]]);
    [word(0), word(4), word(8), word(12)]
}

/// The service key of a listening address.
pub fn service_key(service: &ServiceAddr) -> ServiceKey {
    ServiceKey {
        addr: addr_words(service.addr),
        port_be: service.port.to_be(),
        _pad: 0,
    }
}

/// Validates `policy` and turns it into map values.
pub fn compile(policy: &AgentPolicy) -> Result<CompiledPolicy, PolicyError> {
    if policy.services.is_empty() {
        return Err(invalid("services", "at least one service is needed"));
    }
    if policy.services.len() > MAX_SERVICES as usize {
        return Err(invalid(
            "services",
            format!("at most {MAX_SERVICES} services"),
        ));
    }
    let services = policy.services.iter().map(service_key).collect();

    let mut classes = vec![ClassConfig::default(); MAX_CLASSES as usize];
    for (i, class) in policy.classes.iter().enumerate() {
        let config = class_config(i, class, &classes)?;
        classes[usize::from(class.id)] = config;
    }
    if policy.rules.len() > MAX_RULES as usize {
        return Err(invalid("rules", format!("at most {MAX_RULES} rules")));
    }
    let rules = policy
        .rules
        .iter()
        .enumerate()
        .map(|(i, rule)| compile_rule(i, rule))
        .collect::<Result<_, _>>()?;
    if policy.mirror_sessions.len() > MAX_SESSIONS as usize {
        return Err(invalid(
            "mirror_sessions",
            format!("at most {MAX_SESSIONS} sessions"),
        ));
    }
    let sessions = policy
        .mirror_sessions
        .iter()
        .enumerate()
        .map(|(i, s)| session_config(i, s))
        .collect::<Result<_, _>>()?;
    Ok(CompiledPolicy {
        services,
        classes,
        rules,
        sessions,
        sampling_seed: policy.sampling_seed,
        mirror_budget_flows_per_s: policy.mirror_budget_flows_per_s,
    })
}

fn class_config(
    i: usize,
    class: &ClassPolicy,
    seen: &[ClassConfig],
) -> Result<ClassConfig, PolicyError> {
    let field = |f: &str| format!("classes[{i}].{f}");
    if u32::from(class.id) >= MAX_CLASSES {
        return Err(invalid(field("id"), format!("must be below {MAX_CLASSES}")));
    }
    if seen[usize::from(class.id)] != ClassConfig::default() {
        return Err(invalid(
            field("id"),
            format!("class {} is listed twice", class.id),
        ));
    }
    if class.sample_rate_ppm > PPM {
        return Err(invalid(field("sample_rate"), "must be between 0 and 100 %"));
    }
    Ok(ClassConfig {
        // rate x 2^32, so that "hash < threshold" holds for exactly that share of 32-bit hashes.
        sample_threshold: (u64::from(class.sample_rate_ppm) << 32) / u64::from(PPM),
        priority: u32::from(class.priority),
        flags: if class.budget_priority {
            CLASS_BUDGET_PRIORITY
        } else {
            0
        },
    })
}

fn prefix_mask(len: u8, v4: bool) -> [u32; 4] {
    // An IPv4 prefix covers the last 32 bits of the mapped address, plus the mapping itself.
    let bits = if v4 {
        96 + u32::from(len)
    } else {
        u32::from(len)
    };
    let mut mask = [0u32; 4];
    for (w, slot) in mask.iter_mut().enumerate() {
        let covered = bits.saturating_sub(32 * w as u32).min(32);
        let host = if covered == 0 {
            0
        } else {
            u32::MAX << (32 - covered)
        };
        *slot = host.to_be();
    }
    mask
}

fn compile_rule(i: usize, rule: &ClassRule) -> Result<Rule, PolicyError> {
    let field = |f: &str| format!("rules[{i}].{f}");
    if u32::from(rule.class) >= MAX_CLASSES {
        return Err(invalid(
            field("class"),
            format!("must be below {MAX_CLASSES}"),
        ));
    }
    let mut flags = 0;
    let mut port_be = 0;
    if let Some(port) = rule.port {
        flags |= RULE_MATCH_PORT;
        port_be = port.to_be();
    }
    let (mut prefix_addr, mut prefix_mask_words) = ([0; 4], [0; 4]);
    if let Some(IpPrefix { addr, len }) = rule.client_prefix {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if len > max {
            return Err(invalid(
                field("client_prefix"),
                format!("prefix length {len} > {max}"),
            ));
        }
        flags |= RULE_MATCH_PREFIX;
        prefix_mask_words = prefix_mask(len, addr.is_ipv4());
        let words = addr_words(addr);
        for w in 0..4 {
            prefix_addr[w] = words[w] & prefix_mask_words[w];
        }
    }
    if rule.payload_prefix.len() > PAYLOAD_MATCH_LEN {
        return Err(invalid(
            field("payload_prefix"),
            format!("at most {PAYLOAD_MATCH_LEN} bytes can be matched"),
        ));
    }
    if !rule.payload_mask.is_empty() && rule.payload_mask.len() != rule.payload_prefix.len() {
        return Err(invalid(
            field("payload_mask"),
            "must be as long as payload_prefix",
        ));
    }
    let mut bytes = [0u8; PAYLOAD_MATCH_LEN];
    let mut mask = [0u8; PAYLOAD_MATCH_LEN];
    for (j, b) in rule.payload_prefix.iter().enumerate() {
        mask[j] = rule.payload_mask.get(j).copied().unwrap_or(0xff);
        bytes[j] = b & mask[j];
    }
    let words = |b: &[u8; PAYLOAD_MATCH_LEN]| {
        std::array::from_fn(|w| {
            let mut chunk = [0u8; 8];
            chunk.copy_from_slice(&b[w * 8..w * 8 + 8]);
            u64::from_ne_bytes(chunk)
        })
    };
    Ok(Rule {
        flags,
        class: u32::from(rule.class),
        prefix_addr,
        prefix_mask: prefix_mask_words,
        port_be,
        payload_len: rule.payload_prefix.len() as u8,
        _pad: 0,
        _pad2: 0,
        payload: words(&bytes),
        payload_mask: words(&mask),
    })
}

fn session_config(i: usize, session: &MirrorSession) -> Result<MirrorSessionConfig, PolicyError> {
    if session.vni >= 1 << 24 {
        return Err(invalid(
            format!("mirror_sessions[{i}].vni"),
            "a VNI has 24 bits",
        ));
    }
    Ok(match session.shadow_addr {
        IpAddr::V4(v4) => MirrorSessionConfig {
            remote_ipv4: u32::from(v4),
            remote_ipv6: [0; 4],
            vni: session.vni,
            ipv6: 0,
            ifindex: 0,
        },
        IpAddr::V6(v6) => MirrorSessionConfig {
            remote_ipv4: 0,
            remote_ipv6: addr_words(IpAddr::V6(v6)),
            vni: session.vni,
            ipv6: 1,
            ifindex: 0,
        },
    })
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    fn policy() -> AgentPolicy {
        AgentPolicy {
            workload: "w".into(),
            report_interval_ms: 1000,
            services: vec![ServiceAddr {
                addr: Ipv4Addr::new(10, 0, 0, 2).into(),
                port: 80,
            }],
            classes: vec![ClassPolicy {
                id: 1,
                name: "api".into(),
                sample_rate_ppm: 250_000,
                priority: 5,
                budget_priority: false,
            }],
            rules: vec![ClassRule {
                class: 1,
                port: Some(80),
                client_prefix: Some(IpPrefix {
                    addr: Ipv4Addr::new(10, 1, 0, 0).into(),
                    len: 16,
                }),
                payload_prefix: b"GET /api".to_vec(),
                payload_mask: vec![],
            }],
            mirror_sessions: vec![MirrorSession {
                shadow_addr: Ipv4Addr::new(10, 9, 0, 2).into(),
                vni: 42,
            }],
            sampling_seed: 7,
            mirror_budget_flows_per_s: 0,
        }
    }

    #[test]
    fn rates_become_thresholds_over_32_bit_hashes() {
        let compiled = compile(&policy()).unwrap();
        assert_eq!(compiled.classes[1].sample_threshold, 1 << 30);
        assert_eq!(
            compiled.classes[0].sample_threshold, 0,
            "unlisted classes sample nothing"
        );
        let mut all = policy();
        all.classes[0].sample_rate_ppm = PPM;
        assert_eq!(compile(&all).unwrap().classes[1].sample_threshold, 1 << 32);
    }

    #[test]
    fn an_ipv4_prefix_masks_the_mapped_address() {
        let rule = &compile(&policy()).unwrap().rules[0];
        let inside = addr_words(Ipv4Addr::new(10, 1, 200, 3).into());
        let outside = addr_words(Ipv4Addr::new(10, 2, 0, 1).into());
        let matches =
            |a: [u32; 4]| (0..4).all(|w| a[w] & rule.prefix_mask[w] == rule.prefix_addr[w]);
        assert!(matches(inside));
        assert!(!matches(outside));
        assert!(
            !matches(addr_words(Ipv6Addr::LOCALHOST.into())),
            "v6 never matches a v4 prefix"
        );
    }

    #[test]
    fn payload_bytes_are_masked_and_packed_in_memory_order() {
        let rule = &compile(&policy()).unwrap().rules[0];
        assert_eq!(rule.payload_len, 8);
        assert_eq!(rule.payload[0].to_ne_bytes(), *b"GET /api");
        assert_eq!(rule.payload_mask[0], u64::MAX);
        assert_eq!(rule.payload_mask[1], 0);
    }

    #[test]
    fn invalid_policies_name_the_field() {
        let mut p = policy();
        p.classes[0].sample_rate_ppm = PPM + 1;
        assert_eq!(compile(&p).unwrap_err().field, "classes[0].sample_rate");
        let mut p = policy();
        p.rules[0].payload_prefix = vec![b'x'; 33];
        assert_eq!(compile(&p).unwrap_err().field, "rules[0].payload_prefix");
        let mut p = policy();
        p.rules[0].payload_mask = vec![0xff];
        assert_eq!(compile(&p).unwrap_err().field, "rules[0].payload_mask");
        let mut p = policy();
        p.mirror_sessions[0].vni = 1 << 24;
        assert_eq!(compile(&p).unwrap_err().field, "mirror_sessions[0].vni");
        let mut p = policy();
        p.classes.push(p.classes[0].clone());
        assert_eq!(compile(&p).unwrap_err().field, "classes[1].id");
        let mut p = policy();
        p.services.clear();
        assert_eq!(compile(&p).unwrap_err().field, "services");
    }

    #[test]
    fn ipv4_sessions_carry_the_host_order_address_the_helper_wants() {
        let s = &compile(&policy()).unwrap().sessions[0];
        assert_eq!(s.remote_ipv4, 0x0a09_0002);
        assert_eq!((s.vni, s.ipv6), (42, 0));
    }
}
