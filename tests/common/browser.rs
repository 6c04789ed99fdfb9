//! A real browser for the builder's web pages: Debian's Chromium, headless,
//! driven over WebDriver by Debian's `chromedriver`, everything on loopback.
//!
//! [`Browser::start`] runs a chromedriver of its own on a free loopback port
//! and opens one session in it: one headless Chromium with a fresh profile
//! in a temporary directory. [`Browser::goto`] loads a page; [`text`],
//! [`attribute`] and [`count`] read it through a script run in the page
//! (`querySelector` and a read in one step, so no element goes stale
//! between finding and reading it); [`execute`] runs any script.
//!
//! Pages that change by themselves (a script following an EventSource) are
//! waited on without reloading: [`wait_for_text`], [`wait_for_attribute`]
//! and the general [`wait_until`] poll the page until it shows what they
//! wait for or their deadline passes. Chromium's `--virtual-time-budget`
//! cannot do this: it waits until the network idles, which a page holding
//! an EventSource open never does. A wait that times out saves a screenshot
//! and the page source as `target/browser-failures/<test>-<n>.png` and
//! `.html` and names both in its panic message.
//!
//! chromedriver listens on 127.0.0.1 and ::1 only, as it does unless told
//! `--allowed-ips` (with which it listens on every interface, so that flag
//! is not given). Chromium resolves no host name but `localhost`. Dropping
//! the [`Browser`] ends the session, which quits Chromium, and then kills
//! the chromedriver it started, by its child handle.
//!
//! [`text`]: Browser::text
//! [`attribute`]: Browser::attribute
//! [`count`]: Browser::count
//! [`execute`]: Browser::execute
//! [`wait_for_text`]: Browser::wait_for_text
//! [`wait_for_attribute`]: Browser::wait_for_attribute
//! [`wait_until`]: Browser::wait_until

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use base64::Engine as _;
use serde_json::{Value, json};
use tokio::time::Instant;

use super::net::{free_port, try_http_json, try_http_json_blocking};
use super::nix::which;
use super::wait::{WAIT, poll};

/// Debian's `/usr/bin/chromium` is a shell script that adds flags from
/// /etc/chromium.d (extensions among them) before it runs this binary; the
/// tests run the binary itself, with their flags only.
const DEBIAN_CHROMIUM: &str = "/usr/lib/chromium/chromium";

/// How long the session and the chromedriver get to end when dropped.
const DROP_WAIT: Duration = Duration::from_secs(10);

/// A headless Chromium in a WebDriver session of a chromedriver of its own.
pub struct Browser {
    session: String,
    /// The browser process chromedriver started (`goog:processID`).
    browser_pid: Option<u32>,
    driver: Driver,
}

/// The chromedriver process and the directory with the browser's profile
/// and home and the chromedriver's log.
struct Driver {
    child: Child,
    addr: String,
    dir: tempfile::TempDir,
}

