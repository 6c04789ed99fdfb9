//! `homelab-deploy mcp`: an MCP server over stdio that lets an assistant
//! look at the builders (`build_status`) and, with `--enable-builds`, start
//! and cancel builds (`build`, `cancel_build`).
//!
//! Tool inputs are checked with the same code as the CLI client; a build
//! that is rejected or fails comes back as a tool result with `isError`
//! and the builder's message (the call itself worked), never as a protocol
//! error. Logs go to stderr: stdout is the protocol.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, Implementation,
    JsonObject, ListToolsResult, PaginatedRequestParams, ProgressNotificationParam,
    ServerCapabilities, ServerConfig, Tool, ToolAnnotations,
};
use rmcp::service::RequestContext;
use rmcp::{ErrorData as McpError, RoleServer, ServerHandler};
use serde::Deserialize;
use serde_json::json;

use crate::client::{BuildClient, ClientError, StatusAnswer, Timeouts};
use crate::present::events::{BuildState, Style, describe};
use crate::present::{cancel_outcome, changes_lines, changes_summary, status_reports};
use crate::protocol::{
    BuildRequest, BuildStatus, Changes, ErrorBody, Event, HostStatus, HostSummary, Reply,
};
use crate::text::keep_tail;

/// How long a tool call waits for a NATS connection that is not up yet.
const CONNECT_WAIT: Duration = Duration::from_secs(5);

/// The MCP tools over one NATS connection.
pub struct BuildTools {
    client: Arc<BuildClient>,
    enable_builds: bool,
    timeouts: Timeouts,
    /// How long `build_status` and `cancel_build` wait for a builder's
    /// answer (a cancel of a build no builder has hears none).
    ask_timeout: Duration,
}

/// Arguments of `build`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BuildArgs {
    repo: String,
    target: String,
    #[serde(rename = "ref")]
    git_ref: Option<String>,
    rev: Option<String>,
}

/// Arguments of `cancel_build`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CancelArgs {
    build_id: String,
}

fn schema(value: serde_json::Value) -> Arc<JsonObject> {
    match value {
        serde_json::Value::Object(object) => Arc::new(object),
        _ => Arc::new(JsonObject::new()),
    }
}

/// A tool result; every one passes here, so its text is where credentials
/// (say, in a NATS URL quoted by a connection error) are masked and
/// terminal control characters from the wire escaped.
fn text_result(text: String, is_error: bool) -> CallToolResult {
    let redacted = crate::redact::redact(&text);
    let content = vec![ContentBlock::text(crate::printable::printable(&redacted))];
    if is_error {
        CallToolResult::error(content)
    } else {
        CallToolResult::success(content)
    }
}

fn parse<T: for<'de> Deserialize<'de>>(arguments: Option<JsonObject>) -> Result<T, String> {
    serde_json::from_value(serde_json::Value::Object(arguments.unwrap_or_default()))
        .map_err(|err| format!("invalid arguments: {err}"))
}

impl BuildTools {
    /// Tools over `client`; `enable_builds` adds `build` and `cancel_build`.
    pub fn new(client: BuildClient, enable_builds: bool, timeouts: Timeouts) -> Self {
        Self {
            client: Arc::new(client),
            enable_builds,
            timeouts,
            ask_timeout: Duration::from_secs(10),
        }
    }

    /// The tools this server offers.
    pub fn tools(&self) -> Vec<Tool> {
        let mut status = Tool::new(
            "build_status",
            "What every homelab builder on the NATS server is doing, one report per builder \
             (headed by its name and signing key): configured repos, the running build \
             (and its current host), the queue, and the last result of every host.",
            schema(json!({"type": "object", "properties": {}, "additionalProperties": false})),
        );
        status.annotations = Some(ToolAnnotations::new().read_only(true));
        let mut tools = vec![status];
        if self.enable_builds {
            tools.push(Tool::new(
                "build",
                "Build NixOS hosts of a repo on the homelab build host and wait for the result. \
                 Requests run one at a time; an `all` build takes minutes. Returns each host's \
                 result, with the error output of hosts that failed and, for hosts that built, \
                 the packages (name, versions before and after, size change) and closure size \
                 that changed against the host's current result on the repo's default ref.",
                schema(json!({
                    "type": "object",
                    "properties": {
                        "repo": {"type": "string", "description": "Repo name as configured on the builder, e.g. nixos-servers."},
                        "target": {"type": "string", "description": "A host (nixosConfigurations attribute) or \"all\"."},
                        "ref": {"type": "string", "description": "Branch or tag to build instead of the repo's default."},
                        "rev": {"type": "string", "description": "Exact commit (40 hex digits), reachable from the ref."}
                    },
                    "required": ["repo", "target"],
                    "additionalProperties": false
                })),
            ));
            tools.push(Tool::new(
                "cancel_build",
                "Cancel a running or queued build by its build id.",
                schema(json!({
                    "type": "object",
                    "properties": {"build_id": {"type": "string", "description": "The id from the build's result or from build_status."}},
                    "required": ["build_id"],
                    "additionalProperties": false
                })),
            ));
        }
        tools
    }

