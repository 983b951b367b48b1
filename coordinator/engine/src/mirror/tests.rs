use super::*;

fn obs(pattern: &str, flows: f64) -> PatternObservation {
    PatternObservation {
        pattern: pattern.to_owned(),
        flows,
    }
}

fn settings(budget: f64) -> MirrorSettings {
    MirrorSettings {
        budget_flows_per_s: budget,
        ..MirrorSettings::default()
    }
}

/// A mix of one dominant pattern, one costly head and one rare pattern, for `minutes` minutes of
/// one-minute intervals.
fn run(planner: &mut MirrorPlanner, from_minute: u32, minutes: u32, rare: bool) {
    for m in from_minute..from_minute + minutes {
        let mut patterns = vec![
            obs("GET /api/items/{n}", 6000.0),
            obs("POST /api/checkout", 600.0),
        ];
        for i in 0..40 {
            patterns.push(obs(&format!("GET /api/tail{i}"), 30.0));
        }
        if rare {
            patterns.push(obs("DELETE /api/account/{id}", 1.0));
        }
        let latencies: Vec<ClassLatency> = planner
            .plan()
            .classes
            .iter()
            .filter_map(|c| match &c.role {
                ClassRole::Head { pattern, .. } => Some(ClassLatency {
                    class: c.id,
                    latency_ms: if pattern.starts_with("POST") {
                        90.0
                    } else {
                        10.0
                    },
                }),
                _ => None,
            })
            .collect();
        planner.observe(f64::from(m + 1) * 60.0, 60.0, &patterns, &latencies);
    }
}

#[test]
fn rules_match_the_flows_of_their_pattern_and_not_their_neighbours() {
    let items = rule_for_pattern("GET /api/items/{n}").expect("rule");
    assert!(items.matches(b"GET /api/items/42 HTTP/1.1\r\n"));
    assert!(!items.matches(b"GET /api/itemsx HTTP/1.1\r\n"));
    assert!(!items.matches(b"POST /api/items/42 HTTP/1.1\r\n"));
    let root = rule_for_pattern("GET /").expect("rule");
    assert!(root.matches(b"GET / HTTP/1.1\r\n"));
    assert!(
        !root.matches(b"GET /api HTTP/1.1\r\n"),
        "the root is not every path"
    );
    let get = rule_for_pattern("resp GET").expect("rule");
    assert!(get.matches(b"*2\r\n$3\r\nGET\r\n$3\r\nkey\r\n"));
    assert!(
        get.matches(b"*2\r\n$3\r\nget\r\n$3\r\nkey\r\n"),
        "commands ignore case"
    );
    assert!(!get.matches(b"*2\r\n$3\r\nSET\r\n$3\r\nkey\r\n"));
    assert!(!get.matches(b"*2\r\n$6\r\nGETDEL\r\n"));
    let token = rule_for_pattern("PING").expect("rule");
    assert!(token.matches(b"ping\r\n") && !token.matches(b"PONG\r\n"));
    let bytes = rule_for_pattern("bytes 1603").expect("rule");
    assert!(bytes.matches(&[0x16, 0x03, 0x01]) && !bytes.matches(&[0x16, 0x02]));
    for none in ["(other)", "empty", "GET {target}"] {
        assert_eq!(rule_for_pattern(none), None, "{none}");
    }
    let long = rule_for_pattern("GET /a-very-long-resource-name/with/more/{n}").expect("rule");
    assert_eq!(
        long.prefix.len(),
        PAYLOAD_MATCH_LEN,
        "cut at the data path's length"
    );
}

#[test]
fn the_plan_learns_heads_boosts_rare_patterns_and_fills_the_budget_at_the_reference_load() {
    let mut planner = MirrorPlanner::new(settings(20.0)).expect("valid");
    run(&mut planner, 0, 120, true);
    let plan = planner.plan();
    // Live: 6000 + 600 + 1200 + 1 flows a minute = 130 flows/s, steady, so the reference load
    // is the load now and the expected mirrored volume is the budget.
    assert!((plan.live_flows_per_s - 130.0).abs() < 1.0, "{plan:?}");
    assert!(
        (plan.expected_mirrored_per_s - 20.0).abs() < 0.1,
        "{}",
        plan.expected_mirrored_per_s
    );
    let items = plan.classify(b"GET /api/items/7 HTTP/1.1\r\n");
    let checkout = plan.classify(b"POST /api/checkout HTTP/1.1\r\n");
    let rare = plan.classify(b"DELETE /api/account/abc HTTP/1.1\r\n");
    let tail = plan.classify(b"GET /api/tail3 HTTP/1.1\r\n");
    assert_ne!(items, 0);
    assert_ne!(checkout, 0);
    assert_ne!(items, checkout);
    // The checkout head's latency is nine times the other head's: oversampled.
    assert!(
        (plan.rate(checkout) - 2.0 * plan.rate(items)).abs() < 1e-9,
        "{} vs {}",
        plan.rate(checkout),
        plan.rate(items)
    );
    // One flow a minute is 60 an hour: the typical rate (about 0.14) would mirror 8; boost.
    assert!(
        plan.rate(rare) * 60.0 >= planner.settings().rare_target_per_hour,
        "rare rate {}",
        plan.rate(rare)
    );
    // The tail patterns (1800 an hour each) are fine at the typical rate.
    assert_eq!(plan.rate(tail), plan.typical_rate);
}

