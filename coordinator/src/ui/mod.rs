//! The dashboard at `/ui`: the pages, their assets, and the browser sessions that read the API.
//!
//! Every asset is compiled into the binary (`coordinator/ui/`), so a coordinator on a machine
//! without internet serves the whole dashboard. The charts are drawn in the browser by uPlot
//! (vendored from the npm registry with its MIT licence, `coordinator/ui/vendor/uplot/`): the
//! pages read the same JSON API the CLI reads and refresh on their own, so a figure on a page is
//! the API's figure, and the tests compare the two. uPlot was chosen over server-side SVG
//! because pages that refresh every few seconds should not re-render and re-ship whole images,
//! and over heavier chart libraries for its size (51 kB) and its time-series focus.
//!
//! **Access.** The API token is the one credential. The login page takes it (or a one-time
//! ticket from `doppel ui`, good for one use within [`TICKET_TTL_MS`]) and answers with a
//! session cookie (`HttpOnly`, `SameSite=Strict`) that lasts [`SESSION_TTL_MS`]; the token itself
//! never reaches the page's scripts or its storage. The API accepts that cookie in place of the
//! bearer token for reads only (`GET`), so a page can show everything and change nothing, and a
//! cross-site form cannot make it change anything either. A page asked for without a valid
//! session redirects to the login page, which carries no data.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use axum::{
    Form, Router,
    extract::{Path as UrlPath, Query, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Redirect, Response},
    routing::get,
};
use serde::Deserialize;

use crate::clock::Clock;

/// The session cookie's name.
pub const SESSION_COOKIE: &str = "doppel_session";
/// How long a browser session lasts, ms.
pub const SESSION_TTL_MS: i64 = 12 * 3600 * 1000;
/// How long a one-time ticket from `doppel ui` may wait to be used, ms.
pub const TICKET_TTL_MS: i64 = 5 * 60 * 1000;
/// Sessions and tickets kept at most; the oldest go first, so a flood of logins cannot grow
/// the coordinator's memory.
const MAX_ENTRIES: usize = 1024;

/// Open browser sessions and unused one-time tickets, each with its expiry (ms since the epoch).
#[derive(Debug, Default)]
pub struct Sessions {
    sessions: Mutex<HashMap<String, i64>>,
    tickets: Mutex<HashMap<String, i64>>,
}

/// Inserts `id` expiring at `expires_ms`, after dropping expired entries and, when full, the
/// one expiring first.
fn insert_bounded(map: &Mutex<HashMap<String, i64>>, id: String, expires_ms: i64, now_ms: i64) {
    let mut map = map.lock().unwrap_or_else(|e| e.into_inner());
    map.retain(|_, expires| *expires > now_ms);
    if map.len() >= MAX_ENTRIES
        && let Some(first) = map
            .iter()
            .min_by_key(|(_, expires)| **expires)
            .map(|(k, _)| k.clone())
    {
        map.remove(&first);
    }
    map.insert(id, expires_ms);
}

impl Sessions {
    /// A one-time ticket for [`Sessions::redeem`].
    pub fn mint_ticket(&self, now_ms: i64) -> (String, i64) {
        let ticket = crate::secret::random_token();
        let expires_ms = now_ms + TICKET_TTL_MS;
        insert_bounded(&self.tickets, ticket.clone(), expires_ms, now_ms);
        (ticket, expires_ms)
    }

    /// Uses up `ticket`: a new session when it was minted and is unexpired and unused.
    pub fn redeem(&self, ticket: &str, now_ms: i64) -> Option<String> {
        let expires = self
            .tickets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(ticket)?;
        (expires > now_ms).then(|| self.open(now_ms))
    }

    /// A new session.
    pub fn open(&self, now_ms: i64) -> String {
        let id = crate::secret::random_token();
        insert_bounded(&self.sessions, id.clone(), now_ms + SESSION_TTL_MS, now_ms);
        id
    }

    /// Ends a session.
    pub fn close(&self, id: &str) {
        self.sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
    }

    /// Whether `id` is an open, unexpired session.
    pub fn is_open(&self, id: &str, now_ms: i64) -> bool {
        self.sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .is_some_and(|expires| *expires > now_ms)
    }

    /// Whether the request's cookie names an open session.
    pub fn request_has_session(&self, headers: &HeaderMap, now_ms: i64) -> bool {
        session_cookie(headers).is_some_and(|id| self.is_open(&id, now_ms))
    }
}

