//! Ask rlm-server one question about a long document, with progress, then print the server's
//! status and the client's metrics, and close.
//!
//! ```sh
//! cargo run --example basic
//! ```
//!
//! It runs `rlm-server` from the `PATH` (or `$ELIZA_RLM_PYTHON_PATH -m rlm_server`). Without
//! backend credentials the server runs in stub mode and the answer says so; export for example
//! `ELIZA_RLM_BACKEND=openai OPENAI_API_KEY=...` for a real one.

use rlm_client::{InferRequest, RlmClient, RlmError};

#[tokio::main]
async fn main() -> Result<(), RlmError> {
    let client = RlmClient::from_env();
    let ready = client.start().await?;
    println!(
        "rlm-server {} (pid {}): backend {}, model {}, stub {}",
        ready.version, ready.pid, ready.backend, ready.model, ready.stub
    );

    let mut document: String = (1..=5000)
        .map(|n| format!("Line {n}: nothing of interest here.\n"))
        .collect();
    document.insert_str(document.len() / 2, "The secret code is ZEBRA-42.\n");
    let request = InferRequest::new(document)
        .query("What is the secret code?")
        .on_progress(|progress| eprintln!("progress: {:?}", progress.event));
    let result = client.infer(request).await?;
    println!("answer: {:?} (stub: {})", result.text, result.stub);
    println!(
        "{} model calls, {} input and {} output tokens",
        result.usage.calls, result.usage.input_tokens, result.usage.output_tokens
    );

    let status = client.status().await?;
    println!(
        "server: {} requests, {} in flight, available: {}{}",
        status.metrics.total_requests,
        status.in_flight,
        status.available,
        status.reason.map(|r| format!(" ({r})")).unwrap_or_default()
    );
    println!("client metrics: {:#?}", client.metrics());
    let exit = client.close().await;
    println!("server ended: {exit:?}");
    Ok(())
}