#[test]
fn a_new_pattern_is_mirrored_whole_then_settles() {
    let mut planner = MirrorPlanner::new(settings(20.0)).expect("valid");
    run(&mut planner, 0, 120, false);
    planner.observe(
        121.0 * 60.0,
        60.0,
        &[
            obs("GET /api/items/{n}", 6000.0),
            obs("PUT /api/new/{n}", 20.0),
        ],
        &[],
    );
    let plan = planner.plan();
    let new = plan.classify(b"PUT /api/new/1 HTTP/1.1\r\n");
    assert_eq!(plan.rate(new), 1.0, "a pattern first seen a minute ago");
    run(&mut planner, 122, 30, false);
    for m in 152..160 {
        planner.observe(
            f64::from(m) * 60.0,
            60.0,
            &[
                obs("GET /api/items/{n}", 6000.0),
                obs("PUT /api/new/{n}", 20.0),
            ],
            &[],
        );
    }
    let plan = planner.plan();
    let new = plan.classify(b"PUT /api/new/1 HTTP/1.1\r\n");
    assert!(plan.rate(new) < 1.0, "older than new_pattern_secs");
}

#[test]
fn classes_keep_their_meaning_and_a_freed_number_rests() {
    let mut planner = MirrorPlanner::new(settings(20.0)).expect("valid");
    run(&mut planner, 0, 60, false);
    let before = planner.plan();
    let items = before.classify(b"GET /api/items/7 HTTP/1.1\r\n");
    let checkout = before.classify(b"POST /api/checkout HTTP/1.1\r\n");
    run(&mut planner, 60, 60, false);
    let after = planner.plan();
    assert_eq!(after.classify(b"GET /api/items/7 HTTP/1.1\r\n"), items);
    assert_eq!(after.classify(b"POST /api/checkout HTTP/1.1\r\n"), checkout);
    // Checkout stops; a new dominant pattern appears. Checkout's number is not reused at once.
    for m in 120..300 {
        planner.observe(
            f64::from(m + 1) * 60.0,
            60.0,
            &[
                obs("GET /api/items/{n}", 6000.0),
                obs("GET /api/search", 3000.0),
            ],
            &[],
        );
    }
    let plan = planner.plan();
    let search = plan.classify(b"GET /api/search HTTP/1.1\r\n");
    assert_ne!(search, 0);
    assert_ne!(
        search, checkout,
        "a freed class number rests before it is reused"
    );
    assert_eq!(plan.classify(b"GET /api/items/7 HTTP/1.1\r\n"), items);
}

#[test]
fn pinned_classes_are_kept_and_win_and_excluded_patterns_are_never_mirrored() {
    let mut s = settings(20.0);
    s.pinned = vec![PinnedClass {
        id: 3,
        name: "checkout".into(),
        rate: 0.5,
        rules: vec![RuleSpec::exact(b"POST /api/checkout")],
    }];
    s.excluded_patterns = vec!["GET /api/tail7".into()];
    let mut planner = MirrorPlanner::new(s).expect("valid");
    run(&mut planner, 0, 120, false);
    let plan = planner.plan();
    assert_eq!(plan.classify(b"POST /api/checkout HTTP/1.1\r\n"), 3);
    assert_eq!(plan.rate(3), 0.5);
    assert!(plan.classes.iter().filter(|c| c.id == 3).count() == 1);
    assert_eq!(
        plan.rate(plan.classify(b"GET /api/tail7 HTTP/1.1\r\n")),
        0.0
    );
    assert!(plan.classes.len() <= MAX_CLASSES && plan.rules.len() <= MAX_RULES);
}