/// The session id the request's `Cookie` headers carry, if any.
fn session_cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(cookie::Cookie::split_parse)
        .filter_map(Result::ok)
        .find(|c| c.name() == SESSION_COOKIE)
        .map(|c| c.value().to_owned())
}

/// What the UI's handlers share.
#[derive(Debug)]
pub struct UiState {
    /// The API token the login page checks.
    pub token: String,
    /// Browser sessions, shared with the API's token check.
    pub sessions: Arc<Sessions>,
    /// The coordinator's clock.
    pub clock: Clock,
}

/// The pages and assets, compiled in.
mod assets {
    pub(super) const SHELL: &str = include_str!("../../ui/index.html");
    pub(super) const LOGIN: &str = include_str!("../../ui/login.html");
    pub(super) const APP_JS: &str = include_str!("../../ui/app.js");
    pub(super) const STYLE_CSS: &str = include_str!("../../ui/style.css");
    pub(super) const UPLOT_JS: &str = include_str!("../../ui/vendor/uplot/uPlot.iife.min.js");
    pub(super) const UPLOT_CSS: &str = include_str!("../../ui/vendor/uplot/uPlot.min.css");
    pub(super) const UPLOT_LICENSE: &str = include_str!("../../ui/vendor/uplot/LICENSE");
}

/// Answers with a page no cache or frame may keep or embed.
fn page(status: StatusCode, html: String) -> Response {
    (
        status,
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
            (header::X_FRAME_OPTIONS, "DENY"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; \
                 frame-ancestors 'none'",
            ),
        ],
        html,
    )
        .into_response()
}