impl Driver {
    fn profile(&self) -> PathBuf {
        self.dir.path().join("profile")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("chromedriver.log")).unwrap_or_default()
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Browser {
    /// Starts chromedriver on a free loopback port, waits until it says it
    /// is ready, and opens a session with a headless Chromium.
    pub async fn start() -> Browser {
        for (tool, package) in [
            ("chromedriver", "chromium-driver"),
            ("chromium", "chromium"),
        ] {
            assert!(
                which(tool).is_some(),
                "`{tool}` is not installed; run ./scripts/test, which installs it \
                 (Debian: apt-get install {package})"
            );
        }
        let chromium = if Path::new(DEBIAN_CHROMIUM).is_file() {
            DEBIAN_CHROMIUM.to_owned()
        } else {
            which("chromium").unwrap()
        };
        let chromedriver = which("chromedriver").unwrap();

        let dir = tempfile::tempdir().unwrap();
        let log = std::fs::File::create(dir.path().join("chromedriver.log")).unwrap();
        let port = free_port();
        // Chromium keeps files of its own under $HOME (an NSS database, caches):
        // a home in the temporary directory keeps them out of the real one.
        let child = Command::new(&chromedriver)
            .arg(format!("--port={port}"))
            .env("HOME", dir.path())
            .env("XDG_CONFIG_HOME", dir.path().join("config"))
            .env("XDG_CACHE_HOME", dir.path().join("cache"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|err| panic!("cannot start {chromedriver}: {err}"));
        let mut driver = Driver {
            child,
            addr: format!("127.0.0.1:{port}"),
            dir,
        };

        poll(
            "chromedriver to say it is ready",
            async || {
                if let Some(status) = driver.child.try_wait().unwrap() {
                    panic!(
                        "chromedriver exited ({status}) before it was ready:\n{}",
                        driver.log()
                    );
                }
                let answer =
                    try_http_json("GET", &driver.addr, "/status", None, Duration::from_secs(5))
                        .await;
                answer.is_ok_and(|(_, status)| status["value"]["ready"] == true)
            },
            |ready| *ready,
        )
        .await;

        let wait_ms = u64::try_from(WAIT.as_millis()).unwrap();
        let capabilities = json!({
            "capabilities": {
                "alwaysMatch": {
                    "browserName": "chrome",
                    "pageLoadStrategy": "normal",
                    "timeouts": { "implicit": 0, "pageLoad": wait_ms, "script": wait_ms },
                    "goog:chromeOptions": {
                        "binary": chromium,
                        "args": [
                            "--headless=new",
                            // The tests run as root, where the sandbox cannot start.
                            "--no-sandbox",
                            "--disable-gpu",
                            "--disable-dev-shm-usage",
                            format!("--user-data-dir={}", driver.profile().display()),
                            "--window-size=1280,900",
                            "--no-first-run",
                            "--disable-component-update",
                            "--disable-domain-reliability",
                            // Nothing but loopback: every other name fails to resolve.
                            "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE localhost , EXCLUDE 127.0.0.1",
                        ],
                    },
                },
            },
        });
        let (status, mut reply) =
            try_http_json("POST", &driver.addr, "/session", Some(&capabilities), WAIT)
                .await
                .unwrap_or_else(|err| {
                    panic!("chromedriver: no new session: {err}\n{}", driver.log())
                });
        let value = reply["value"].take();
        assert_eq!(
            status,
            200,
            "chromedriver: no new session: {}: {}\n{}",
            value["error"],
            value["message"],
            driver.log()
        );
        let session = value["sessionId"].as_str().unwrap().to_owned();
        let browser_pid = value["capabilities"]["goog:processID"]
            .as_u64()
            .and_then(|pid| u32::try_from(pid).ok());
        Browser {
            session,
            browser_pid,
            driver,
        }
    }

    /// Where the chromedriver listens (`127.0.0.1:<port>`).
    pub fn driver_addr(&self) -> &str {
        &self.driver.addr
    }

    /// A WebDriver command of this session: its `value`, or what went wrong.
    async fn try_command(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, String> {
        let path = format!("/session/{}{path}", self.session);
        let (status, mut reply) = try_http_json(method, &self.driver.addr, &path, body, WAIT)
            .await
            .map_err(|err| format!("{method} {path}: {err}"))?;
        let value = reply["value"].take();
        if status == 200 {
            Ok(value)
        } else {
            Err(format!(
                "{method} {path}: {status} {}: {}",
                value["error"], value["message"]
            ))
        }
    }

    async fn command(&self, method: &str, path: &str, body: Option<&Value>) -> Value {
        self.try_command(method, path, body)
            .await
            .unwrap_or_else(|err| panic!("WebDriver: {err}"))
    }

    /// Loads `url` and returns once its `load` event has fired.
    pub async fn goto(&self, url: &str) {
        self.command("POST", "/url", Some(&json!({ "url": url })))
            .await;
    }

    /// The address of the page shown now.
    pub async fn url(&self) -> String {
        let url = self.command("GET", "/url", None).await;
        url.as_str().unwrap().to_owned()
    }

    /// Runs `script` as the body of a function in the page, with `args` as
    /// its `arguments`; what it returns (awaited, if a promise) as JSON.
    pub async fn execute(&self, script: &str, args: &[Value]) -> Value {
        self.try_execute(script, args)
            .await
            .unwrap_or_else(|err| panic!("WebDriver: {err}"))
    }

    async fn try_execute(&self, script: &str, args: &[Value]) -> Result<Value, String> {
        let body = json!({ "script": script, "args": args });
        self.try_command("POST", "/execute/sync", Some(&body)).await
    }

    /// The rendered text (`innerText`) of the first element matching `css`;
    /// `None` when nothing matches.
    pub async fn text(&self, css: &str) -> Option<String> {
        let text = self
            .execute(
                "const e = document.querySelector(arguments[0]); \
                 return e === null ? null : e.innerText;",
                &[json!(css)],
            )
            .await;
        text.as_str().map(str::to_owned)
    }

    /// Attribute `name` of the first element matching `css`; `None` when
    /// nothing matches or it has no such attribute.
    pub async fn attribute(&self, css: &str, name: &str) -> Option<String> {
        let value = self
            .execute(
                "const e = document.querySelector(arguments[0]); \
                 return e === null ? null : e.getAttribute(arguments[1]);",
                &[json!(css), json!(name)],
            )
            .await;
        value.as_str().map(str::to_owned)
    }

    /// How many elements match `css`.
    pub async fn count(&self, css: &str) -> usize {
        let count = self
            .execute(
                "return document.querySelectorAll(arguments[0]).length;",
                &[json!(css)],
            )
            .await;
        usize::try_from(count.as_u64().unwrap()).unwrap()
    }

    /// The page's HTML as it is now (the DOM serialized, not what was sent).
    pub async fn page_source(&self) -> String {
        let source = self.command("GET", "/source", None).await;
        source.as_str().unwrap().to_owned()
    }

    /// Saves a PNG of the viewport at `path`.
    pub async fn screenshot(&self, path: &Path) {
        self.try_screenshot(path)
            .await
            .unwrap_or_else(|err| panic!("screenshot {}: {err}", path.display()));
    }

    async fn try_screenshot(&self, path: &Path) -> Result<(), String> {
        let png = self.try_command("GET", "/screenshot", None).await?;
        let png = base64::engine::general_purpose::STANDARD
            .decode(png.as_str().ok_or("not a base64 string")?)
            .map_err(|err| err.to_string())?;
        std::fs::write(path, png).map_err(|err| err.to_string())
    }

    /// Bytes the page took over the network: the document's `transferSize`
    /// and that of every resource it loaded since (0 for those from a cache).
    pub async fn resources_transferred(&self) -> u64 {
        let bytes = self
            .execute(
                "let total = 0; \
                 for (const kind of ['navigation', 'resource']) { \
                   for (const entry of performance.getEntriesByType(kind)) { \
                     total += entry.transferSize; \
                   } \
                 } \
                 return total;",
                &[],
            )
            .await;
        bytes
            .as_u64()
            .unwrap_or_else(|| panic!("transferSize: {bytes}"))
    }

    /// Waits until the text of the first element matching `css` contains
    /// `needle`, for at most [`WAIT`]; returns that text.
    pub async fn wait_for_text(&self, css: &str, needle: &str) -> String {
        let what = format!("the text of `{css}` to contain {needle:?}");
        self.wait_for_text_within(css, &what, WAIT, |text| text.contains(needle))
            .await
    }

    /// Waits until there is an element matching `css` whose text `done`
    /// accepts, for at most `timeout`; returns that text. Panics naming
    /// `what` (and the failure screenshot) when the time is up.
    pub async fn wait_for_text_within(
        &self,
        css: &str,
        what: &str,
        timeout: Duration,
        done: impl Fn(&str) -> bool,
    ) -> String {
        let text = self
            .wait_until(
                what,
                timeout,
                async || self.text(css).await,
                |text| text.as_deref().is_some_and(&done),
            )
            .await;
        text.unwrap()
    }

    /// Waits until attribute `name` of the first element matching `css` is
    /// `value`, for at most [`WAIT`].
    pub async fn wait_for_attribute(&self, css: &str, name: &str, value: &str) {
        self.wait_for_attribute_within(css, name, value, WAIT).await;
    }

    /// [`wait_for_attribute`](Browser::wait_for_attribute) with a deadline
    /// of `timeout`.
    pub async fn wait_for_attribute_within(
        &self,
        css: &str,
        name: &str,
        value: &str,
        timeout: Duration,
    ) {
        self.wait_until(
            &format!("attribute `{name}` of `{css}` to be {value:?}"),
            timeout,
            async || self.attribute(css, name).await,
            |seen| seen.as_deref() == Some(value),
        )
        .await;
    }

    /// Calls `probe` (which reads the page) until `done` accepts what it
    /// returns, for at most `timeout`; returns that. When the time is up,
    /// saves a screenshot and the page source (see
    /// [`save_failure`](Browser::save_failure)) and panics with `what`, the
    /// last value seen and where the two files are.
    pub async fn wait_until<T: std::fmt::Debug>(
        &self,
        what: &str,
        timeout: Duration,
        mut probe: impl AsyncFnMut() -> T,
        done: impl Fn(&T) -> bool,
    ) -> T {
        let deadline = Instant::now() + timeout;
        loop {
            let value = probe().await;
            if done(&value) {
                return value;
            }
            if Instant::now() >= deadline {
                let url = match self.try_command("GET", "/url", None).await {
                    Ok(Value::String(url)) => url,
                    Ok(other) => other.to_string(),
                    Err(err) => err,
                };
                let saved = self.save_failure().await;
                panic!(
                    "timed out after {timeout:?} waiting for {what}; last: {value:?}\n\
                     page: {url}\n{saved}"
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Saves a screenshot and the page source as
    /// `target/browser-failures/<test>-<n>.png` and `.html` (`<test>` being
    /// the name of the running test's thread); says where, one per line
    /// (`screenshot: <path>`, `page source: <path>`), or why not.
    pub async fn save_failure(&self) -> String {
        static SAVED: AtomicU32 = AtomicU32::new(0);
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/browser-failures");
        if let Err(err) = std::fs::create_dir_all(&dir) {
            return format!("no screenshot: cannot create {}: {err}", dir.display());
        }
        let test: String = std::thread::current()
            .name()
            .unwrap_or("browser")
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '_' {
                    c
                } else {
                    '-'
                }
            })
            .collect();
        let base = dir.join(format!("{test}-{}", SAVED.fetch_add(1, Ordering::Relaxed)));
        let png = base.with_extension("png");
        let screenshot = match self.try_screenshot(&png).await {
            Ok(()) => format!("screenshot: {}", png.display()),
            Err(err) => format!("no screenshot: {err}"),
        };
        let html = base.with_extension("html");
        let source = match self.try_command("GET", "/source", None).await {
            Ok(Value::String(source)) => match std::fs::write(&html, source) {
                Ok(()) => format!("page source: {}", html.display()),
                Err(err) => format!("no page source: {}: {err}", html.display()),
            },
            Ok(other) => format!("no page source: not a string: {other}"),
            Err(err) => format!("no page source: {err}"),
        };
        format!("{screenshot}\n{source}")
    }
}

impl Drop for Browser {
    /// Ends the session (Chromium quits); then `Driver` kills chromedriver.
    /// Should the session not end, the browser process chromedriver
    /// reported is killed too, if it is still the one with this profile.
    fn drop(&mut self) {
        let path = format!("/session/{}", self.session);
        let ended = try_http_json_blocking("DELETE", &self.driver.addr, &path, None, DROP_WAIT)
            .is_ok_and(|(status, _)| status == 200);
        if ended {
            return;
        }
        let Some(pid) = self.browser_pid else {
            return;
        };
        let profile = format!("--user-data-dir={}", self.driver.profile().display());
        let ours = std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|cmdline| {
            cmdline
                .split(|byte| *byte == 0)
                .any(|arg| arg == profile.as_bytes())
        });
        if ours
            && let Some(pid) = i32::try_from(pid)
                .ok()
                .and_then(rustix::process::Pid::from_raw)
        {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
        }
    }
}