#[test]
fn the_budget_is_filled_at_the_peak_and_not_off_peak() {
    let mut planner = MirrorPlanner::new(settings(10.0)).expect("valid");
    // A day of 100 flows/s with an hour at 400 flows/s, then back at 100.
    for m in 0..1440u32 {
        let load = if (600..660).contains(&m) {
            400.0
        } else {
            100.0
        };
        planner.observe(
            f64::from(m + 1) * 60.0,
            60.0,
            &[obs("GET /a/{n}", load * 60.0)],
            &[],
        );
    }
    let plan = planner.plan();
    // The reference is the day's 90th percentile load (100/s): at 100 flows/s now, the whole
    // budget. The hour at 400/s is above the quantile and the bucket holds it.
    assert!(
        (plan.expected_mirrored_per_s - 10.0).abs() < 0.5,
        "{plan:?}"
    );
    let mut planner = MirrorPlanner::new(settings(10.0)).expect("valid");
    for m in 0..1441u32 {
        let load = if m % 2 == 0 { 100.0 } else { 400.0 };
        planner.observe(
            f64::from(m + 1) * 60.0,
            60.0,
            &[obs("GET /a/{n}", load * 60.0)],
            &[],
        );
    }
    let plan = planner.plan();
    // The load now is 100/s against a reference of 400/s: 10 x 100/400 would be mirrored, but
    // off-peak half the budget still is.
    assert!(
        (plan.expected_mirrored_per_s - 5.0).abs() < 0.5,
        "{}",
        plan.expected_mirrored_per_s
    );
}

#[test]
fn the_bucket_never_admits_more_than_the_budget_and_one_second() {
    // Common flows stop short of the reserve: 10/s, 2 tokens held back (two flows' spacing).
    let mut bucket = FlowBucket::new(10.0, 0.0);
    let mut admitted = 0;
    for ms in 1..=60_000u32 {
        admitted += bucket.admit(f64::from(ms) / 1000.0, 5);
    }
    assert!((598..=608).contains(&admitted), "{admitted}");
    // The same minute seen as one interval.
    let mut bucket = FlowBucket::new(10.0, 0.0);
    assert_eq!(bucket.admit(60.0, 1_000_000), 608);
    assert_eq!(bucket.admit(61.0, 3), 3);
    // Without priority classes, common flows take every token.
    let mut bucket = FlowBucket::without_priority(10.0, 0.0);
    assert_eq!(bucket.admit(60.0, 1_000_000), 610);
    // Priority flows alone take their lane: 15 % of the budget and one second of it.
    let mut bucket = FlowBucket::new(10.0, 0.0);
    assert_eq!(bucket.admit_classes(60.0, 1_000_000, 0), (91, 0));
}

#[test]
fn a_bursting_priority_class_cannot_starve_common_ones() {
    // A boosted pattern bursts to 10 times the budget: its lane holds it to 15 % of the budget,
    // and the common flows keep the rest.
    let mut bucket = FlowBucket::new(10.0, 0.0);
    let (mut priority, mut common) = (0, 0);
    for ms in 1..=60_000u32 {
        let now = f64::from(ms) / 1000.0;
        let (p, c) = bucket.admit_classes(now, u64::from(ms % 10 == 0), u64::from(ms % 50 == 0));
        priority += p;
        common += c;
    }
    assert!(common + priority <= 610, "{common} + {priority}");
    assert!((85..=95).contains(&priority), "priority {priority}");
    assert!(common >= 500, "common {common}");
}

#[test]
fn a_saturated_bucket_still_admits_priority_flows() {
    // Common traffic asks for 5 times the budget, flow by flow; one priority flow arrives every
    // second. The common flows leave the reserve, so every priority flow is admitted, and the
    // total still holds the budget.
    let mut bucket = FlowBucket::new(10.0, 0.0);
    let (mut priority, mut common) = (0, 0);
    for ms in 1..=60_000u32 {
        let now = f64::from(ms) / 1000.0;
        common += bucket.admit(now, if ms % 20 == 0 { 1 } else { 0 });
        if ms % 1000 == 500 {
            priority += bucket.admit_classes(now, 1, 0).0;
        }
    }
    assert_eq!(priority, 60);
    assert!(common + priority <= 610, "{common} + {priority}");
    assert!(common >= 530, "common flows get the rest: {common}");
}

#[test]
fn class_weights_undo_the_oversampling() {
    // Live: 900 flows of a typical class and 100 of a rare one; mirrored at 1 % and 50 %.
    let typical = class_weight(900, 9).expect("mirrored");
    let rare = class_weight(100, 50).expect("mirrored");
    let share = 50.0 * rare / (50.0 * rare + 9.0 * typical);
    assert!((share - 0.1).abs() < 1e-12);
    assert_eq!(class_weight(10, 0), None);
}