fn login_page(status: StatusCode, message: &str) -> Response {
    page(
        status,
        assets::LOGIN.replace("{{message}}", &html_escape(message)),
    )
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn with_session_cookie(mut response: Response, session: &str) -> Response {
    let cookie = cookie::Cookie::build((SESSION_COOKIE, session.to_owned()))
        .path("/")
        .http_only(true)
        .same_site(cookie::SameSite::Strict)
        .max_age(time::Duration::milliseconds(SESSION_TTL_MS))
        .build();
    if let Ok(value) = HeaderValue::from_str(&cookie.to_string()) {
        response.headers_mut().append(header::SET_COOKIE, value);
    }
    response
}

/// The shell every dashboard page loads; the script routes by path.
async fn shell(State(state): State<Arc<UiState>>, headers: HeaderMap) -> Response {
    if state
        .sessions
        .request_has_session(&headers, state.clock.now_ms())
    {
        page(StatusCode::OK, assets::SHELL.to_owned())
    } else {
        Redirect::to("/ui/login").into_response()
    }
}

/// Query of `GET /ui/login`.
#[derive(Debug, Deserialize)]
struct LoginQuery {
    ticket: Option<String>,
    /// The workload whose page to land on.
    workload: Option<String>,
}

/// Where a login lands: the workload's page for a valid workload name (`[A-Za-z0-9._-]`, as
/// policy validation requires), else the fleet page; never another site.
fn landing(workload: Option<&str>) -> String {
    match workload {
        Some(name)
            if !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')) =>
        {
            format!("/ui/workloads/{name}")
        }
        _ => "/ui/".to_owned(),
    }
}

/// `GET /ui/login`: the login form, or, with `?ticket=`, the one-time ticket's session.
async fn login_form(
    State(state): State<Arc<UiState>>,
    Query(query): Query<LoginQuery>,
) -> Response {
    let Some(ticket) = query.ticket else {
        return login_page(StatusCode::OK, "");
    };
    match state.sessions.redeem(&ticket, state.clock.now_ms()) {
        // Redirected, so the used ticket leaves the address bar and the history.
        Some(session) => with_session_cookie(
            Redirect::to(&landing(query.workload.as_deref())).into_response(),
            &session,
        ),
        None => {
            tracing::info!("dashboard login refused: unknown, used or expired ticket");
            login_page(
                StatusCode::UNAUTHORIZED,
                "That link was already used or has expired: run `doppel ui` for a new one, \
                 or enter the API token.",
            )
        }
    }
}

/// The login form's fields.
#[derive(Debug, Deserialize)]
struct LoginForm {
    token: String,
}

/// `POST /ui/login`: checks the API token and opens a session.
async fn login(State(state): State<Arc<UiState>>, Form(form): Form<LoginForm>) -> Response {
    if crate::secret::token_matches(&state.token, form.token.trim()) {
        let session = state.sessions.open(state.clock.now_ms());
        with_session_cookie(Redirect::to("/ui/").into_response(), &session)
    } else {
        tracing::info!("dashboard login refused: wrong API token");
        login_page(StatusCode::UNAUTHORIZED, "Wrong token.")
    }
}

/// `POST /ui/logout`: ends the session.
async fn logout(State(state): State<Arc<UiState>>, headers: HeaderMap) -> Response {
    if let Some(id) = session_cookie(&headers) {
        state.sessions.close(&id);
    }
    Redirect::to("/ui/login").into_response()
}

/// `GET /ui/assets/{file}`: the scripts and styles. Code only, no data: served without a
/// session.
async fn asset(UrlPath(file): UrlPath<String>) -> Response {
    let (body, content_type) = match file.as_str() {
        "app.js" => (assets::APP_JS, "text/javascript; charset=utf-8"),
        "style.css" => (assets::STYLE_CSS, "text/css; charset=utf-8"),
        "uPlot.iife.min.js" => (assets::UPLOT_JS, "text/javascript; charset=utf-8"),
        "uPlot.min.css" => (assets::UPLOT_CSS, "text/css; charset=utf-8"),
        "uPlot.LICENSE.txt" => (assets::UPLOT_LICENSE, "text/plain; charset=utf-8"),
        _ => return StatusCode::NOT_FOUND.into_response(),
    };
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}

/// The dashboard's routes. They check the session themselves; the API's token check is not in
/// front of them.
pub fn router(state: Arc<UiState>) -> Router {
    Router::new()
        .route("/ui", get(|| async { Redirect::permanent("/ui/") }))
        .route("/ui/", get(shell))
        .route("/ui/workloads/{name}", get(shell))
        .route("/ui/login", get(login_form).post(login))
        .route("/ui/logout", axum::routing::post(logout))
        .route("/ui/assets/{file}", get(asset))
        .with_state(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ticket_opens_one_session_once_and_only_before_it_expires() {
        let sessions = Sessions::default();
        let (ticket, expires) = sessions.mint_ticket(1_000);
        assert_eq!(expires, 1_000 + TICKET_TTL_MS);
        let session = sessions
            .redeem(&ticket, 2_000)
            .expect("fresh ticket redeems");
        assert!(sessions.is_open(&session, 2_000));
        assert!(!sessions.is_open(&session, 2_000 + SESSION_TTL_MS));
        assert_eq!(
            sessions.redeem(&ticket, 2_001),
            None,
            "a ticket is one-time"
        );
        let (late, _) = sessions.mint_ticket(1_000);
        assert_eq!(sessions.redeem(&late, 1_000 + TICKET_TTL_MS), None);
        assert_eq!(sessions.redeem("made-up", 1_000), None);
    }

    #[test]
    fn a_login_lands_on_a_workload_page_or_the_fleet_never_elsewhere() {
        assert_eq!(landing(Some("web-1.a_b")), "/ui/workloads/web-1.a_b");
        assert_eq!(landing(None), "/ui/");
        for bad in ["", "//evil.example", "a/b", "x?y", "%2F"] {
            assert_eq!(landing(Some(bad)), "/ui/", "{bad:?}");
        }
    }

    #[test]
    fn a_closed_or_unknown_session_is_not_open() {
        let sessions = Sessions::default();
        let id = sessions.open(0);
        assert!(!sessions.is_open("other", 0));
        sessions.close(&id);
        assert!(!sessions.is_open(&id, 0));
    }

    #[test]
    fn the_store_of_sessions_stays_bounded() {
        let sessions = Sessions::default();
        let first = sessions.open(0);
        for i in 0..(MAX_ENTRIES as i64 + 10) {
            sessions.open(i + 1);
        }
        let len = sessions.sessions.lock().unwrap().len();
        assert_eq!(len, MAX_ENTRIES);
        assert!(!sessions.is_open(&first, 1), "the oldest session made room");
    }

    #[test]
    fn the_session_cookie_is_found_among_others() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; doppel_session=abc; b=2"),
        );
        assert_eq!(session_cookie(&headers).as_deref(), Some("abc"));
        headers.insert(header::COOKIE, HeaderValue::from_static("a=1"));
        assert_eq!(session_cookie(&headers), None);
    }
}
