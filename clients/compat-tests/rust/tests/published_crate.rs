//! The published Rust crate `elizaos-plugin-rlm` 0.1.0, unmodified, driving rlm-server.
//!
//! The crate starts `$ELIZA_RLM_PYTHON_PATH -m elizaos_plugin_rlm.server`, which exists in an
//! environment where `rlm-server-plugin-shim` has run (`.ci/run` does so in `.venv`). The model
//! is the repository's scripted fixture; the child inherits the base URL and key from us, as
//! it would from a user's shell.

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use elizaos_plugin_rlm::{RLMBackend, RLMClient, RLMConfig};

/// The repository root: this crate lives in `clients/compat-tests/rust`.
fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../..")
}

/// The interpreter the crate runs: the one the user points `ELIZA_RLM_PYTHON_PATH` at.
fn python() -> String {
    std::env::var("ELIZA_RLM_PYTHON_PATH")
        .expect("ELIZA_RLM_PYTHON_PATH: an interpreter with rlm-server and its plugin shim")
}

/// The scripted OpenAI-compatible server (tests/fixtures/openai_fixture.py), until dropped.
struct Fixture {
    child: Child,
    _stdin: ChildStdin,
    base_url: String,
}

impl Fixture {
    fn start(rules: &serde_json::Value) -> Self {
        let path = std::env::temp_dir().join(format!("compat-rules-{}.json", std::process::id()));
        std::fs::write(&path, rules.to_string()).unwrap();
        let mut child = Command::new(python())
            .arg(repo_root().join("tests/fixtures/openai_fixture.py"))
            .arg("--rules")
            .arg(&path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the fixture");
        let mut first = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut first)
            .unwrap();
        let address: serde_json::Value = serde_json::from_str(&first).expect("address line");
        Self {
            _stdin: child.stdin.take().unwrap(),
            child,
            base_url: address["base_url"].as_str().unwrap().to_owned(),
        }
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Parent pid and state of a process, from /proc; None once it has gone.
fn stat(pid: u32) -> Option<(u32, char)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let mut fields = text.rsplit_once(')')?.1.split_whitespace();
    let state = fields.next()?.chars().next()?;
    Some((fields.next()?.parse().ok()?, state))
}

/// Every live process below `root`.
fn descendants(root: u32) -> HashSet<u32> {
    let all: Vec<(u32, u32)> = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| Some((pid, stat(pid)?.0)))
        .collect();
    let mut found = HashSet::new();
    let mut frontier = vec![root];
    while let Some(parent) = frontier.pop() {
        for (pid, _) in all.iter().filter(|(_, ppid)| *ppid == parent) {
            if found.insert(*pid) {
                frontier.push(*pid);
            }
        }
    }
    found
}

fn alive(pids: &HashSet<u32>) -> Vec<u32> {
    pids.iter()
        .copied()
        .filter(|pid| matches!(stat(*pid), Some((_, s)) if s != 'Z'))
        .collect()
}

/// Model code that finds the needle in `context` (the crate sends a list of messages).
const FIND_IN_REPL: &str = "```repl\nimport re\ntext = \" \".join(m[\"content\"] for m in context)\n\
answer[\"content\"] = re.search(r\"vault code is (\\w+)\", text).group(1)\nanswer[\"ready\"] = True\n```";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn published_crate_gets_real_answers_and_leaves_no_process() {
    let fixture = Fixture::start(&serde_json::json!([{"when": "root", "reply": FIND_IN_REPL}]));
    // The crate passes its own settings to the child and lets it inherit the rest.
    std::env::set_var("ELIZA_RLM_BASE_URL", &fixture.base_url);
    std::env::set_var("OPENAI_API_KEY", "test-key");
    let config = RLMConfig {
        backend: RLMBackend::OpenAI,
        root_model: "scripted".to_owned(),
        python_path: python(),
        ..RLMConfig::default()
    };
    let client = RLMClient::new(config).expect("valid config");

    let started = Instant::now();
    let status = client.get_status().await;
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "ready within the crate's 10 s"
    );
    assert!(
        status.available && client.is_available(),
        "available: {status:?}"
    );
    assert_eq!(
        (status.backend.as_str(), status.environment.as_str()),
        ("openai", "local")
    );
    assert_eq!((status.max_iterations, status.max_depth), (4, 1));

    let needle = format!(
        "N{}X{}",
        std::process::id(),
        started.elapsed().as_nanos() % 100_000
    );
    let context = format!(
        "{}The vault code is {needle}. {}",
        "filler. ".repeat(50_000),
        "more. ".repeat(100)
    );
    let result = client.infer(context.as_str().into(), None).await;
    assert_eq!(result.text, needle, "metadata: {:?}", result.metadata);
    assert!(!result.metadata.stub && result.metadata.error.is_none());
    assert_eq!(result.metadata.iterations, Some(1));
    let cost = result
        .cost
        .expect("cost, as ELIZA_RLM_TRACK_COSTS=true asks");
    assert!(cost.root_input_tokens > 0);
    let trajectory = result
        .trajectory
        .expect("trajectory, as ELIZA_RLM_LOG_TRAJECTORIES asks");
    assert_eq!(trajectory.prompt_length, context.len());
    assert_eq!(trajectory.steps[0].strategy, "grep");

    let mut family = descendants(std::process::id());
    family.remove(&fixture.child.id());
    assert!(
        family.len() >= 2,
        "server and zygote run below us: {family:?}"
    );
    client.shutdown().await.expect("shutdown");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !alive(&family).is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        alive(&family),
        Vec::<u32>::new(),
        "no process left after shutdown"
    );
}
