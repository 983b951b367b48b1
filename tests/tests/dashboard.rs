//! The dashboard in a real browser: Debian's chromium, headless, driven over the DevTools
//! protocol, against a real coordinator whose store holds reports that came through the real
//! ingest path (the agent's reporting client over QUIC and mTLS), a move of live between two
//! types, a shadow type, the predictor's own forecast, a warning and a recommendation.
//!
//! It checks what a person would: a missing or wrong token gets the login page and no data; the
//! token or a one-time `doppel ui` link gets the pages; each chart holds the series the API
//! describes, point for point; the browser's console stays free of errors. It leaves
//! screenshots in `target/dashboard/` (or `DOPPEL_SCREENSHOT_DIR`); the README's comes from here.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use doppel_common::wire::{IntervalReport, PatternCount};
use doppel_coordinator::{
    ca::CertificateAuthority,
    client::ApiClient,
    forecast::{ForecastSettings, Forecasts},
    measurements::Timeline,
    policy::WorkloadSpec,
    serve::{Coordinator, ServeConfig},
    store::{RecommendationRow, Store},
};
use doppel_tests::{
    reports::{WEB_TOML, interval_report, report_client},
    testbed::workspace_binary,
};
use hdrhistogram::Histogram;
use headless_chrome::{
    Browser, LaunchOptions, Tab,
    protocol::cdp::{
        Log::LogEntryLevel, Page::CaptureScreenshotFormatOption,
        Runtime::ConsoleAPICalledEventTypeOption, types::Event,
    },
};
use serde_json::{Value, json};
use time::OffsetDateTime;

/// [`WEB_TOML`] with learned mirroring, so the page has a pattern mix to show.
fn web_toml() -> String {
    format!("{WEB_TOML}\n[policy.mirror]\nlearn = true\nbudget_flows_per_s = 20.0\n")
}

/// Intervals each agent reports, one second each; live moves after [`MOVE_AT`] of them.
const INTERVALS: u64 = 90;
const MOVE_AT: u64 = 60;

fn now_ms() -> u64 {
    u64::try_from(OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000).expect("ms")
}

/// Load of interval `i`, exchanges/s: a ramp from 40 to 230 and down again, so each type is
/// measured across its knee.
fn load(i: u64) -> u64 {
    let phase = i % 45;
    let up = if phase < 23 { phase } else { 45 - phase };
    40 + up * 190 / 23
}

/// An M/M/1-like latency: `base_ms / (1 - load / capacity)`, capped at a second.
fn latency_ms(base_ms: f64, capacity: f64, load: u64) -> f64 {
    let rho = load as f64 / capacity;
    if rho >= 0.99 {
        1000.0
    } else {
        (base_ms / (1.0 - rho)).min(1000.0)
    }
}

/// The live agent's pattern counts of an interval: a mix the learned plan is made from.
const PATTERNS: [(&str, u64); 3] = [
    ("GET /api/items/{id}", 70),
    ("GET /static/{file}", 25),
    ("POST /checkout", 5),
];

fn report(seq: u64, start_ms: u64, exchanges: u64, latency_ms: f64, errors: u64) -> IntervalReport {
    let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).expect("hist");
    // Spread over ±20 % so p50 and p99 differ.
    for k in 0..exchanges {
        let spread = 0.8 + 0.4 * (k as f64 / exchanges.max(1) as f64);
        h.record((latency_ms * spread * 1e6) as u64)
            .expect("record");
    }
    interval_report("10.0.0.2:8080", seq, start_ms, 1000, &h, errors)
}

/// Errors the browser reported: uncaught exceptions, `console.error`, and its own log's errors
/// (a failed resource load, a refused script).
#[derive(Default)]
struct Console(Mutex<Vec<String>>);

impl Console {
    fn take(&self) -> Vec<String> {
        std::mem::take(&mut self.0.lock().expect("console"))
    }
}