    async fn build_status(&self) -> CallToolResult {
        match self.client.status(self.ask_timeout).await {
            Ok(answers) => {
                let mut result = text_result(status_reports(&answers), false);
                result.structured_content = Some(structured_statuses(&answers));
                result
            }
            Err(err) => text_result(format!("cannot get the builders' status: {err}"), true),
        }
    }

    async fn cancel_build(&self, args: CancelArgs) -> CallToolResult {
        match self.client.cancel(&args.build_id, self.ask_timeout).await {
            Ok((outcome, _)) => {
                let (text, is_error) = cancel_outcome(&outcome);
                text_result(text, is_error)
            }
            Err(err) => text_result(format!("cannot cancel: {err}"), true),
        }
    }

    async fn build(&self, args: BuildArgs, context: &RequestContext<RoleServer>) -> CallToolResult {
        let request = BuildRequest {
            git_ref: args.git_ref,
            rev: args.rev,
            logs: false,
        };
        let progress_token = context.meta.get_progress_token();
        let mut events = match self
            .client
            .request(&args.repo, &args.target, &request, self.timeouts)
            .await
        {
            Ok(events) => events,
            Err(err) => return client_error(&err),
        };
        let mut state = BuildState::default();
        let style = Style {
            request: Some(format!("{}/{}", args.repo, args.target)),
            ..Style::default()
        };
        // Failing hosts' errors and built hosts' changes, from their
        // host_finished events.
        let mut outcomes = HostOutcomes::default();
        loop {
            let received = tokio::select! {
                received = events.next() => received,
                // The assistant gave up waiting; the build goes on.
                () = context.ct.cancelled() => {
                    return text_result("stopped following the build (the request was cancelled); it continues on the builder".into(), true);
                }
            };
            let reply = match received {
                Ok(Some(received)) => received.reply,
                Ok(None) => return text_result("the builder sent no result".into(), true),
                Err(err) => return client_error(&err),
            };
            let shown = describe(&reply, &state, &style);
            state.apply(&reply.event, Instant::now());
            match &reply.event {
                Event::HostFinished {
                    host,
                    error,
                    changes,
                    ..
                } => {
                    if let Some(error) = error {
                        outcomes.errors.insert(host.clone(), error.clone());
                    }
                    if let Some(changes) = changes {
                        outcomes.changes.insert(host.clone(), changes.clone());
                    }
                }
                Event::Finished { .. } | Event::Rejected { .. } => {
                    return summarize(&reply, &shown.lines, &outcomes);
                }
                _ => {}
            }
            if let (Some(token), Some(note)) = (&progress_token, shown.note) {
                let mut param =
                    ProgressNotificationParam::new(token.clone(), state.finished() as f64)
                        .with_message(note);
                if let Some(total) = state.total() {
                    param = param.with_total(total as f64);
                }
                if let Err(err) = context.peer.notify_progress(param).await {
                    tracing::debug!(%err, "cannot send a progress notification");
                }
            }
        }
    }
}

/// `build_status`'s structured content: `{"builders": [...]}`, one entry
/// per answer with the builder's status as sent, the key that signed it
/// (`null` when none did) and `signature`: `signed`, `unsigned` or
/// `invalid`.
fn structured_statuses(answers: &[StatusAnswer]) -> serde_json::Value {
    let builders: Vec<serde_json::Value> = answers
        .iter()
        .map(|answer| {
            let signature = match answer.signature {
                crate::signing::Signature::Valid(_) => "signed",
                crate::signing::Signature::Unsigned => "unsigned",
                crate::signing::Signature::Invalid(_) => "invalid",
            };
            json!({
                "key": answer.key(),
                "signature": signature,
                "status": answer.status,
            })
        })
        .collect();
    json!({ "builders": builders })
}

