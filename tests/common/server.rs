//! The real binary serving on a free port with its own state directory, over real HTTP
//! (the jobs, evaluations and nanoGPT tests).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub struct Server {
    pub child: Child,
    pub base: String,
    pub log: PathBuf,
    pub agent: ureq::Agent,
}

impl Server {
    pub fn start(state: &Path, args: &[&str]) -> Self {
        let port = super::free_port();
        let log = state.with_extension(format!("{port}.log"));
        let child = Command::new(env!("CARGO_BIN_EXE_tokenscope"))
            .args(["serve", "--port", &port.to_string(), "--state-dir"])
            .arg(state)
            .args(["--train-threads", "1"])
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let server = Self {
            child,
            base: format!("http://127.0.0.1:{port}"),
            log,
            agent: super::http_agent(Some(Duration::from_secs(120))),
        };
        server.wait(Duration::from_secs(120), "healthy", |s| {
            s.get("/health").0 == 200
        });
        server
    }

    /// A GET; status 0 when no answer came.
    pub fn get(&self, path: &str) -> (u16, Value) {
        match self.agent.get(&format!("{}{path}", self.base)).call() {
            Ok(mut r) => (
                r.status().as_u16(),
                r.body_mut().read_json().unwrap_or(Value::Null),
            ),
            Err(_) => (0, Value::Null),
        }
    }

    pub fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let mut r = self
            .agent
            .post(&format!("{}{path}", self.base))
            .send_json(body)
            .unwrap();
        (
            r.status().as_u16(),
            r.body_mut().read_json().unwrap_or(Value::Null),
        )
    }

    pub fn upload(&self, text: &str) -> String {
        let mut r = self
            .agent
            .post(&format!("{}/train/uploads", self.base))
            .content_type("text/plain")
            .send(text.as_bytes())
            .unwrap();
        assert_eq!(r.status().as_u16(), 201);
        let v: Value = r.body_mut().read_json().unwrap();
        v["id"].as_str().unwrap().to_string()
    }

    pub fn wait(&self, limit: Duration, what: &str, mut done: impl FnMut(&Self) -> bool) {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if done(self) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "timed out waiting for {what}; server log:\n{}",
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
    }

    pub fn job(&self, id: &str) -> Value {
        let (code, job) = self.get(&format!("/train/jobs/{id}"));
        assert_eq!(code, 200, "{job}");
        job
    }

    pub fn wait_job(&self, id: &str, status: &str) -> Value {
        self.wait(
            Duration::from_secs(300),
            &format!("job {id} {status}"),
            |s| {
                let job = s.job(id);
                assert!(
                    job["status"] != "failed" || status == "failed",
                    "job failed: {job}"
                );
                job["status"] == status
            },
        );
        self.job(id)
    }

    pub fn model(&self, id: &str) -> Value {
        let (code, m) = self.get(&format!("/models/{id}"));
        assert_eq!(code, 200, "{m}");
        m
    }

    pub fn client(&self, args: &[&str]) -> (bool, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_tokenscope"))
            .args(["client", "--url", &self.base])
            .args(args)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        (out.status.success(), text)
    }

    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
