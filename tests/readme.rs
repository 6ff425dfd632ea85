//! Every ```bash example in README.md, read from the README (not copied here) and run against
//! the real binary: each `curl` must answer 2xx, each other command exit 0, and each
//! `tokenscope serve` become healthy. Fenced `text` blocks are usage synopses and `sh` ones
//! need Docker: neither is an example this test can run.
//!
//! What is changed before a command runs, and why:
//! - `localhost:8000` → the port of the server the block started (tests run side by side);
//!   a block with requests but no `serve` of its own gets `tokenscope serve` (the default model).
//! - `/tmp/…` and `~/models` → a temporary folder (no shared or home paths).
//! - `--steps 30` / `"steps": 30` → 2: the 135M model takes seconds per step on 2 cores; the
//!   example's shape (data, flags, output) is what is checked, not its figures.
//! - `upload-3f…` / `job-9c…` / `eval-5d…` → the ids the example's earlier requests returned.
//! - `../nanoGPT/out-shakespeare-char` → a nanoGPT-shaped folder holding the generated
//!   character-level checkpoint (`scripts/nanogpt.sh`), its `meta.pkl` in `data/<dataset>/`.
//! - `~/.cache/nanochat/` (HOME is the temporary folder) → nanochat's base-dir layout holding
//!   the generated d4 run as `base_checkpoints/d20` and its tokenizer (`scripts/nanochat.sh`).
//!
//! The README's first block (`./scripts/run.sh`, `./scripts/test.sh`) is not run: the second is
//! the command that runs this test.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Block {
    line: usize,
    commands: Vec<String>,
}

/// The ```bash blocks, each a list of commands (continued lines joined, output comments
/// dropped).
fn bash_blocks(readme: &str) -> Vec<Block> {
    let mut blocks = Vec::new();
    let mut current: Option<Block> = None;
    let mut pending = String::new();
    for (i, line) in readme.lines().enumerate() {
        match &mut current {
            None if line.trim_end() == "```bash" => {
                current = Some(Block {
                    line: i + 1,
                    commands: Vec::new(),
                })
            }
            None => {}
            Some(_) if line.starts_with("```") => blocks.extend(current.take()),
            Some(block) => {
                if pending.is_empty() && (line.trim().is_empty() || line.trim().starts_with('#')) {
                    continue;
                }
                if !pending.is_empty() {
                    pending.push('\n');
                }
                pending.push_str(line);
                // A command goes on while a line ends with `\` or a single quote is open.
                let open_quote = pending.matches('\'').count() % 2 == 1;
                if !open_quote && !line.trim_end().ends_with('\\') {
                    block
                        .commands
                        .push(without_comment(&std::mem::take(&mut pending)));
                }
            }
        }
    }
    blocks
}

/// `cmd` without a trailing `# comment` (outside quotes), so that flags can be appended.
fn without_comment(cmd: &str) -> String {
    let (mut single, mut double, mut prev) = (false, false, ' ');
    for (i, c) in cmd.char_indices() {
        match c {
            '\'' if !double => single = !single,
            '"' if !single => double = !double,
            '#' if !single && !double && prev.is_whitespace() => {
                return cmd[..i].trim_end().to_string()
            }
            _ => {}
        }
        prev = c;
    }
    cmd.to_string()
}

struct Run {
    tmp: PathBuf,
    work: PathBuf,
    path_env: String,
    port: u16,
    server: Option<Child>,
    ids: HashMap<&'static str, String>,
    servers: usize,
}

impl Run {
    fn adapt(&self, cmd: &str) -> String {
        let tmp = self.tmp.display().to_string();
        let mut c = cmd
            .replace("localhost:8000", &format!("127.0.0.1:{}", self.port))
            .replace("/tmp/", &format!("{tmp}/"))
            .replace("~/models", &format!("{tmp}/models-dir"))
            .replace("--steps 30", "--steps 2")
            .replace("\"steps\": 30", "\"steps\": 2");
        for (placeholder, kind) in [
            ("upload-3f…", "upload"),
            ("job-9c…", "job"),
            ("eval-5d…", "eval"),
        ] {
            if let Some(id) = self.ids.get(kind) {
                c = c.replace(placeholder, id);
            }
        }
        c
    }

    fn shell(&self, cmd: &str) -> Command {
        let mut c = Command::new("sh");
        c.arg("-c")
            .arg(cmd)
            .current_dir(&self.work)
            .env("PATH", &self.path_env)
            .env("HOME", &self.tmp);
        c
    }