#[test]
fn bad_settings_name_the_field() {
    let bad = |f: &dyn Fn(&mut MirrorSettings)| {
        let mut s = MirrorSettings::default();
        f(&mut s);
        MirrorPlanner::new(s).expect_err("invalid").field
    };
    assert_eq!(bad(&|s| s.budget_flows_per_s = 0.0), "budget_flows_per_s");
    assert_eq!(bad(&|s| s.peak_quantile = 1.5), "peak_quantile");
    assert_eq!(bad(&|s| s.costly_factor = 0.5), "costly_factor");
    assert_eq!(
        bad(&|s| s.pinned = vec![PinnedClass {
            id: 0,
            name: "x".into(),
            rate: 1.0,
            rules: vec![],
        }]),
        "pinned"
    );
}

#[test]
fn the_first_round_plans_for_the_load_it_saw() {
    // Half-second rounds of 30 flows/s: the very first plan mirrors the budget, not all of it.
    let mut planner = MirrorPlanner::new(settings(6.0)).expect("valid");
    planner.observe(
        0.5,
        0.5,
        &[obs("GET /items/{n}", 12.0), obs("GET /search/{n}", 3.0)],
        &[],
    );
    let plan = planner.plan();
    assert!((plan.live_flows_per_s - 30.0).abs() < 1e-9, "{plan:?}");
    assert!(
        (plan.expected_mirrored_per_s - 6.0).abs() < 0.01,
        "{plan:?}"
    );
}

#[test]
fn coverage_reweights_an_oversampled_class_back_to_lives_mix() {
    // A budget of 5/s leaves the one-a-minute pattern too rare for the typical rate: boosted.
    let mut planner = MirrorPlanner::new(settings(5.0)).expect("settings");
    run(&mut planner, 0, 120, true);
    let plan = planner.plan();
    let items = plan
        .classes
        .iter()
        .find(|c| c.name == "GET /api/items/{n}")
        .expect("head")
        .id;
    let rare_class = plan.classify(b"DELETE /api/account/1f2e HTTP/1.1\r\n");
    assert_ne!(rare_class, 0, "the rare pattern is boosted");
    // Live: 9000 items flows, 900 checkouts, 100 rare; the shadow got 1 % of the items, 10 % of
    // the checkouts and every rare flow.
    let live = [
        ("GET /api/items/{n}".to_owned(), 9000.0),
        ("POST /api/checkout".to_owned(), 900.0),
        ("DELETE /api/account/{id}".to_owned(), 100.0),
    ];
    let mirrored = [
        ("GET /api/items/{n}".to_owned(), 90),
        ("POST /api/checkout".to_owned(), 90),
        ("DELETE /api/account/{id}".to_owned(), 100),
    ];
    let checkout = plan.classify(b"POST /api/checkout HTTP/1.1\r\n");
    let mut classes = BTreeMap::new();
    classes.insert(items, (9000, 90));
    classes.insert(checkout, (900, 90));
    classes.insert(rare_class, (100, 100));
    let c = coverage::coverage(&plan, &live, &mirrored, &classes);
    let divergence = c.mix_divergence.expect("both sides have flows");
    assert!(
        divergence < 1e-9,
        "reweighted, the sample is live's mix: {divergence}"
    );
    assert_eq!(c.rare_recall, Some(1.0));
    let rare = c
        .patterns
        .iter()
        .find(|p| p.pattern == "DELETE /api/account/{id}")
        .expect("rare");
    assert!((rare.mirrored_share - 100.0 / 280.0).abs() < 1e-12);
    assert!((rare.reweighted_share - 0.01).abs() < 1e-9);
    assert_eq!(
        c.patterns[0].pattern, "GET /api/items/{n}",
        "live's most frequent first"
    );

    // Without the class weights (every class mirrored alike) the oversampled class shows.
    let mut flat = BTreeMap::new();
    for class in [items, checkout, rare_class] {
        flat.insert(class, (1, 1));
    }
    let skewed = coverage::coverage(&plan, &live, &mirrored, &flat);
    assert!(skewed.mix_divergence.expect("flows") > 0.2);
    // A pattern live served 10 times and the shadow never: not recalled.
    let missed = coverage::coverage(
        &plan,
        &[
            ("GET /api/items/{n}".to_owned(), 50.0),
            ("GET /x".to_owned(), 10.0),
        ],
        &[("GET /api/items/{n}".to_owned(), 5)],
        &classes,
    );
    assert_eq!(missed.rare_recall, Some(0.5));
}