fn client_error(err: &ClientError) -> CallToolResult {
    text_result(err.to_string(), true)
}

/// Most of a failing host's error kept in a tool result; the tail is what
/// tells why.
const ERROR_TAIL_BYTES: usize = 1500;

/// Most changed packages a tool result's text lists per host; the
/// structured content has all the builder sent.
const CHANGE_LINES_PER_HOST: usize = 25;

/// What the `host_finished` events said beyond the `finished` summary.
#[derive(Debug, Default)]
struct HostOutcomes {
    /// Failing hosts' errors.
    errors: BTreeMap<String, ErrorBody>,
    /// Built hosts' changes against the default ref.
    changes: BTreeMap<String, Changes>,
}

/// The concise result of a build: the outcome as [`describe`] shows it
/// (`lines`), failing hosts with their error tails, and the hosts that
/// built with what they change.
fn summarize(reply: &Reply, lines: &[String], outcomes: &HostOutcomes) -> CallToolResult {
    let mut text: String = lines.iter().map(|line| format!("{line}\n")).collect();
    let is_error = match &reply.event {
        Event::Rejected { .. } => true,
        Event::Finished { status, hosts, .. } => {
            text.push_str(&host_lines(hosts, outcomes));
            *status != BuildStatus::Success
        }
        _ => {
            text = "unexpected reply from the builder".to_owned();
            true
        }
    };
    let mut result = text_result(text, is_error);
    result.structured_content = serde_json::to_value(reply).ok().map(|mut value| {
        // The `finished` event plus each built host's changes.
        if let (Some(object), false) = (value.as_object_mut(), outcomes.changes.is_empty()) {
            object.insert("changes".to_owned(), json!(outcomes.changes));
        }
        value
    });
    result
}

/// Failing hosts with the errors their `host_finished` carried (kept in the
/// summary's order), then the hosts that built and what they change.
fn host_lines(hosts: &[HostSummary], outcomes: &HostOutcomes) -> String {
    let errors = &outcomes.errors;
    let mut text = String::new();
    let built: Vec<&str> = hosts
        .iter()
        .filter(|h| h.status == HostStatus::Success)
        .map(|h| h.host.as_str())
        .collect();
    let failed: Vec<&HostSummary> = hosts
        .iter()
        .filter(|h| h.status != HostStatus::Success)
        .collect();
    if !failed.is_empty() {
        text.push_str("failed hosts:\n");
        for host in failed {
            text.push_str(&format!("- {}: {}", host.host, host.status));
            if let Some(error) = errors.get(&host.host) {
                text.push_str(&format!(" ({})\n", error.code));
                let tail = keep_tail(
                    crate::redact::redact_owned(error.message.clone()),
                    ERROR_TAIL_BYTES,
                );
                for line in tail.lines() {
                    text.push_str("    ");
                    text.push_str(line);
                    text.push('\n');
                }
            } else {
                text.push('\n');
            }
        }
    }
    if !built.is_empty() {
        text.push_str(&format!("built: {}\n", built.join(", ")));
    }
    for host in built {
        let Some(changes) = outcomes.changes.get(host) else {
            continue;
        };
        text.push_str(&format!(
            "changes of {host}: {}\n",
            changes_summary(changes)
        ));
        let lines = changes_lines(changes);
        // The package lines, then the `… more`, rebuilt and compared lines.
        let packages = changes.packages.len();
        for line in lines.iter().take(packages.min(CHANGE_LINES_PER_HOST)) {
            text.push_str(&format!("    {line}\n"));
        }
        if packages > CHANGE_LINES_PER_HOST {
            text.push_str(&format!(
                "    … {} more listed in the structured result\n",
                packages - CHANGE_LINES_PER_HOST
            ));
        }
        for line in lines.iter().skip(packages) {
            text.push_str(&format!("    {line}\n"));
        }
    }
    text
}

