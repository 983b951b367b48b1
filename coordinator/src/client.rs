//! The CLI's side of the HTTP API: where to find the coordinator and its token, and typed calls.
//!
//! The API address comes from `--api`/`DOPPEL_API`, else from the `api.addr` file the running
//! coordinator wrote into the state directory, else the default `127.0.0.1:7480`. The token comes
//! from `--token`/`DOPPEL_API_TOKEN`, else from `api.token` in the state directory.

use std::path::{Path, PathBuf};

use reqwest::{Method, StatusCode};
use serde::{Serialize, de::DeserializeOwned};

use crate::api::{ADDR_FILE, ErrorBody, TOKEN_FILE};

/// The API address used when neither a flag nor the state directory says otherwise.
pub const DEFAULT_API: &str = "http://127.0.0.1:7480";

/// Why a CLI call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No token given and none readable in the state directory.
    #[error("no API token: pass --token or DOPPEL_API_TOKEN, or read access to {path}")]
    NoToken {
        /// Where it was looked for.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The coordinator could not be reached or answered something unreadable.
    #[error("request to {url} failed")]
    Http {
        /// The URL.
        url: String,
        /// The cause.
        #[source]
        source: reqwest::Error,
    },
    /// The coordinator refused the request.
    #[error("coordinator answered {status}: {}", body.error)]
    Api {
        /// HTTP status.
        status: StatusCode,
        /// Its error body.
        body: ErrorBody,
    },
}

impl ClientError {
    /// The refused field, when the coordinator named one.
    pub fn field(&self) -> Option<&str> {
        match self {
            Self::Api { body, .. } => body.field.as_deref(),
            _ => None,
        }
    }
}

/// Where the API is and how to authenticate to it.
#[derive(Debug, Clone)]
pub struct ApiClient {
    base: String,
    token: String,
    http: reqwest::Client,
}

/// The API base URL: `explicit`, else the state directory's address file, else the default.
pub fn resolve_base(explicit: Option<&str>, state_dir: &Path) -> String {
    let base = match explicit {
        Some(url) => url.to_owned(),
        None => match std::fs::read_to_string(state_dir.join(ADDR_FILE)) {
            Ok(addr) if !addr.trim().is_empty() => format!("http://{}", addr.trim()),
            _ => DEFAULT_API.to_owned(),
        },
    };
    let base = if base.contains("://") {
        base
    } else {
        format!("http://{base}")
    };
    base.trim_end_matches('/').to_owned()
}

/// The token: `explicit`, else the state directory's token file.
pub fn resolve_token(explicit: Option<&str>, state_dir: &Path) -> Result<String, ClientError> {
    if let Some(token) = explicit {
        return Ok(token.to_owned());
    }
    let path = state_dir.join(TOKEN_FILE);
    std::fs::read_to_string(&path)
        .map(|t| t.trim().to_owned())
        .map_err(|source| ClientError::NoToken { path, source })
}

impl ApiClient {
    /// A client for `base` (e.g. `http://127.0.0.1:7480`) with `token`.
    pub fn new(base: String, token: String) -> Self {
        Self {
            base,
            token,
            http: reqwest::Client::new(),
        }
    }

    /// The API's base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// Calls `method path` with an optional JSON body and decodes the JSON answer.
    pub async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&(impl Serialize + ?Sized)>,
    ) -> Result<T, ClientError> {
        let url = format!("{}{path}", self.base);
        let http = |source| ClientError::Http {
            url: url.clone(),
            source,
        };
        let mut request = self
            .http
            .request(method, &url)
            .bearer_auth(&self.token)
            .timeout(std::time::Duration::from_secs(30));
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().await.map_err(http)?;
        let status = response.status();
        if status.is_success() {
            return response.json().await.map_err(http);
        }
        let text = response.text().await.map_err(http)?;
        let body = serde_json::from_str(&text).unwrap_or(ErrorBody {
            error: text,
            field: None,
        });
        Err(ClientError::Api { status, body })
    }

    /// `GET path`.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.call(Method::GET, path, None::<&()>).await
    }
}
