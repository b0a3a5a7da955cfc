//! Measures what the client adds to a call, and how many calls it carries at once.
//!
//! ```sh
//! cargo run --release --example status_bench -- [--current-thread] [SEQUENTIAL] [CONCURRENT] [ROUNDS]
//! ```
//!
//! It runs on Tokio's multi-thread runtime, or on the current-thread one with
//! `--current-thread`, where the client's tasks never hop between threads.
//!
//! 1. Raw pipe: SEQUENTIAL `status` round trips written and read by hand over the pipes of
//!    a server process, with no client: the floor, set by the server and the pipes.
//! 2. Client: SEQUENTIAL `status` calls through [`RlmClient`] to a second server started the
//!    same way, in blocks that alternate with those of 1. The difference of the two
//!    distributions is the client's overhead per call.
//! 3. Throughput: ROUNDS times, CONCURRENT `status` calls from as many tasks at once through
//!    one client; calls per second of each round. Beside it, the same number of requests
//!    written to the raw pipe in one write and their answers read: what the server can do.
//!
//! Defaults: 10000 1000 5. The server runs in stub mode (no backend is needed for `status`).
//! It is `rlm-server`, or `$ELIZA_RLM_PYTHON_PATH -m rlm_server`, as for the client.

use std::process::Stdio;
use std::time::{Duration, Instant};

use rlm_client::{RlmClient, RlmConfig, RlmError};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

/// Calls per alternating block of the sequential comparison.
const BLOCK: usize = 100;

fn main() -> Result<(), RlmError> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let current_thread = args.first().is_some_and(|a| a == "--current-thread");
    if current_thread {
        args.remove(0);
    }
    let mut counts = args.iter().map(|a| a.parse::<usize>().expect("a count"));
    let sequential = counts.next().unwrap_or(10_000);
    let concurrent = counts.next().unwrap_or(1_000);
    let rounds = counts.next().unwrap_or(5);
    let mut runtime = if current_thread {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    let runtime = runtime.enable_all().build().expect("a Tokio runtime");
    println!(
        "runtime: {}",
        if current_thread {
            "current_thread"
        } else {
            "multi_thread, a worker per core"
        }
    );
    // Measured from a spawned task, where an agent's calls run, not from `block_on`'s thread,
    // which is outside the runtime's workers and needs a cross-thread wake for every answer.
    let measured = runtime.spawn(bench(sequential, concurrent, rounds));
    runtime.block_on(measured).expect("the benchmark task")
}

async fn bench(sequential: usize, concurrent: usize, rounds: usize) -> Result<(), RlmError> {
    let config = stub_server(RlmConfig::from_env());
    println!("server: {} {}", config.program, config.args.join(" "));

    let mut raw = RawPipe::start(&config).await;
    let client = RlmClient::new(config);
    client.start().await?;
    // Blocks of raw and client calls alternate, so that whatever else the machine is doing
    // weighs on both alike; the first tenth of each warms up and is not counted.
    let warm_up = sequential / 10;
    let (mut raw_times, mut client_times) = (Vec::new(), Vec::new());
    for block in 0..(sequential + warm_up).div_ceil(BLOCK) {
        for _ in 0..BLOCK {
            let start = Instant::now();
            raw.status().await;
            raw_times.push(start.elapsed());
        }
        for _ in 0..BLOCK {
            let start = Instant::now();
            client.status().await?;
            client_times.push(start.elapsed());
        }
        if block * BLOCK < warm_up {
            raw_times.clear();
            client_times.clear();
        }
    }
    raw_times.truncate(sequential);
    client_times.truncate(sequential);
    report("raw pipe", &raw_times);
    report("client", &client_times);
    let (raw_stats, client_stats) = (summary(&raw_times), summary(&client_times));
    println!(
        "client overhead per status call: p50 {:.1} us, p99 {:.1} us, mean {:.1} us",
        client_stats.p50 - raw_stats.p50,
        client_stats.p99 - raw_stats.p99,
        client_stats.mean - raw_stats.mean
    );
    let mut raw_rates = Vec::with_capacity(rounds);
    let mut rates = Vec::with_capacity(rounds);
    for round in 1..=rounds {
        let raw_elapsed = raw.burst(concurrent).await;
        let elapsed = burst(&client, concurrent).await?;
        let rate = concurrent as f64 / elapsed.as_secs_f64();
        let raw_rate = concurrent as f64 / raw_elapsed.as_secs_f64();
        println!(
            "round {round}: {concurrent} concurrent status calls in {:.1} ms = {rate:.0} calls/s \
             (raw pipe, all written at once: {:.1} ms = {raw_rate:.0}/s)",
            elapsed.as_secs_f64() * 1e3,
            raw_elapsed.as_secs_f64() * 1e3,
        );
        rates.push(rate);
        raw_rates.push(raw_rate);
    }
    println!(
        "throughput of {concurrent} concurrent status calls: client median {:.0} calls/s, \
         raw pipe median {:.0} calls/s",
        median(&mut rates),
        median(&mut raw_rates)
    );
    raw.close().await;
    client.close().await;
    Ok(())
}