impl ServerHandler for BuildTools {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(Implementation::new("homelab-deploy", env!("CARGO_PKG_VERSION")))
            .with_instructions(if self.enable_builds {
                "Look at and drive the homelab's NixOS build host: build_status, build, cancel_build."
            } else {
                "Look at the homelab's NixOS build host with build_status (builds are not enabled)."
            })
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, McpError> {
        Ok(ListToolsResult::with_all_items(self.tools()))
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, McpError> {
        let known = matches!(
            (request.name.as_ref(), self.enable_builds),
            ("build_status", _) | ("build" | "cancel_build", true)
        );
        // The connection is made in the background (the server starts even
        // when NATS is down), so a call right after start waits for it.
        if known && !self.client.wait_connected(CONNECT_WAIT).await {
            return Ok(text_result(
                "not connected to NATS (yet); check the NATS URL and credentials, then retry"
                    .to_owned(),
                true,
            )
            .into());
        }
        let result = match (request.name.as_ref(), self.enable_builds) {
            ("build_status", _) => self.build_status().await,
            ("build", true) => match parse::<BuildArgs>(request.arguments) {
                Ok(args) => match crate::client::validate(
                    &args.repo,
                    &args.target,
                    &BuildRequest {
                        git_ref: args.git_ref.clone(),
                        rev: args.rev.clone(),
                        logs: false,
                    },
                ) {
                    Ok(()) => self.build(args, &context).await,
                    Err(err) => text_result(err.to_string(), true),
                },
                Err(message) => text_result(message, true),
            },
            ("cancel_build", true) => match parse::<CancelArgs>(request.arguments) {
                Ok(args) => self.cancel_build(args).await,
                Err(message) => text_result(message, true),
            },
            (name, _) => {
                return Err(McpError::invalid_params(
                    format!("unknown tool {name:?}"),
                    None,
                ));
            }
        };
        Ok(result.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{Against, ChangedPackage, Rebuilt};

    #[test]
    fn build_results_say_what_each_built_host_changes() {
        let changes = Changes {
            against: Against {
                out_path: "/nix/store/aaaa-nixos-system-ns1".into(),
                rev: None,
            },
            packages: vec![ChangedPackage {
                name: "openssl".into(),
                before: vec!["3.0.14".into()],
                after: vec!["3.0.15".into()],
                size_delta: 10_240,
            }],
            more: 0,
            rebuilt: Rebuilt::default(),
            closure_size: 2048,
            closure_size_delta: 10_240,
        };
        let host = |name: &str| HostSummary {
            host: name.into(),
            status: HostStatus::Success,
            duration_ms: 1,
            out_path: Some(format!("/nix/store/bbbb-{name}")),
            cached: false,
            changed_packages: Some(1),
            size_delta: Some(10_240),
        };
        let reply = Reply {
            build_id: "b1".into(),
            seq: None,
            event: Event::Finished {
                repo: "r".into(),
                target: "all".into(),
                rev: None,
                status: BuildStatus::Success,
                duration_ms: 5,
                succeeded: 2,
                failed: 0,
                hosts: vec![host("ns1"), host("ns2")],
                error: None,
                skipped: Vec::new(),
                omitted_hosts: 0,
            },
        };
        let mut outcomes = HostOutcomes::default();
        outcomes.changes.insert("ns1".into(), changes.clone());
        let style = Style {
            request: Some("r/all".to_owned()),
            ..Style::default()
        };
        let shown = describe(&reply, &BuildState::default(), &style);
        let result = summarize(&reply, &shown.lines, &outcomes);
        let text = serde_json::to_value(&result.content).unwrap().to_string();
        assert!(
            text.contains(
                "changes of ns1: 1 package changed: openssl 3.0.14 → 3.0.15; closure 2.0 KiB, +10.0 KiB"
            ),
            "{text}"
        );
        assert!(
            text.contains("openssl 3.0.14 → 3.0.15  +10.0 KiB"),
            "{text}"
        );
        assert!(!text.contains("changes of ns2"), "{text}");
        let structured = result.structured_content.unwrap();
        assert_eq!(structured["event"], "finished");
        assert_eq!(structured["hosts"][0]["changed_packages"], 1);
        assert_eq!(
            serde_json::from_value::<Changes>(structured["changes"]["ns1"].clone()).unwrap(),
            changes
        );
    }

    #[test]
    fn tool_results_carry_no_credentials() {
        let result = text_result(
            "cannot connect to nats://deploy:s3cret@nats.lan:4222".into(),
            true,
        );
        let text = &result.content[0].as_text().unwrap().text;
        assert_eq!(text, "cannot connect to nats://***@nats.lan:4222");
    }
}
