// rave's web UI: live status over Server-Sent Events, live logs, and the admin buttons.
// Everything is built with DOM nodes and textContent: nothing from a log or a job name is
// ever parsed as HTML.
"use strict";

const LOG_CHUNK = 256 * 1024;          // bytes fetched per "load earlier"
const LOG_KEEP = 2 * 1024 * 1024;      // characters kept in the page while following

// ---- ANSI colours (SGR) to spans ------------------------------------------------------
const ANSI = /\x1b\[([0-9;]*)m/g;
function ansiNodes(text, state) {
  const frag = document.createDocumentFragment();
  let last = 0;
  const push = (s) => {
    if (!s) return;
    const span = document.createElement("span");
    if (state.fg) span.classList.add("fg" + state.fg);
    if (state.bold) span.classList.add("bold");
    span.textContent = s;
    frag.appendChild(span);
  };
  for (const m of text.matchAll(ANSI)) {
    push(text.slice(last, m.index));
    last = m.index + m[0].length;
    for (const code of (m[1] || "0").split(";").map(Number)) {
      if (code === 0) { state.fg = 0; state.bold = false; }
      else if (code === 1) state.bold = true;
      else if (code === 22) state.bold = false;
      else if ((code >= 30 && code <= 37) || (code >= 90 && code <= 97)) state.fg = code;
      else if (code === 39) state.fg = 0;
    }
  }
  push(text.slice(last));
  return frag;
}

// ---- live status ----------------------------------------------------------------------
function setStatus(el, status) {
  if (!el) return;
  el.textContent = status;
  el.className = "status " + status;
  const box = el.closest(".job");
  if (box) box.className = box.className.replace(/status-\S+/, "status-" + status);
}

function live() {
  const list = document.querySelector('[data-live="list"]');
  const page = document.querySelector('[data-live="pipeline"]');
  const jobStatus = document.getElementById("job-status");
  if (!list && !page && !jobStatus) return;
  const es = new EventSource("/api/events");
  const known = new Set([...document.querySelectorAll("tr[data-pipeline]")].map((r) => r.dataset.pipeline));
  const onEvent = (e) => {
    let ev;
    try { ev = JSON.parse(e.data); } catch (_) { return; }
    if (ev.kind === "pipeline") {
      const row = document.querySelector(`tr[data-pipeline="${ev.pipeline_id}"] [data-status]`);
      if (row) setStatus(row, ev.status);
      else if (list && !known.has(String(ev.pipeline_id))) document.getElementById("new-pipelines").hidden = false;
      if (page && page.dataset.pipeline === String(ev.pipeline_id)) {
        setStatus(document.getElementById("pipeline-status"), ev.status);
        // New jobs, buttons and durations: the page is cheap to render again when it ends.
        if (!["queued", "running"].includes(ev.status)) setTimeout(() => location.reload(), 300);
      }
      refreshBudget();
    } else if (ev.kind === "job" && ev.job_id != null) {
      refreshBudget();
      for (const el of document.querySelectorAll(`[data-job="${ev.job_id}"]`)) {
        setStatus(el.matches("[data-status]") ? el : el.querySelector("[data-status]"), ev.status);
      }
      if (page && page.dataset.pipeline === String(ev.pipeline_id) && !document.querySelector(`[data-job="${ev.job_id}"]`)) {
        setTimeout(() => location.reload(), 300);
      }
    }
  };
  es.addEventListener("pipeline", onEvent);
  es.addEventListener("job", onEvent);
  // A browser allows six connections to a server: never leave streams open behind a page.
  window.addEventListener("pagehide", () => es.close());
}

// ---- the budget bar on the list: what running jobs hold, refreshed on status changes -----
let budgetTimer = null;
function refreshBudget() {
  const el = document.getElementById("budget");
  if (!el || budgetTimer) return;
  budgetTimer = setTimeout(async () => {
    budgetTimer = null;
    const r = await fetch("/api/budget");
    if (!r.ok) return;
    const b = await r.json();
    // As rave_model::units::format_memory writes it.
    const mib = (n) => {
      const m = n / (1 << 20);
      if (n >= 1 << 30 && n % (1 << 30) === 0) return `${n / (1 << 30)} GiB`;
      if (n >= 1 << 20) return Math.abs(m - Math.round(m)) < 0.05 ? `${Math.round(m)} MiB` : `${m.toFixed(1)} MiB`;
      return `${Math.ceil(n / 1024)} KiB`;
    };
    const of = b.memory_budget_bytes != null ? ` of ${mib(b.memory_budget_bytes)}` : "";
    // The same words as the server renders (ui.rs, budget_text).
    const cpus = (n) => Math.abs(n - Math.round(n)) < 1e-9 ? String(Math.round(n)) : n.toFixed(2);
    el.textContent = `${b.running_jobs} running job(s) of ${b.share.pipelines.length} pipeline(s) hold ${mib(b.held_bytes)}${of} of memory and ${cpus(b.share.used_cpus)} of ${cpus(b.share.cpus)} CPU(s) · ${b.waiting_jobs} job(s) waiting for room · ${b.queued_pipelines} pipeline(s) queued`;
  }, 250);
}

// ---- the pipeline graph's `needs` edges ------------------------------------------------
function edges() {
  const graph = document.getElementById("graph");
  const svg = document.getElementById("edges");
  if (!graph || !svg) return;
  const byIndex = new Map();
  for (const el of graph.querySelectorAll(".job[data-index]")) byIndex.set(el.dataset.index, el);
  const g = graph.getBoundingClientRect();
  svg.setAttribute("width", graph.scrollWidth);
  svg.setAttribute("height", graph.scrollHeight);
  svg.replaceChildren();
  for (const el of byIndex.values()) {
    for (const n of (el.dataset.needs || "").split(",").filter(Boolean)) {
      const from = byIndex.get(n);
      if (!from) continue;
      const a = from.getBoundingClientRect(), b = el.getBoundingClientRect();
      const x1 = a.right - g.left + graph.scrollLeft, y1 = a.top + a.height / 2 - g.top;
      const x2 = b.left - g.left + graph.scrollLeft, y2 = b.top + b.height / 2 - g.top;
      const path = document.createElementNS("http://www.w3.org/2000/svg", "path");
      const mx = (x1 + x2) / 2;
      path.setAttribute("d", `M${x1},${y1} C${mx},${y1} ${mx},${y2} ${x2},${y2}`);
      path.setAttribute("class", "edge");
      path.dataset.from = n;
      path.dataset.to = el.dataset.index;
      svg.appendChild(path);
    }
  }
}

// ---- the job log -------------------------------------------------------------------------
async function log() {
  const pre = document.getElementById("log");
  if (!pre) return;
  const id = pre.dataset.job;
  const state = { fg: 0, bold: false };
  const earlier = document.getElementById("earlier");
  let start = 0, total = 0;
  // The tail first: a 100 MB log never reaches the page whole.
  let r = await fetch(`/api/jobs/${id}/log`, { headers: { Range: `bytes=-${LOG_CHUNK}` } });
  if (r.status === 416) {
    // Shorter than one chunk (or empty): take it whole.
    r = await fetch(`/api/jobs/${id}/log`);
  }
  if (r.status === 206) {
    const m = /bytes (\d+)-(\d+)\/(\d+)/.exec(r.headers.get("Content-Range") || "");
    if (m) { start = Number(m[1]); total = Number(m[3]); }
    pre.appendChild(ansiNodes(await r.text(), state));
  } else if (r.ok) {
    const text = await r.text();
    total = new TextEncoder().encode(text).length;
    pre.appendChild(ansiNodes(text, state));
  }
  const showEarlier = () => { earlier.hidden = start <= 0; };
  showEarlier();
  earlier.addEventListener("click", async () => {
    const from = Math.max(0, start - LOG_CHUNK);
    const rr = await fetch(`/api/jobs/${id}/log`, { headers: { Range: `bytes=${from}-${start - 1}` } });
    if (rr.ok) {
      pre.insertBefore(ansiNodes(await rr.text(), { fg: 0, bold: false }), pre.firstChild);
      start = from;
      showEarlier();
    }
  });
  if (pre.dataset.running !== "true") return;
  // Follow what is appended, from where the tail ended.
  const ctl = new AbortController();
  window.addEventListener("pagehide", () => ctl.abort());
  const f = await fetch(`/api/jobs/${id}/log?follow=1&offset=${total}`, { signal: ctl.signal });
  if (!f.ok || !f.body) return;
  const reader = f.body.getReader();
  const dec = new TextDecoder();
  let kept = pre.textContent.length;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    const text = dec.decode(value, { stream: true });
    const atBottom = window.innerHeight + window.scrollY >= document.body.scrollHeight - 40;
    pre.appendChild(ansiNodes(text, state));
    kept += text.length;
    while (kept > LOG_KEEP && pre.firstChild) {
      kept -= pre.firstChild.textContent.length;
      pre.removeChild(pre.firstChild);
      start = 1; // earlier output exists again
      showEarlier();
    }
    if (atBottom) window.scrollTo(0, document.body.scrollHeight);
  }
}

