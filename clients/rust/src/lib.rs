//! Rust client for rlm-server: Recursive Language Models for agents, over JSON-RPC 2.0 on
//! stdio.
//!
//! rlm-server is a long-lived Python process. [`RlmClient`] starts it on the first call
//! (`rlm-server`, or `$ELIZA_RLM_PYTHON_PATH -m rlm_server`, or a [`tokio::process::Command`]
//! of your own through [`RlmConfigBuilder::command`]), waits for its `ready` notification,
//! and multiplexes any number of concurrent calls from any number of tasks over its stdin and
//! stdout, one JSON message per line. Each call has a timeout and a `tracing` span
//! (`rlm_request`, with its method and id); a call that times out or whose future is dropped
//! is cancelled on the server with `$/cancelRequest`. What the server could not start (a full
//! queue, a server that died) is retried with backoff and jitter; nothing else is, since the
//! server retries its backend itself. The server's stderr is forwarded to [`tracing`]
//! (target `rlm_server`). If the child dies, every pending call fails at once with
//! [`RlmError::Exited`] and the next call starts a new child; when the last clone of the
//! client is dropped the child is killed.
//!
//! ```no_run
//! use rlm_client::{InferRequest, RlmClient, RlmError};
//!
//! # async fn run() -> Result<(), RlmError> {
//! let client = RlmClient::from_env();
//! let result = client
//!     .infer(
//!         InferRequest::new(std::fs::read_to_string("book.txt").unwrap())
//!             .query("Who is the murderer?")
//!             .on_progress(|p| eprintln!("progress: {}", p.event)),
//!     )
//!     .await?;
//! println!("{} (stub: {})", result.text, result.stub);
//! println!("{:?}", client.metrics());
//! let exit = client.close().await;
//! println!("the server ended: {exit:?}");
//! # Ok(()) }
//! ```
//!
//! # Stored contexts and sessions
//!
//! A document asked about more than once is stored once: [`RlmClient::load_context`] takes a
//! text, a list, or a reader or file streamed in chunks ([`ContextSource`]) and returns a
//! [`LoadedContext`], whose id [`InferRequest::context`] names instead of sending the text
//! again; [`RlmClient::list_contexts`] and [`RlmClient::drop_context`] manage the store. A
//! [`Session`] ([`RlmClient::open_session`]) keeps one REPL across turns, so a turn can read
//! what an earlier one computed. Both live in the server process that made them.
//!
//! ```no_run
//! # async fn run() -> Result<(), rlm_client::RlmError> {
//! use rlm_client::{ContextSource, InferRequest, RlmClient};
//! let client = RlmClient::from_env();
//! let book = client.load_context(ContextSource::file("book.txt")).await?;
//! let request = InferRequest::context(&book.context_id).query("Who is the murderer?");
//! println!("{}", client.infer(request).await?.text);
//! let session = client.open_session(Some(book.context_id.as_str())).await?;
//! session.infer("Keep every alibi in a variable.").await?;
//! println!("{}", session.infer("Which alibi is false?").await?.text);
//! session.close().await?;
//! # Ok(()) }
//! ```
//!
//! # No line can lose a call
//!
//! An answer that does not decode (an error without `data.type`, a count written as `2.0`, a
//! result of the wrong shape) fails its own call at once with [`RlmError::Protocol`]: the id
//! is read before the body. A stdout line longer than [`RlmConfig::max_line_bytes`] is read to
//! its end without being kept and fails the call it answers with [`RlmError::LineTooLong`]
//! (every pending call, when its id cannot be read). A stderr line without an end is
//! forwarded in pieces of [`RlmConfig::max_stderr_line`] bytes.
//!
//! # Stopping
//!
//! [`RlmClient::close`] sends the server `shutdown` with [`RlmConfig::shutdown_grace`] (30 s,
//! the server's own default): it admits nothing new, lets in-flight requests finish for up to
//! the grace, cancels the rest and exits. The client waits the grace plus
//! [`RlmConfig::close_margin`], then sends SIGTERM, waits [`RlmConfig::term_timeout`], then
//! SIGKILL, and returns how the server ended ([`Exit`]). [`RlmClient::shutdown`] does the same
//! with a grace of your choosing and waits for the server's answer.
//!
//! # When the host process exits
//!
//! Dropping the last [`RlmClient`] kills the server: the child is spawned with
//! `kill_on_drop(true)`, and the client's supervisor task kills it when the client goes away.
//! That needs destructors and a running Tokio runtime. When the host process ends without
//! them (`std::process::exit`, a panic with `panic = "abort"`, a signal, a crash), nothing
//! in this process kills the child. The server then notices by itself that the process that
//! spawned it is gone (on Linux by a parent-death signal it asks for at start, elsewhere by
//! its parent pid changing) and cancels all its work at once rather than draining for the
//! grace, so no tokens are spent for nobody. (The end of its input alone keeps it draining:
//! that is how `echo ... | rlm-server` works.) To let in-flight work finish instead, call
//! [`RlmClient::close`] before exiting.
//!
//! The wire types are in [`protocol`]; they mirror `protocol/schema.json` of the rlm-server
//! repository, and a test fails on any field, option, progress event or error type of the
//! schema that this crate does not know.

#![warn(missing_docs)]

mod client;
mod config;
mod connection;
mod context;
mod error;
mod lines;
mod metrics;
pub mod protocol;
mod request;
mod session;
mod tools;

#[cfg(feature = "elizaos")]
pub mod elizaos_plugin;
#[cfg(feature = "elizaos")]
pub use elizaos_plugin::{
    RlmPluginOptions, create_rlm_elizaos_plugin, create_rlm_elizaos_plugin_with,
};

pub use client::RlmClient;
pub use config::{CommandFactory, MetricsCallback, RetryConfig, RlmConfig, RlmConfigBuilder};
pub use connection::Exit;
pub use context::{ContextSource, LoadRequest, LoadedContext};
pub use error::RlmError;
pub use metrics::Metrics;
pub use protocol::{
    Backend, Budget, ContextListResult, ErrorData, ErrorType, InferOptions, InferResult, Message,
    Progress, ProgressEvent, Prompt, ReadyParams, RpcError, ShutdownResult, StatusResult,
    StoredContext, SubcallErrors,
};
pub use request::InferRequest;
pub use session::{Session, SessionRequest};

/// The README's example, compiled by `cargo test` so that it cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeExample;