    fn start_server(&mut self, cmd: &str, line: usize) {
        self.stop_server();
        self.port = common::free_port();
        self.servers += 1;
        let state = self.tmp.join(format!("state-{}", self.servers));
        let cmd = format!(
            "exec {} --port {} --state-dir {}",
            self.adapt(cmd).trim_end(),
            self.port,
            state.display()
        );
        let log = self.tmp.join(format!("server-{}.log", self.servers));
        let child = self
            .shell(&cmd)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        self.server = Some(child);
        let agent = common::http_agent(Some(Duration::from_secs(5)));
        let url = format!("http://127.0.0.1:{}/health", self.port);
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            if agent
                .get(&url)
                .call()
                .is_ok_and(|r| r.status().as_u16() == 200)
            {
                return;
            }
            if let Some(Ok(Some(status))) = self.server.as_mut().map(|c| c.try_wait()) {
                panic!(
                    "README line {line}: `{cmd}` exited ({status}):\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "README line {line}: `{cmd}` not healthy in 180 s:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn stop_server(&mut self) {
        if let Some(mut c) = self.server.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn curl(&mut self, cmd: &str, line: usize) {
        let cmd = format!(
            "{} -sS -w '\\nHTTP_STATUS %{{http_code}}\\n'",
            self.adapt(cmd)
        );
        let out = self.shell(&cmd).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, status) = text
            .rsplit_once("HTTP_STATUS ")
            .unwrap_or_else(|| panic!("README line {line}: `{cmd}`: no status in {text:?}"));
        let status: u16 = status.trim().parse().unwrap_or(0);
        assert!(
            out.status.success() && (200..300).contains(&status),
            "README line {line}: `{cmd}` answered {status}: {body}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(body.trim()) {
            if let Some(id) = v["id"].as_str() {
                for kind in ["upload", "job", "eval"] {
                    if id.starts_with(&format!("{kind}-")) {
                        self.ids.insert(kind, id.to_string());
                    }
                }
            }
        }
    }

    fn command(&self, cmd: &str, line: usize) {
        let cmd = self.adapt(cmd);
        let out = self.shell(&cmd).output().unwrap();
        assert!(
            out.status.success(),
            "README line {line}: `{cmd}` failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        self.stop_server();
    }
}

#[test]
fn every_bash_example_in_the_readme_runs() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let mut blocks = bash_blocks(&readme);
    assert!(blocks.len() >= 6, "found {} bash blocks", blocks.len());
    assert!(
        blocks[0]
            .commands
            .iter()
            .any(|c| c.contains("scripts/test.sh")),
        "the first block is the two commands"
    );
    blocks.remove(0);
    // A block that writes /tmp/ft runs before the ones that serve it.
    blocks.sort_by_key(|b| !b.commands.iter().any(|c| c.contains("--output /tmp/ft")));

    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    std::fs::create_dir_all(tmp.path().join("models-dir")).unwrap();
    for dir in ["models", "scripts", "assets"] {
        std::os::unix::fs::symlink(root.join(dir), work.join(dir)).unwrap();
    }
    let nano = root.join("target/nanogpt/char-nobias");
    assert!(nano.join("ckpt.pt").is_file(), "run ./scripts/nanogpt.sh");
    let run_dir = tmp.path().join("nanoGPT/out-shakespeare-char");
    let data_dir = tmp.path().join("nanoGPT/data/shakespeare_char");
    std::fs::create_dir_all(&run_dir).unwrap();
    std::fs::create_dir_all(&data_dir).unwrap();
    std::fs::copy(nano.join("ckpt.pt"), run_dir.join("ckpt.pt")).unwrap();
    std::fs::copy(nano.join("meta.pkl"), data_dir.join("meta.pkl")).unwrap();
    // nanochat's base dir in the (temporary) home: `~/.cache/nanochat/base_checkpoints/d20`
    // holds the generated d4 run, and `~/.cache/nanochat/tokenizer/` its tokenizer.
    let nanochat = root.join("target/nanochat/base");
    assert!(
        nanochat.join("tokenizer/tokenizer.pkl").is_file(),
        "run ./scripts/nanochat.sh"
    );
    let base = tmp.path().join(".cache/nanochat");
    for (from, to) in [
        ("tokenizer", "tokenizer"),
        ("base_checkpoints/d4", "base_checkpoints/d20"),
    ] {
        std::fs::create_dir_all(base.join(to)).unwrap();
        for f in std::fs::read_dir(nanochat.join(from)).unwrap() {
            let f = f.unwrap();
            std::fs::copy(f.path(), base.join(to).join(f.file_name())).unwrap();
        }
    }
    // `../nanoGPT` from the working folder.
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_tokenscope"));
    let path_env = format!(
        "{}:{}",
        bin.parent().unwrap().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut run = Run {
        tmp: tmp.path().to_path_buf(),
        work: work.clone(),
        path_env,
        port: 0,
        server: None,
        ids: HashMap::new(),
        servers: 0,
    };
    let mut ran = 0;
    for block in &blocks {
        let has_serve = block
            .commands
            .iter()
            .any(|c| c.trim_start().starts_with("tokenscope serve"));
        let has_curl = block
            .commands
            .iter()
            .any(|c| c.trim_start().starts_with("curl"));
        if has_curl && !has_serve {
            run.start_server("tokenscope serve", block.line);
        }
        for cmd in &block.commands {
            let c = cmd.trim_start();
            if c.starts_with("tokenscope serve") {
                run.start_server(c, block.line);
            } else if c.starts_with("curl") {
                run.curl(c, block.line);
            } else {
                run.command(c, block.line);
            }
            ran += 1;
        }
        run.stop_server();
    }
    eprintln!("README: {ran} commands in {} blocks ran", blocks.len());
}
