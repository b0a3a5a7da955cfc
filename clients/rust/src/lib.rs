//! Rust client for rlm-server: Recursive Language Models for agents, over JSON-RPC 2.0 on
//! stdio.
//!
//! rlm-server is a long-lived Python process. [`RLMClient`] starts it on the first call
//! (`rlm-server`, or `$ELIZA_RLM_PYTHON_PATH -m rlm_server`), waits for its `ready`
//! notification, and multiplexes any number of concurrent calls from any number of tasks over
//! its stdin and stdout, one JSON message per line, with no limit on line length. Each call
//! has a timeout; a call that times out or whose future is dropped is cancelled on the server
//! with `$/cancelRequest`. Retryable errors are retried with backoff and jitter. The server's
//! stderr is forwarded to [`tracing`] (target `rlm_server`). If the child dies, every pending
//! call fails at once with [`RlmError::Exited`] and the next call starts a new child; when the
//! last clone of the client is dropped the child is killed.
//!
//! ```no_run
//! use rlm_client::{InferRequest, RLMClient, RlmError};
//!
//! # async fn run() -> Result<(), RlmError> {
//! let client = RLMClient::from_env()?;
//! let result = client
//!     .infer(
//!         InferRequest::new(std::fs::read_to_string("book.txt").unwrap())
//!             .query("Who is the murderer?")
//!             .on_progress(|p| eprintln!("progress: {:?}", p.event)),
//!     )
//!     .await?;
//! println!("{} (stub: {})", result.text, result.stub);
//! println!("{:?}", client.metrics());
//! client.close().await;
//! # Ok(()) }
//! ```
//!
//! The wire types are in [`protocol`]; they mirror `protocol/schema.json` of the rlm-server
//! repository.

#![warn(missing_docs)]

mod client;
mod config;
mod connection;
mod error;
mod metrics;
pub mod protocol;
mod request;

pub use client::RLMClient;
pub use config::{MetricsCallback, RLMConfig, RetryConfig};
pub use error::RlmError;
pub use metrics::Metrics;
pub use protocol::{
    Backend, ErrorData, ErrorType, InferOptions, InferResult, Message, Progress, ProgressEvent,
    Prompt, ReadyParams, RpcError, ShutdownResult, StatusResult,
};
pub use request::InferRequest;

/// The README's example, compiled by `cargo test` so that it cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeExample;