/// The configured server in stub mode.
fn stub_server(config: RlmConfig) -> RlmConfig {
    config
        .into_builder()
        .env_remove("GEMINI_API_KEY")
        .env_remove("GOOGLE_API_KEY")
        .env("ELIZA_RLM_BACKEND", "gemini")
        .build()
}

/// A server driven by hand: one request line out, one answer line in.
struct RawPipe {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    line: String,
    id: u64,
}

impl RawPipe {
    async fn start(config: &RlmConfig) -> Self {
        let mut command = Command::new(&config.program);
        for name in &config.env_remove {
            command.env_remove(name);
        }
        let mut child = command
            .args(&config.args)
            .envs(config.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start the server");
        let mut raw = Self {
            stdin: child.stdin.take().unwrap(),
            stdout: BufReader::new(child.stdout.take().unwrap()),
            child,
            line: String::new(),
            id: 0,
        };
        raw.stdout.read_line(&mut raw.line).await.unwrap();
        assert!(
            raw.line.contains("\"ready\""),
            "the server did not start: {:?}",
            raw.line
        );
        raw
    }

    async fn status(&mut self) {
        self.id += 1;
        let request = format!(
            "{{\"jsonrpc\":\"2.0\",\"id\":{},\"method\":\"status\"}}\n",
            self.id
        );
        self.stdin.write_all(request.as_bytes()).await.unwrap();
        self.stdin.flush().await.unwrap();
        self.line.clear();
        self.stdout.read_line(&mut self.line).await.unwrap();
        assert!(self.line.contains("\"result\""), "{}", self.line);
    }

    /// Writes `count` requests in one go, then reads the `count` answers.
    async fn burst(&mut self, count: usize) -> Duration {
        let start = Instant::now();
        let mut requests = String::new();
        for _ in 0..count {
            self.id += 1;
            requests.push_str(&format!(
                "{{\"jsonrpc\":\"2.0\",\"id\":{},\"method\":\"status\"}}\n",
                self.id
            ));
        }
        self.stdin.write_all(requests.as_bytes()).await.unwrap();
        self.stdin.flush().await.unwrap();
        for _ in 0..count {
            self.line.clear();
            self.stdout.read_line(&mut self.line).await.unwrap();
        }
        start.elapsed()
    }

    async fn close(mut self) {
        drop(self.stdin);
        let _ = self.child.wait().await;
    }
}

/// Time for `count` tasks to each get one `status` answer through `client`.
async fn burst(client: &RlmClient, count: usize) -> Result<Duration, RlmError> {
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..count {
        let client = client.clone();
        tasks.spawn(async move { client.status().await.map(drop) });
    }
    while let Some(outcome) = tasks.join_next().await {
        outcome.expect("task")?;
    }
    Ok(start.elapsed())
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

struct Summary {
    p50: f64,
    p99: f64,
    mean: f64,
}

/// Percentiles and mean, in microseconds.
fn summary(times: &[Duration]) -> Summary {
    let mut micros: Vec<f64> = times.iter().map(|t| t.as_secs_f64() * 1e6).collect();
    micros.sort_by(f64::total_cmp);
    let at = |q: f64| micros[((micros.len() as f64 * q) as usize).min(micros.len() - 1)];
    Summary {
        p50: at(0.50),
        p99: at(0.99),
        mean: micros.iter().sum::<f64>() / micros.len() as f64,
    }
}

fn report(what: &str, times: &[Duration]) {
    let s = summary(times);
    println!(
        "{what}: {} sequential status calls: p50 {:.1} us, p99 {:.1} us, mean {:.1} us",
        times.len(),
        s.p50,
        s.p99,
        s.mean
    );
}
