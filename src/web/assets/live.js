// Keeps the page current with the builder's events (/api/v1/events, one
// reply as JSON per message). Event data only goes into textContent and
// attribute values, never into markup.
(() => {
  "use strict";
  if (!window.EventSource) return;
  const $ = (id) => document.getElementById(id);
  const body = document.body, run = $("running"), DASH = "\u2013";
  const builds = {}; // build id -> {repo, target, rev}
  if (run && run.dataset.buildId)
    builds[run.dataset.buildId] = { repo: run.dataset.repo, rev: run.dataset.rev || undefined };

  const put = (node, content) => node && node.replaceChildren(content);
  const el = (tag, content, attrs = {}) => {
    const node = document.createElement(tag);
    if (content != null) node.append(content);
    for (const k in attrs) node.setAttribute(k, attrs[k]);
    return node;
  };
  const link = (parts, content) => el("a", content, { href: "/" + parts.map(encodeURIComponent).join("/") });
  const code = (text) => (text ? el("code", text) : DASH);
  const size = (n) => {
    let u = 0;
    for (; n >= 1024 && u < 5; u++) n /= 1024;
    return (u ? n.toFixed(1) : n) + " " + ["B", "KiB", "MiB", "GiB", "TiB", "PiB"][u];
  };
  const closure = (e) => {
    const bytes = e.changes ? e.changes.closure_size : e.closure_size;
    return bytes == null ? DASH : size(bytes);
  };
  const duration = (ms) => {
    const s = Math.floor(ms / 1000), m = Math.floor(s / 60), two = (n) => String(n).padStart(2, "0");
    if (s < 1) return ms + "ms";
    if (m < 1) return s + "s";
    return m < 60 ? `${m}m ${two(s % 60)}s` : `${Math.floor(m / 60)}h ${two(m % 60)}m`;
  };
  const now = () => new Date().toISOString().slice(0, 19).replace("T", " ") + " UTC";
  // The first of `nodes` whose attributes are `attrs`.
  const find = (nodes, attrs) =>
    Array.from(nodes).find((node) => Object.keys(attrs).every((k) => node.getAttribute(k) === attrs[k]));
  // The row of `tbody` with `attrs`; made (a cell per class) when missing,
  // its table shown (tables are rendered hidden while empty).
  const row = (tbody, attrs, classes) => {
    let tr = find(tbody.rows, attrs);
    if (tr) return tr;
    tr = el("tr", null, attrs);
    for (const c of classes) tr.append(el("td", DASH, { class: c }));
    tbody.append(tr);
    tbody.closest(".table").hidden = false;
    return tr;
  };
  const cell = (tr, cls, content) => put(tr.querySelector("td." + cls), content);
  // Markup the server rendered for the script to fill (<template id>).
  const clone = (id) => $(id).content.cloneNode(true);

  // The index: the running build, and every host's latest result.
  const running = (id, total) => {
    // Rendered while the flake was fetched, the section has no host count.
    if (run.dataset.buildId !== id || (total != null && !run.querySelector(".total"))) {
      const b = builds[id] || {}, part = clone("running-template");
      part.querySelector("a").href = "/builds/" + encodeURIComponent(id);
      put(part.querySelector("a code"), id);
      put(part.querySelector(".repo"), b.repo || "");
      put(part.querySelector(".target"), b.target || "");
      run.replaceChildren(part);
      run.dataset.buildId = id;
      run.dataset.repo = b.repo || "";
    }
    if (total != null) put(run.querySelector(".total"), total);
    return run.querySelector("tbody");
  };
  const runningHost = (id, host) => {
    const tr = row(running(id), { "data-running-host": host }, ["host", "num", "drvs"]);
    cell(tr, "host", host);
    return tr;
  };
  const repoRows = (repo) => {
    let t = find(document.querySelectorAll("#hosts table"), { "data-repo": repo });
    if (!t) {
      const part = clone("repo-template");
      put(part.querySelector("h3"), repo);
      t = part.querySelector("table");
      t.dataset.repo = repo;
      $("hosts").append(part);
    }
    return t.tBodies[0];
  };
  const index = {
    started: (id, e) => running(id, e.hosts.length),
    host_started: (id, e) => cell(runningHost(id, e.host), "num", e.index),
    progress: (id, e) => {
      const tr = runningHost(id, e.host);
      if (!e.expected) return cell(tr, "drvs", "evaluating");
      cell(tr, "drvs", el("progress", null, { value: e.done, max: e.expected }));
      tr.querySelector("td.drvs").append(` ${e.done}/${e.expected}`);
    },
    host_finished: (id, e) => {
      const b = builds[id] || {}, done = run.querySelector(".finished");
      if (run.dataset.buildId === id) {
        const building = find(run.querySelectorAll("tr"), { "data-running-host": e.host });
        if (building) building.remove();
        if (done) put(done, Number(done.textContent) + 1);
        run.querySelector(".table").hidden = !running(id).rows.length;
      }
      if (!b.repo) return;
      const tr = row(repoRows(b.repo), { "data-repo": b.repo, "data-host": e.host },
        ["host", "status", "when", "rev", "closure num", "changes num", "build"]);
      cell(tr, "host", link(["hosts", b.repo, e.host], e.host));
      cell(tr, "status", (tr.dataset.status = e.status));
      cell(tr, "when", now());
      cell(tr, "rev", code(b.rev && b.rev.slice(0, 12)));
      cell(tr, "closure", closure(e));
      cell(tr, "changes", e.changes ? e.changes.packages.length + e.changes.more : DASH);
      cell(tr, "build", link(["builds", id], el("code", id)));
    },
    finished: (id, e) => {
      // Its line among the recent builds, if it has one.
      const recent = find(document.querySelectorAll("#recent-rows tr"), { "data-build-id": id });
      if (recent) {
        cell(recent, "status", (recent.dataset.status = e.status));
        cell(recent, "duration", duration(e.duration_ms));
        cell(recent, "hosts", String(e.hosts.length + (e.omitted_hosts || 0)));
      }
      if (run.dataset.buildId !== id) return;
      run.replaceChildren(el("h2", "Building now"), el("p", "Nothing is building.", { class: "empty" }));
      delete run.dataset.buildId;
      delete run.dataset.repo;
    },
  };

  // A build's page: its hosts as they finish, then its outcome.
  const build = {
    host_finished: (id, e) => {
      // The rest of what the host did shows on the next load.
      const tr = row($("host-rows"), { "data-host": e.host },
        ["host", "status", "duration num", "machines", "cached", "out", "closure num"]);
      cell(tr, "host", link(["hosts", body.dataset.repo, e.host], e.host));
      cell(tr, "status", (tr.dataset.status = e.status));
      cell(tr, "duration", duration(e.duration_ms));
      cell(tr, "cached", e.cached ? "cached" : DASH);
      cell(tr, "out", code(e.out_path));
      cell(tr, "closure", closure(e));
    },
    finished: (id, e) => {
      body.dataset.status = $("build-status").dataset.status = e.status;
      put($("build-status"), e.status);
      put($("build-finished"), now());
      put($("build-duration"), duration(e.duration_ms));
    },
  };

  const page = body.dataset.page, handlers = { index, build }[page];
  if (!handlers) return;
  new EventSource("/api/v1/events").onmessage = (message) => {
    let e;
    try {
      e = JSON.parse(message.data);
    } catch {
      return;
    }
    if (!e || typeof e.build_id !== "string") return;
    if (e.event === "accepted" || e.event === "started") {
      const b = (builds[e.build_id] ||= {});
      b.repo = e.repo;
      b.target = e.target;
      b.rev = e.rev || b.rev;
    }
    if (page === "build" && e.build_id !== body.dataset.buildId) return;
    if (Object.hasOwn(handlers, e.event)) handlers[e.event](e.build_id, e);
  };
})();