fn watch_console(tab: &Arc<Tab>) -> Arc<Console> {
    let console = Arc::new(Console::default());
    tab.enable_log().expect("Log.enable");
    tab.enable_runtime().expect("Runtime.enable");
    let sink = Arc::clone(&console);
    tab.add_event_listener(Arc::new(move |event: &Event| {
        let line = match event {
            Event::RuntimeExceptionThrown(e) => {
                Some(format!("exception: {}", e.params.exception_details.text))
            }
            Event::RuntimeConsoleAPICalled(e)
                if matches!(e.params.Type, ConsoleAPICalledEventTypeOption::Error) =>
            {
                Some(format!("console.error: {:?}", e.params.args))
            }
            Event::LogEntryAdded(e) if matches!(e.params.entry.level, LogEntryLevel::Error) => {
                Some(format!(
                    "log: {} ({:?})",
                    e.params.entry.text, e.params.entry.url
                ))
            }
            _ => None,
        };
        if let Some(line) = line {
            sink.0.lock().expect("console").push(line);
        }
    }))
    .expect("listen");
    console
}

fn eval(tab: &Tab, expression: &str) -> Value {
    let result = tab
        .evaluate(expression, true)
        .unwrap_or_else(|e| panic!("evaluate {expression}: {e}"));
    result.value.unwrap_or(Value::Null)
}

/// Waits until `expression` is true in the page.
fn wait_true(tab: &Tab, expression: &str, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if eval(tab, expression) == Value::Bool(true) {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!(
        "{what}: `{expression}` never held; page: {}",
        eval(tab, "document.body.innerText")
    );
}

/// Waits for a page's next render to finish, and returns what its charts hold.
fn rendered(tab: &Tab) -> Value {
    let before = eval(tab, "window.doppel ? window.doppel.renders : 0")
        .as_u64()
        .unwrap_or_default();
    wait_true(
        tab,
        &format!("!!window.doppel && window.doppel.renders > {before}"),
        "a render",
    );
    let error = eval(tab, "window.doppel.lastError");
    assert_eq!(error, Value::Null, "the page failed to load its data");
    serde_json::from_str(
        eval(tab, "JSON.stringify(window.doppel.charts)")
            .as_str()
            .expect("charts JSON"),
    )
    .expect("charts parse")
}

fn screenshot(tab: &Tab, name: &str) -> PathBuf {
    let dir = std::env::var_os("DOPPEL_SCREENSHOT_DIR").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/dashboard"),
        PathBuf::from,
    );
    std::fs::create_dir_all(&dir).expect("screenshot dir");
    let png = tab
        .capture_screenshot(CaptureScreenshotFormatOption::Png, None, None, true)
        .expect("screenshot");
    assert!(
        png.len() > 10_000,
        "a {} byte screenshot is blank",
        png.len()
    );
    let path = dir.join(format!("{name}.png"));
    std::fs::write(&path, png).expect("write screenshot");
    path
}

/// The chart's points of `series`, as (x, y) pairs.
fn points(charts: &Value, chart: &str, series: &str) -> Vec<(f64, f64)> {
    charts[chart]["points"][series]
        .as_array()
        .unwrap_or_else(|| panic!("chart {chart} has no series {series:?}: {}", charts[chart]))
        .iter()
        .map(|p| (p[0].as_f64().expect("x"), p[1].as_f64().unwrap_or(f64::NAN)))
        .collect()
}

