//! A client for the REST API that turns error bodies into messages a person can act on.

use anyhow::{anyhow, Context, Result};
use reqwest::{Method, RequestBuilder, Response};
use viv_api::ErrorBody;

/// API client.
#[derive(Debug, Clone)]
pub struct Client {
    base: String,
    key: Option<String>,
    /// The node named for node-local work on an API server (`--node`).
    node: Option<String>,
    http: reqwest::Client,
}

impl Client {
    /// A client for `base` authenticating with `key`.
    pub fn new(base: &str, key: Option<String>) -> Self {
        let key = key
            .or_else(|| std::env::var("E2B_API_KEY").ok())
            .filter(|k| !k.is_empty());
        Self {
            base: base.trim_end_matches('/').to_owned(),
            key,
            node: None,
            http: reqwest::Client::new(),
        }
    }

    /// The same client, naming `node` for node-local work (VMs, disks, ISOs, switches,
    /// template builds) sent to an API server of a cluster.
    pub fn on_node(mut self, node: Option<String>) -> Self {
        self.node = node.filter(|n| !n.is_empty());
        self
    }

    /// The server's base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// The API key, if any.
    pub fn key(&self) -> Option<&str> {
        self.key.as_deref()
    }

    /// A request to `path`, with the API key.
    pub fn request(&self, method: Method, path: &str) -> RequestBuilder {
        let mut builder = self.http.request(method, format!("{}{path}", self.base));
        if let Some(key) = &self.key {
            builder = builder.header(viv_api::API_KEY_HEADER, key);
        }
        if let Some(node) = &self.node {
            builder = builder.header(viv_api::NODE_HEADER, node);
        }
        builder
    }

    /// Sends a request; a non-2xx answer becomes an error with the server's message.
    pub async fn send(&self, builder: RequestBuilder) -> Result<Response> {
        let response = builder
            .send()
            .await
            .with_context(|| format!("cannot reach the Vivarium server at {}", self.base))?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let text = response.text().await.unwrap_or_default();
        let message = serde_json::from_str::<ErrorBody>(&text)
            .map(|b| b.message)
            .unwrap_or(text);
        let hint = if status == reqwest::StatusCode::UNAUTHORIZED {
            " (set VIV_API_KEY or --api-key; create a key with `viv keys create`)"
        } else {
            ""
        };
        Err(anyhow!("{message} (HTTP {}){hint}", status.as_u16()))
    }

    /// Sends a request and parses a JSON answer.
    pub async fn json<T: serde::de::DeserializeOwned>(&self, builder: RequestBuilder) -> Result<T> {
        let response = self.send(builder).await?;
        response
            .json()
            .await
            .context("the server sent a response this client does not understand")
    }

    /// One sandbox (`GET /sandboxes/{id}`).
    pub async fn sandbox(&self, id: &str) -> Result<viv_api::SandboxInfo> {
        self.json(self.request(Method::GET, &format!("/sandboxes/{id}"))).await
    }
}