// ---- admin buttons -----------------------------------------------------------------------
function buttons() {
  const csrf = document.body.dataset.csrf;
  for (const b of document.querySelectorAll("button[data-post]")) {
    b.addEventListener("click", async () => {
      b.disabled = true;
      let r;
      try {
        r = await fetch(b.dataset.post, { method: "POST", headers: { "X-Rave-Csrf": csrf || "" } });
      } catch (e) {
        b.disabled = false;
        alert(`could not reach the server: ${e}`);
        return;
      }
      let body = {};
      try { body = await r.json(); } catch (_) { }
      if (!r.ok) {
        b.disabled = false;
        alert(body.error || `failed: ${r.status}`);
        return;
      }
      if (body.pipeline_id && !location.pathname.endsWith(`/pipelines/${body.pipeline_id}`)) {
        location.href = `/ui/pipelines/${body.pipeline_id}`;
      } else {
        location.reload();
      }
    });
  }
}

// ---- run a pipeline (admins): a ref or tag, with pipeline variables ----------------------
function newPipeline() {
  const form = document.getElementById("new-pipeline-form");
  if (!form) return;
  const fail = (msg) => {
    const p = document.getElementById("new-pipeline-error");
    p.textContent = msg;
    p.hidden = false;
  };
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const f = new FormData(form);
    const body = { project: f.get("project"), variables: {} };
    body[f.get("kind")] = f.get("name");
    for (const line of String(f.get("variables") || "").split("\n")) {
      if (!line.trim()) continue;
      const i = line.indexOf("=");
      if (i < 1) return fail(`"${line}" is not KEY=value`);
      body.variables[line.slice(0, i).trim()] = line.slice(i + 1);
    }
    const r = await fetch("/api/pipelines", {
      method: "POST",
      headers: { "Content-Type": "application/json", "X-Rave-Csrf": document.body.dataset.csrf || "" },
      body: JSON.stringify(body),
    });
    let answer = {};
    try { answer = await r.json(); } catch (_) { }
    if (!r.ok || answer.pipeline_id == null) return fail(answer.error || answer.message || `failed: ${r.status}`);
    location.href = `/ui/pipelines/${answer.pipeline_id}`;
  });
}

document.addEventListener("DOMContentLoaded", () => {
  newPipeline();
  live();
  edges();
  window.addEventListener("resize", edges);
  buttons();
  log();
});