fn assert_same_points(got: &[(f64, f64)], want: &[(f64, f64)], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: point count");
    for (g, w) in got.iter().zip(want) {
        assert!(
            (g.0 - w.0).abs() < 1e-9 && (g.1 - w.1).abs() <= 1e-9 * w.1.abs().max(1.0),
            "{what}: chart {g:?} vs API {w:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_what_the_api_holds_and_only_to_a_signed_in_browser() {
    let chromium = ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .expect("chromium is installed (`cargo xtask setup` installs Debian's `chromium`)");
    let dir = tempfile::tempdir().expect("tempdir");
    let state_dir = dir.path().to_owned();
    CertificateAuthority::in_state_dir(&state_dir)
        .init(&["localhost".into()], OffsetDateTime::now_utc())
        .expect("ca init");
    let coordinator = Coordinator::start(ServeConfig {
        state_dir: state_dir.clone(),
        quic_listen: "127.0.0.1:0".parse().expect("addr"),
        api_listen: "127.0.0.1:0".parse().expect("addr"),
        // The test's own evaluation below writes the forecast; the coordinator's would race it.
        evaluate_interval_ms: 3_600_000,
        // Learned mirroring plans from the live agent's pattern counts as they arrive.
        mirror_interval_ms: 200,
        ..ServeConfig::default()
    })
    .await
    .expect("coordinator starts");
    let base = format!("http://{}", coordinator.api_addr);
    let token = std::fs::read_to_string(state_dir.join("api.token"))
        .expect("token")
        .trim()
        .to_owned();
    let api = ApiClient::new(base.clone(), token.clone());
    let spec: WorkloadSpec = toml::from_str(&web_toml()).expect("toml");
    let _: Value = api
        .call(reqwest::Method::POST, "/v1/workloads", Some(&spec))
        .await
        .expect("add workload");

    // The reports, through the agents' reporting client, QUIC and mTLS, into the store.
    let first_ms = now_ms() - (INTERVALS + 5) * 1000;
    let live = report_client(&state_dir, "live-1", coordinator.quic_addr);
    let shadow = report_client(&state_dir, "shadow-1", coordinator.quic_addr);
    let mut last = (0, 0);
    for i in 0..INTERVALS {
        let start = first_ms + i * 1000;
        // Live is an m5.large (knee near 250/s) and then an m5.xlarge (near 500/s).
        let live_capacity = if i < MOVE_AT { 250.0 } else { 500.0 };
        let l = load(i);
        let mut live_report = report(i, start, l, latency_ms(4.0, live_capacity, l), 0);
        live_report.patterns = PATTERNS
            .iter()
            .map(|&(pattern, flows)| PatternCount {
                pattern: pattern.into(),
                flows,
            })
            .collect();
        last.0 = live.handle.submit(live_report).await.expect("submit live");
        // The shadow fails one exchange in a hundred.
        last.1 = shadow
            .handle
            .submit(report(i, start, l, latency_ms(3.0, 400.0, l), l / 100))
            .await
            .expect("submit shadow");
    }
    tokio::time::timeout(Duration::from_secs(30), async {
        live.handle.acknowledged(last.0).await;
        shadow.handle.acknowledged(last.1).await;
    })
    .await
    .expect("every report acknowledged");

    // `/metrics` carries each workload, type and role's last minute (read now, while the
    // reports are in it), and is valid exposition.
    let metrics = reqwest::get(format!("{base}/metrics"))
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("body");
    for series in [
        r#"doppel_exchange_latency_seconds{workload="web",vm_type="m5.large",role="live",percentile="99"}"#,
        r#"doppel_exchanges_per_second{workload="web",vm_type="c6g.large",role="shadow"}"#,
        r#"doppel_exchange_error_ratio{workload="web",vm_type="c6g.large",role="shadow"}"#,
    ] {
        assert!(metrics.contains(series), "no {series} in\n{metrics}");
    }
    let mut promtool = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (`cargo xtask setup` installs Debian's `prometheus`)");
    std::io::Write::write_all(
        &mut promtool.stdin.take().expect("stdin"),
        metrics.as_bytes(),
    )
    .expect("write to promtool");
    let checked = promtool.wait_with_output().expect("promtool");
    assert!(
        checked.status.success(),
        "promtool check metrics: {}{}\n{metrics}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );

    // The learned mirroring's plan, made by the coordinator from those counts.
    let deadline = Instant::now() + Duration::from_secs(20);
    let patterns = loop {
        let view: Value = api
            .get("/v1/workloads/web/patterns")
            .await
            .expect("patterns");
        if view["plan"]["patterns"]
            .as_array()
            .is_some_and(|p| p.len() == PATTERNS.len())
        {
            break view;
        }
        assert!(Instant::now() < deadline, "no learned plan: {view}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // The plan's rates are per second of the intervals the counts cover, however fast the
    // agent's spool delivered them (here 90 s of reports within a learning round).
    for (pattern, per_s) in PATTERNS {
        let planned = patterns["plan"]["patterns"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["pattern"] == pattern)
            .and_then(|p| p["flows_per_s"].as_f64())
            .unwrap_or_else(|| panic!("{pattern} not planned: {patterns}"));
        assert!(
            (planned - per_s as f64).abs() <= 0.01 * per_s as f64,
            "{pattern}: planned {planned} flows/s, {per_s}/s reported"
        );
    }

    // The move, the predictor's forecast, a warning and a recommendation.
    let move_ms = i64::try_from(first_ms + MOVE_AT * 1000).expect("ms");
    let now = i64::try_from(now_ms()).expect("ms");
    let mut store = Store::open_in(&state_dir).expect("store");
    let recommendation = RecommendationRow {
        id: 0,
        workload: "web".into(),
        created_ms: move_ms - 2_000,
        idempotency_key: "dashboard-test-1".into(),
        reason: "forecast_breach".into(),
        current_vm_type: "m5.large".into(),
        recommended_vm_type: "m5.xlarge".into(),
        body: json!({"reason": "forecast_breach", "evidence": {"capacity_per_s": 212.0}}),
    };
    assert!(store.put_recommendation(&recommendation, &[]).expect("rec"));
    let stored = store
        .recommendations(Some("web"), 1)
        .expect("recs")
        .remove(0);
    let action = store
        .start_action(&stored, "resize", move_ms - 1_000)
        .expect("start")
        .expect("new action");
    let mut moved = spec.clone();
    moved.live[0].vm_type = "m5.xlarge".into();
    store
        .finish_action_moving_live(action, "exit 0", move_ms, &moved)
        .expect("move");
    let revision = store
        .workload_revision("web")
        .expect("revision")
        .expect("workload");
    let mut forecasts = Forecasts::new(ForecastSettings::default());
    forecasts
        .evaluate(&mut store, &moved, revision, &HashMap::new(), now)
        .expect("forecast");
    store
        .raise_warning(
            "web",
            "m5.xlarge",
            now,
            &json!({
                "vm_type": "m5.xlarge", "probability": 0.8, "lead_secs": 900,
                "expected_breach_ms": now + 900_000, "forecast_load_per_s": 480.0,
                "capacity_per_s": 450.0,
            }),
        )
        .expect("warning");
    drop(store);

    let timeline: Timeline = api
        .get("/v1/workloads/web/timeline?window_ms=1800000")
        .await
        .expect("timeline");
    let forecast: Value = api
        .get("/v1/workloads/web/forecast")
        .await
        .expect("forecast");
    let labels: Vec<String> = timeline
        .series
        .iter()
        .map(|s| format!("{} {}", s.role.as_str(), s.vm_type))
        .collect();
    assert_eq!(
        labels,
        ["live m5.large", "live m5.xlarge", "shadow c6g.large"],
        "the timeline splits live at its move"
    );
    assert_eq!(timeline.moves.len(), 1);
    for (query, field) in [
        ("window_ms=604800001", "window_ms"),
        ("window_ms=0", "window_ms"),
        ("points=0", "points"),
    ] {
        let refused = api
            .get::<Value>(&format!("/v1/workloads/web/timeline?{query}"))
            .await
            .expect_err(query);
        assert_eq!(refused.field(), Some(field), "{query}: {refused}");
    }
    // A 30-minute window in at most 600 points: three-second steps, each the mean of the
    // intervals it holds (also the one straddling the move, which two types share).
    assert_eq!(timeline.step_ms, 3_000);
    let steps = usize::try_from(INTERVALS / 3).expect("steps");
    assert!(
        (steps..=steps + 1).contains(&timeline.offered_load.len()),
        "{} steps for {INTERVALS} one-second intervals",
        timeline.offered_load.len()
    );
    for p in &timeline.offered_load {
        let sent: Vec<f64> = (0..INTERVALS)
            .filter(|i| {
                let start = i64::try_from(first_ms + i * 1000).expect("ms");
                (p.at_ms..p.at_ms + timeline.step_ms).contains(&start)
            })
            .map(|i| load(i) as f64)
            .collect();
        let mean = sent.iter().sum::<f64>() / sent.len() as f64;
        assert!(
            (p.per_s - mean).abs() < 1e-6,
            "offered load at {}: {} against {mean} sent",
            p.at_ms,
            p.per_s
        );
    }
    let doppel = |args: &[&str]| {
        let out = std::process::Command::new(workspace_binary("doppel"))
            .arg("--state-dir")
            .arg(&state_dir)
            .args(args)
            .env_remove("DOPPEL_API")
            .env_remove("DOPPEL_API_TOKEN")
            .output()
            .expect("doppel");
        assert!(
            out.status.success(),
            "doppel {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8")
    };
    let one_time_link = doppel(&["ui", "web"]).trim().to_owned();
    // The CLI reads the same typed forecast the page charts.
    let text = doppel(&["forecast", "web"]);
    let f = &forecast["forecast"];
    for expected in [
        format!("model {}", f["model"].as_str().expect("model")),
        "live: m5.xlarge x1".to_owned(),
        "VM TYPE".to_owned(),
        format!(
            "{:.1}",
            f["types"][0]["capacity_at_slo_per_s"]
                .as_f64()
                .expect("capacity")
        ),
    ] {
        assert!(
            text.contains(&expected),
            "doppel forecast lacks {expected:?}:\n{text}"
        );
    }
    assert!(
        one_time_link.starts_with(&format!("{base}/ui/login?ticket=")),
        "{one_time_link}"
    );

    let timeline_then = timeline.clone();
    let (forecast, browser_token) = (forecast, token.clone());
    tokio::task::spawn_blocking(move || {
        browse(
            &chromium,
            &base,
            &browser_token,
            &one_time_link,
            &timeline,
            &forecast,
            &patterns,
        );
    })
    .await
    .expect("browser checks");

    live.stop().await.expect("stop");
    shadow.stop().await.expect("stop");
    coordinator.shutdown().await;

    // Browsing the kept data afterwards (`browse_only`, what the demo's `--keep` prints): the
    // same figures, nothing changes, and `doppel ui` still signs a browser in.
    let browsing = Coordinator::start(ServeConfig {
        state_dir: state_dir.clone(),
        quic_listen: "127.0.0.1:0".parse().expect("addr"),
        api_listen: "127.0.0.1:0".parse().expect("addr"),
        browse_only: true,
        ..ServeConfig::default()
    })
    .await
    .expect("browsing coordinator starts");
    let api = ApiClient::new(format!("http://{}", browsing.api_addr), token);
    let kept: Timeline = api
        .get("/v1/workloads/web/timeline?window_ms=1800000")
        .await
        .expect("timeline");
    assert_eq!(
        kept.offered_load, timeline_then.offered_load,
        "the same data"
    );
    let refused = api
        .call::<Value>(reqwest::Method::DELETE, "/v1/workloads/web", None::<&()>)
        .await
        .expect_err("a browsing coordinator changes nothing");
    assert!(refused.to_string().contains("browse"), "{refused}");
    let _: Value = api
        .call(reqwest::Method::POST, "/v1/ui/tickets", None::<&()>)
        .await
        .expect("a dashboard link");
    browsing.shutdown().await;
}

fn browse(
    chromium: &Path,
    base: &str,
    token: &str,
    one_time_link: &str,
    timeline: &Timeline,
    forecast: &Value,
    patterns: &Value,
) {
    let browser = Browser::new(
        LaunchOptions::default_builder()
            .path(Some(chromium.to_owned()))
            .sandbox(false)
            .window_size(Some((1500, 2200)))
            .idle_browser_timeout(Duration::from_secs(120))
            .build()
            .expect("launch options"),
    )
    .expect("chromium starts");
    let tab = browser.new_tab().expect("tab");
    let console = watch_console(&tab);

    // No session: the page is the login page, and the API gives a page script nothing.
    tab.navigate_to(&format!("{base}/ui/workloads/web"))
        .and_then(|t| t.wait_until_navigated())
        .expect("navigate");
    assert!(tab.get_url().ends_with("/ui/login"), "{}", tab.get_url());
    assert_eq!(
        eval(&tab, "!!document.getElementById('login-form')"),
        Value::Bool(true)
    );
    assert_eq!(eval(&tab, "typeof window.doppel"), json!("undefined"));
    let status = "fetch('/v1/workloads').then(r => r.status)";
    assert_eq!(eval(&tab, status), json!(401), "no data without a session");

    // A wrong token: the login page again, with its message, and still no data.
    // Types the token and submits, then waits for `landed` (the form's POST navigates).
    let sign_in = |token: &str, landed: &str| {
        tab.wait_for_element("#token")
            .expect("token field")
            .click()
            .expect("focus");
        tab.type_str(token).expect("type");
        tab.press_key("Enter").expect("submit");
        wait_true(&tab, landed, "the login's answer");
    };
    sign_in(
        "not-the-token",
        "document.getElementById('login-message')?.textContent === 'Wrong token.'",
    );
    assert!(tab.get_url().ends_with("/ui/login"), "{}", tab.get_url());
    assert_eq!(
        eval(&tab, "document.getElementById('login-message').textContent"),
        json!("Wrong token.")
    );
    assert_eq!(
        eval(&tab, status),
        json!(401),
        "no data after a wrong token"
    );
    // The browser logs the refused requests (401) itself; they are expected here.
    console.take();

    // The right token: the fleet page.
    sign_in(token, "location.pathname === '/ui/' && !!window.doppel");
    assert!(tab.get_url().ends_with("/ui/"), "{}", tab.get_url());
    rendered(&tab);
    let fleet = eval(&tab, "document.querySelector('main table').innerText");
    let fleet = fleet.as_str().expect("fleet table");
    for expected in [
        "web",
        "m5.xlarge",
        "c6g.large",
        "m5.large → m5.xlarge",
        "lead 15 min",
    ] {
        assert!(
            fleet.contains(expected),
            "fleet lacks {expected:?}:\n{fleet}"
        );
    }
    screenshot(&tab, "fleet");
    assert_eq!(
        console.take(),
        Vec::<String>::new(),
        "console errors on the fleet page"
    );

    // A session reads but cannot change anything.
    let delete = "fetch('/v1/workloads/web', {method: 'DELETE'}).then(r => r.status)";
    assert_eq!(
        eval(&tab, delete),
        json!(401),
        "a session cannot change anything"
    );
    console.take();

    // The one-time link from `doppel ui web`: the workload's page, once.
    tab.navigate_to(one_time_link)
        .and_then(|t| t.wait_until_navigated())
        .expect("navigate");
    assert!(
        tab.get_url().ends_with("/ui/workloads/web"),
        "{}",
        tab.get_url()
    );
    let charts = rendered(&tab);

    // Latency over time: p50 and p99 of each role and type, point for point the API's.
    type Field = fn(&doppel_coordinator::measurements::TimelinePoint) -> f64;
    let fields: [(&str, &str, Field); 3] = [
        ("latency", "p99", |p| p.p99_ms),
        ("latency", "p50", |p| p.p50_ms),
        ("errors", "errors", |p| p.error_rate * 100.0),
    ];
    for s in &timeline.series {
        for (chart, name, field) in fields {
            let series = format!("{} {} {name}", s.role.as_str(), s.vm_type);
            let want: Vec<(f64, f64)> = s
                .points
                .iter()
                .map(|p| (p.at_ms as f64, field(p)))
                .collect();
            assert_same_points(&points(&charts, chart, &series), &want, &series);
        }
    }
    let shadow_errors = points(&charts, "errors", "shadow c6g.large errors");
    assert!(
        shadow_errors.iter().any(|p| p.1 > 0.5),
        "the shadow's failures show: {shadow_errors:?}"
    );
    // Offered load, and the forecast with its band, as the API's forecast has them.
    let f = &forecast["forecast"];
    let forecast_points = f["points"].as_array().expect("forecast points");
    assert!(
        !forecast_points.is_empty(),
        "the predictor forecast: {forecast}"
    );
    for (series, field) in [
        ("forecast median", "median"),
        ("forecast 80% low", "lo80"),
        ("forecast 80% high", "hi80"),
    ] {
        let want: Vec<(f64, f64)> = forecast_points
            .iter()
            .map(|p| {
                (
                    p["at_ms"].as_f64().expect("at"),
                    p[field].as_f64().expect(field),
                )
            })
            .collect();
        assert_same_points(&points(&charts, "load", series), &want, series);
    }
    let offered = points(&charts, "load", "offered load (live)");
    let live_load: Vec<(f64, f64)> = timeline
        .offered_load
        .iter()
        .map(|p| (p.at_ms as f64, p.per_s))
        .collect();
    assert_same_points(&offered, &live_load, "offered load");
    // Latency against load: every modelled type's measured points and fitted curve.
    let types = f["types"].as_array().expect("types");
    assert!(
        !types.is_empty(),
        "the predictor modelled a type: {forecast}"
    );
    let drawn = |t: &Value, field: &str| t[field].as_array().is_some_and(|a| !a.is_empty());
    assert!(
        types
            .iter()
            .all(|t| drawn(t, "measured") && drawn(t, "model_curve")),
        "every modelled type has points and a curve: {forecast}"
    );
    for t in types {
        let vm_type = t["vm_type"].as_str().expect("vm_type");
        for (series, field) in [("measured", "measured"), ("model", "model_curve")] {
            let want: Vec<(f64, f64)> = t[field]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|p| (p[0].as_f64().expect("x"), p[1].as_f64().expect("y")))
                        .collect()
                })
                .unwrap_or_default();
            assert_same_points(
                &points(&charts, "curve", &format!("{vm_type} {series}")),
                &want,
                &format!("{vm_type} {series}"),
            );
        }
    }
    // The learned pattern mix: a row per planned pattern, with its share of live's flows.
    let mix = eval(
        &tab,
        "[...document.querySelectorAll('section.card')].find(s => \
         s.querySelector('h2').textContent === 'Learned pattern mix').innerText",
    );
    let mix = mix.as_str().expect("pattern mix card");
    for p in patterns["plan"]["patterns"]
        .as_array()
        .expect("planned patterns")
    {
        let pattern = p["pattern"].as_str().expect("pattern");
        let share = format!("{:.1}", p["share"].as_f64().expect("share") * 100.0);
        let row = mix
            .lines()
            .find(|line| line.starts_with(pattern))
            .unwrap_or_else(|| panic!("no row for {pattern:?}:\n{mix}"));
        assert!(
            row.contains(&share),
            "{pattern}: share {share} % not in {row:?}"
        );
    }
    let page = eval(&tab, "document.body.innerText");
    let page = page.as_str().expect("page text");
    for expected in [
        "Shadow pool",
        "forecast_breach",
        "Learned pattern mix",
        "open",
    ] {
        assert!(page.contains(expected), "workload page lacks {expected:?}");
    }
    let shot = screenshot(&tab, "workload");
    assert_eq!(
        console.take(),
        Vec::<String>::new(),
        "console errors on the workload page"
    );
    eprintln!("dashboard screenshots: {}", shot.display());

    // The link was for one use.
    tab.navigate_to(one_time_link)
        .and_then(|t| t.wait_until_navigated())
        .expect("navigate");
    assert_eq!(
        eval(&tab, "document.getElementById('login-message').textContent"),
        json!(
            "That link was already used or has expired: run `doppel ui` for a new one, or enter \
             the API token."
        )
    );
}
