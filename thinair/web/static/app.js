// thinair's web UI: a page over the REST API (/api/v1), no framework and no build.
// The token the user signs in with stays in this tab's sessionStorage.
"use strict";

const API = "/api/v1";
const TOKEN_KEY = "thinair-token";
const ACTIVE = new Set(["pending", "running"]);
const state = { sds: [], vms: [], exports: [], jobs: [], hosts: [], audit: null, watching: new Set(), signedIn: false };

const $ = (sel, root = document) => root.querySelector(sel);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// -- the API -------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

async function api(method, path, body, signal) {
  const headers = { Authorization: `Bearer ${sessionStorage.getItem(TOKEN_KEY) || ""}` };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const res = await fetch(API + path, {
    method, headers, signal, body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (res.status === 204) return null;
  let data = null;
  try { data = await res.json(); } catch { /* not JSON */ }
  if (!res.ok) {
    if (res.status === 401 && state.signedIn) signOut("The engine refused the token: sign in again.");
    throw new ApiError(res.status, data?.code || "error", data?.message || res.statusText);
  }
  return data;
}

// -- small helpers ---------------------------------------------------------------

function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else if (k === "value") el.value = v;
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat(Infinity)) {
    if (c !== null && c !== undefined && c !== false) el.append(c instanceof Node ? c : String(c));
  }
  return el;
}

// Replace a container's content, keeping keyboard focus on the element with the same id.
function replace(container, ...nodes) {
  const active = document.activeElement;
  const id = active && container.contains(active) ? active.id : null;
  container.replaceChildren(...nodes.flat(Infinity).filter((n) => n !== null && n !== undefined && n !== false));
  if (id) document.getElementById(id)?.focus();
}

const mib = (n) => `${(n / 2 ** 20).toFixed(1)} MiB`;

// The rate of bytes copied, in MiB/s as the sizes are, with the limit when one is set.
function rate(job) {
  const r = job.progress?.rate;
  const limit = job.params?.bandwidth;
  const shown = r !== undefined && r !== null ? `${(r / 2 ** 20).toFixed(1)} MiB/s` : "";
  return limit ? `${shown || "?"} (limit ${+(limit / 2 ** 20).toFixed(2)} MiB/s)` : shown;
}

// Times: local, as the browser's clock shows them; the UTC form in the tooltip.
const when = (iso) => iso ? h("time", { datetime: iso, title: iso }, new Date(iso).toLocaleString()) : "";
function duration(job) {
  const end = job.finished_at ? new Date(job.finished_at)
    : ACTIVE.has(job.state) ? new Date() : new Date(job.updated_at);
  const s = Math.max(0, (end - new Date(job.created_at)) / 1000);
  if (s < 60) return `${s.toFixed(1)} s`;
  const m = Math.floor(s / 60);
  return m < 60 ? `${m} min ${Math.round(s % 60)} s` : `${Math.floor(m / 60)} h ${m % 60} min`;
}

function bytes(n) {
  if (n === null || n === undefined) return "?";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n >= 100 || i === 0 ? Math.round(n) : n.toFixed(1)} ${units[i]}`;
}

const badge = (text, cls) => h("span", { class: `badge ${cls || text}` }, text);
const table = (heads, rows, empty) => rows.length
  ? h("table", {}, h("thead", {}, h("tr", {}, heads.map((t) => h("th", { scope: "col" }, t)))),
    h("tbody", {}, rows))
  : h("p", { class: "empty" }, empty);
const cell = (label, ...content) => h("td", { "data-label": label }, ...content);

let toastTimer = null;
function toast(message, kind = "error") {
  const el = $("#toast");
  el.textContent = message;
  el.className = kind;
  el.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => { el.hidden = true; }, kind === "error" ? 10000 : 4000);
}

// Run an action from a button: disable it meanwhile, show errors.
async function act(button, fn) {
  if (button) button.disabled = true;
  try {
    await fn();
  } catch (e) {
    toast(e.message);
  } finally {
    if (button) button.disabled = false;
  }
  await refresh();
}

// Run a form's action: its error goes next to the form, not to a toast.
async function formAct(form, errorSel, fn) {
  const button = form.querySelector("button[type=submit]");
  const error = $(errorSel);
  error.textContent = "";
  button.disabled = true;
  try {
    await fn();
  } catch (e) {
    error.textContent = e.message;
  } finally {
    button.disabled = false;
  }
  await refresh();
}

// -- sign in -------------------------------------------------------------------

async function signIn(token) {
  sessionStorage.setItem(TOKEN_KEY, token);
  const health = await api("GET", "/health");
  state.signedIn = true;
  $("#who-text").textContent = `engine ${health.version} on ${health.libvirt_uri}`;
  $("#who").hidden = false;
  $("#sign-in-view").hidden = true;
  $("#app-view").hidden = false;
  followEvents();
  await refresh();
}

function signOut(message) {
  state.signedIn = false;
  lastEventId = null;
  stopEvents();
  sessionStorage.removeItem(TOKEN_KEY);
  $("#who").hidden = true;
  $("#app-view").hidden = true;
  $("#sign-in-view").hidden = false;
  $("#sign-in-error").textContent = message || "";
  $("#token").value = "";
  $("#token").focus();
}

// -- data ------------------------------------------------------------------------

let refreshing = null;
let refreshAgain = null;
function refresh() {
  // One refresh at a time. A call during one gets another one after it, since
  // what it asks to see (a change just made) may have come after that one read.
  if (!state.signedIn) return Promise.resolve();
  if (refreshing) {
    refreshAgain ??= refreshing.then(() => { refreshAgain = null; return refresh(); });
    return refreshAgain;
  }
  refreshing = (async () => {
    try {
      [state.sds, state.vms, state.exports, state.jobs, state.hosts, state.audit] = await Promise.all([
        api("GET", "/storage_domains"), api("GET", "/vms"), api("GET", "/exports"),
        api("GET", "/jobs"), api("GET", "/hosts"),
        // The audit log is for admin tokens: another token gets 403, and no view.
        api("GET", "/audit?limit=30").catch((e) => { if (e.status === 403) return null; throw e; }),
      ]);
      render();
    } catch (e) {
      if (state.signedIn) toast(e.message);
    } finally {
      refreshing = null;
    }
  })();
  return refreshing;
}

// Live updates: one stream of server-sent events (GET /events) while signed in,
// read with fetch() so that the token goes in a header, never in the URL (an
// EventSource cannot send one). "hello" (the stream is open) and "resync" (we fell
// behind) mean: read everything again; "vm": a VM changed; "job": a job, whole.
let eventsRun = 0;
let eventsAbort = null;
let lastEventId = null;  // sent again on reconnecting: the engine replays what we missed

async function followEvents() {
  const run = ++eventsRun;
  while (state.signedIn && run === eventsRun) {
    eventsAbort = new AbortController();
    try {
      const headers = { Authorization: `Bearer ${sessionStorage.getItem(TOKEN_KEY) || ""}` };
      if (lastEventId) headers["Last-Event-ID"] = lastEventId;
      const res = await fetch(`${API}/events`, { headers, signal: eventsAbort.signal });
      if (res.status === 401) { signOut("The engine refused the token: sign in again."); return; }
      if (!res.ok) throw new Error(`events: HTTP ${res.status}`);
      const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
      let buf = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf = (buf + value).replace(/\r\n/g, "\n");
        let end;
        while ((end = buf.indexOf("\n\n")) >= 0) {
          onEvent(buf.slice(0, end));
          buf = buf.slice(end + 2);
        }
      }
    } catch (e) {
      if (e.name === "AbortError") return;
    }
    // The engine went away or restarted: try again shortly.
    if (state.signedIn && run === eventsRun) await sleep(2000);
  }
}

function stopEvents() {
  eventsRun++;
  eventsAbort?.abort();
}

function onEvent(block) {
  let kind = "message";
  let data = "";
  for (const line of block.split("\n")) {
    if (line.startsWith("event:")) kind = line.slice(6).trim();
    else if (line.startsWith("data:")) data += line.slice(5).trim();
    else if (line.startsWith("id:")) lastEventId = line.slice(3).trim();
  }
  if (!data) return;  // a ping
  if (kind === "unauthorized") {  // the token was revoked while the page was open
    signOut(`${JSON.parse(data).message}: sign in again.`);
    return;
  }
  if (kind === "job") {
    const job = JSON.parse(data);
    const i = state.jobs.findIndex((j) => j.id === job.id);
    if (i >= 0) state.jobs[i] = job; else state.jobs.unshift(job);
    render();
    if (!ACTIVE.has(job.state)) refreshSoon();  // its VM's disks changed
  } else {
    refreshSoon();  // hello, resync, vm
  }
}

// Many events at once (a VM started: its state, its start time) make one refresh.
let refreshTimer = null;
function refreshSoon() {
  clearTimeout(refreshTimer);
  refreshTimer = setTimeout(refresh, 150);
}

const vmName = (id) => state.vms.find((v) => v.id === id)?.name || id?.slice(0, 8) || "";
const sdName = (id) => state.sds.find((s) => s.id === id || s.name === id)?.name || id;
const activeJob = (vm) => state.jobs.find((j) => j.vm_id === vm.id && ACTIVE.has(j.state));

// -- rendering -------------------------------------------------------------------

function render() {
  renderConsoleInfo();
  renderVms();
  renderJobs();
  renderStorage();
  renderExports();
  renderHosts();
  renderExposeVms();
  renderJobView();
  renderAudit();
}

function renderAudit() {
  $("#audit-section").hidden = state.audit === null;
  if (state.audit === null) return;
  const rows = state.audit.map((a) => h("tr", { id: `audit-${a.id}` },
    cell("Time", new Date(a.at).toLocaleString()), cell("Token", a.token || "-"),
    cell("Client", a.client || "-"), cell("Action", a.action), cell("Target", a.target || "-"),
    cell("Outcome", badge(a.outcome, a.outcome === "ok" ? "running" : "failed"),
      a.message ? h("div", { class: "hint" }, a.message) : null)));
  replace($("#audit"), table(["Time", "Token", "Client", "Action", "Target", "Outcome"], rows,
    "Nothing recorded yet."));
}

function where(vm, disk, job) {
  if (disk.blank) return { label: "local, blank", cls: "blank" };
  if (disk.location === "local") return { label: "local", cls: "local" };
  if (job && (job.params.disks || []).includes(disk.id)) {
    const p = job.progress?.disks?.[disk.target];
    const pct = p && p.total ? Math.floor((100 * p.done) / p.total) : 0;
    return { label: `copying ${pct}%`, cls: "copying", pct };
  }
  return { label: "external", cls: "external" };
}

function renderVms() {
  const cards = state.vms.map((vm) => {
    const job = activeJob(vm);
    const id = `vm-${vm.name}`;
    const external = vm.disks.filter((d) => d.location === "external");
    const running = vm.state === "running";
    const disks = vm.disks.map((d) => {
      const w = where(vm, d, job);
      return h("li", {},
        h("strong", {}, d.target), ` ${bytes(d.virtual_size)} `, badge(w.label, w.cls),
        h("div", { class: "hint" }, d.external_disk
          ? ["from ", h("code", {}, d.external_disk.url), ` (${d.external_disk.format}); temporary disk on `,
            sdName(d.storage_domain)]
          : [d.blank ? "made blank on " : "on ", sdName(d.storage_domain), ": ", h("code", {}, d.volume_path)]),
        w.cls === "copying"
          ? h("progress", { max: 100, value: w.pct, id: `${id}-${d.target}-progress`,
            "aria-label": `${vm.name} ${d.target} import progress` }, `${w.pct}%`)
          : null);
    });
    const button = (label, key, handler, cls) =>
      h("button", { type: "button", id: `${id}-${key}`, class: cls, onclick: handler }, label);
    return h("article", { class: "card", id, "aria-labelledby": `${id}-title` },
      h("h3", { id: `${id}-title` }, vm.name, badge(vm.state)),
      h("p", { class: "meta" },
        `${vm.memory_mib} MiB, ${vm.cpus} CPU${vm.cpus > 1 ? "s" : ""}, ${vm.domain_type}`,
        vm.last_start_seconds !== null
          ? h("span", { id: `${id}-start-time` }, `; started in ${vm.last_start_seconds.toFixed(2)} s`) : null),
      vm.pause_reason ? h("p", { class: "meta warn", id: `${id}-pause-reason`, role: "status" }, vm.pause_reason) : null,
      h("ul", { "aria-label": `${vm.name} disks` }, disks),
      job ? h("p", { class: "meta" }, `${job.kind}: ${job.step || job.state}`) : null,
      h("div", { class: "actions" },
        running ? button("Stop", "stop", (e) => act(e.target, () => api("POST", `/vms/${vm.name}/stop`, {})))
          : button("Start", "start", (e) => act(e.target, async () => {
            await api("POST", `/vms/${vm.name}/start`);
            openConsole(vm.name);
          })),
        button("Console", "console", () => openConsole(vm.name), "secondary"),
        external.length && !job ? button("Import", "import", () => openImport(vm)) : null,
        job ? button("Cancel import", "cancel", (e) => act(e.target, () => api("POST", `/jobs/${job.id}/cancel`)), "secondary") : null,
        !job && vm.disks.every((d) => d.location === "external" || d.blank)
          ? button("Roll back", "rollback", () => confirmRollback(vm), "danger") : null,
        button("Remove", "remove", () => confirmRemove(vm), "secondary")));
  });
  replace($("#vms"), cards.length ? cards : h("p", { class: "empty" }, "No VMs yet: make one with New VM."));
}

function renderJobs() {
  const rows = state.jobs.slice(0, 15).map((j) => {
    const p = j.progress || {};
    const pct = p.total ? Math.floor((100 * p.done) / p.total) : null;
    const active = ACTIVE.has(j.state);
    return h("tr", { id: `job-${j.id}` },
      cell("Job", j.kind, h("div", { class: "hint" }, j.id.slice(0, 8))),
      cell("VM", vmName(j.vm_id)),
      cell("Target", j.params?.to ? sdName(j.params.to) : ""),
      cell("State", badge(j.state), j.step ? h("div", { class: "hint" }, j.step) : null),
      cell("Started", when(j.created_at), h("div", { class: "hint" }, active ? `for ${duration(j)}` : `took ${duration(j)}`)),
      cell("Progress", pct !== null
        ? [h("progress", { max: 100, value: pct, "aria-label": `job ${j.id.slice(0, 8)} progress` }, `${pct}%`),
          h("div", { class: "hint" }, `${pct}%, ${bytes(p.done)} of ${bytes(p.total)}`,
            active && rate(j) ? `, ${rate(j)}` : "",
            active && p.eta ? `, ${Math.ceil(p.eta)} s left` : "")]
        : ""),
      cell("Error", j.error ? h("span", { class: "clip", title: j.error }, j.error) : ""),
      cell("", h("div", { class: "actions" },
        h("button", { type: "button", class: "secondary", id: `job-${j.id}-view`,
          onclick: () => openJob(j.id) }, "Details"),
        active
          ? h("button", { type: "button", class: "secondary", id: `job-${j.id}-cancel`,
            onclick: (e) => act(e.target, () => api("POST", `/jobs/${j.id}/cancel`)) }, "Cancel")
          : null)));
  });
  replace($("#jobs"), table(["Job", "VM", "Target", "State", "Started", "Progress", "Error", ""], rows, "No jobs."));
}

// One job: its steps with their times, the bytes done over time, its error in full.
let viewedJob = null;
function openJob(id) {
  viewedJob = id;
  renderJobView();
  $("#job-dialog").showModal();
}

function renderJobView() {
  const dialog = $("#job-dialog");
  const j = state.jobs.find((x) => x.id === viewedJob);
  if (!j || !dialog) return;
  $("#job-title").textContent = `${j.kind} of ${vmName(j.vm_id)}`;
  const steps = (j.log || []).filter((e) => e.what !== null);
  const rows = steps.map((e, i) => {
    const next = steps[i + 1];
    const took = next ? `${((new Date(next.at) - new Date(e.at)) / 1000).toFixed(1)} s` : "";
    return h("tr", {}, cell("At", when(e.at)), cell("Took", took), cell("Step", e.what),
      cell("Done", e.done !== undefined && e.done !== null ? mib(e.done) : ""));
  });
  const p = j.progress || {};
  replace($("#job-body"),
    h("p", { class: "meta" }, badge(j.state), ` job ${j.id}`, j.params?.to ? `, to ${sdName(j.params.to)}` : "",
      `; started `, when(j.created_at), `, ${ACTIVE.has(j.state) ? "running for" : "took"} ${duration(j)}`,
      p.total ? `; ${bytes(p.done)} of ${bytes(p.total)}` : "", rate(j) ? `, ${rate(j)}` : ""),
    chart(j),
    table(["At", "Took", "Step", "Done"], rows, "No steps recorded."),
    j.error ? [h("h3", {}, "Error"), h("pre", { class: "job-error", id: "job-error" }, j.error)] : null);
}

// The bytes done over time, from the job log's samples: a small SVG line chart.
function chart(j) {
  const points = (j.log || []).filter((e) => e.done !== undefined && e.done !== null);
  const total = j.progress?.total;
  if (points.length < 2 || !total) return null;
  const t0 = new Date(points[0].at);
  const span = Math.max(1, (new Date(points[points.length - 1].at) - t0) / 1000);
  const W = 600, H = 120;
  const xy = points.map((e) => [((new Date(e.at) - t0) / 1000 / span) * W, H - (e.done / total) * H]);
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  svg.setAttribute("class", "chart");
  svg.setAttribute("role", "img");
  svg.setAttribute("id", "job-chart");
  svg.setAttribute("aria-label", `bytes done over ${span.toFixed(0)} s: ${bytes(points[points.length - 1].done)} of ${bytes(total)}`);
  const line = document.createElementNS(ns, "polyline");
  line.setAttribute("points", xy.map(([x, y]) => `${x.toFixed(1)},${y.toFixed(1)}`).join(" "));
  svg.append(line);
  return h("figure", {}, svg, h("figcaption", { class: "hint" },
    `Bytes done over time: 0 to ${bytes(total)} (top), ${span.toFixed(0)} s wide.`));
}

function renderHosts() {
  const rows = state.hosts.map((x) => h("tr", { id: `host-${x.name}` },
    cell("Name", x.name), cell("URI", h("code", {}, x.libvirt_uri)),
    cell("Hypervisor", x.reachable ? `${x.hypervisor} ${x.hypervisor_version}, ${x.domain_type}`
      : badge(`unreachable: ${x.error}`, "failed")),
    cell("CPUs", x.reachable ? x.cpus : ""),
    cell("Memory", x.reachable ? `${x.free_memory_mib} MiB free of ${x.memory_mib} MiB` : ""),
    cell("VMs", x.vms)));
  replace($("#hosts"), table(["Name", "URI", "Hypervisor", "CPUs", "Memory", "VMs"], rows, "No hosts."));
}

// The expose form's running VMs and their disks.
function renderExposeVms() {
  const vmSelect = $("#expose-form [name=vm]");
  if (vmSelect && document.activeElement !== vmSelect) {
    const chosen = vmSelect.value;
    vmSelect.replaceChildren(h("option", { value: "" }, "choose a running VM"),
      ...state.vms.filter((v) => v.state === "running").map((v) =>
        h("option", { value: v.name, selected: v.name === chosen }, v.name)));
    exposeDisks();
  }
}

function exposeDisks() {
  const f = $("#expose-form");
  const vm = state.vms.find((v) => v.name === f.elements.vm.value);
  const disk = f.elements.disk;
  const chosen = disk.value;
  disk.replaceChildren(...(vm ? vm.disks : []).map((d) =>
    h("option", { value: d.target, selected: d.target === chosen }, d.target)));
}

function renderStorage() {
  const rows = state.sds.map((s) => h("tr", {},
    cell("Name", s.name), cell("Directory", h("code", {}, s.path)),
    cell("Size", bytes(s.total_bytes)), cell("Free", bytes(s.free_bytes)),
    cell("Available", s.available ? "yes" : badge("unavailable", "failed"))));
  replace($("#storage"), table(["Name", "Directory", "Size", "Free", "Available"], rows,
    "No storage domain: add one below."));
}

function urlBox(url, id) {
  return h("div", { class: "url-box" },
    h("input", { readonly: true, value: url, id: `${id}-url`, "aria-label": "URL" }),
    h("button", { type: "button", class: "secondary", id: `${id}-copy`, onclick: () => copy(url, `${id}-url`) },
      "Copy URL"));
}

function renderExports() {
  const rows = state.exports.map((x) => h("tr", { id: `export-${x.name}` },
    cell("Name", x.name), cell("Image", h("code", {}, x.image), h("div", { class: "hint" },
      `${x.format}, ${bytes(x.virtual_size)}`)),
    cell("URL", urlBox(x.url, `export-${x.name}`)),
    cell("State", badge(x.state), x.clients !== null ? h("div", { class: "hint" }, `${x.clients} clients`) : null,
      x.warning ? h("div", { class: "error", id: `export-${x.name}-warning`, role: "note" }, x.warning) : null),
    cell("", h("button", { type: "button", class: "secondary", id: `export-${x.name}-remove`,
      onclick: (e) => act(e.target, () => api("DELETE", `/exports/${x.id}`)) }, "Unexpose"))));
  replace($("#exports"), table(["Name", "Image", "URL", "State", ""], rows, "No exports."));
}

async function copy(text, inputId) {
  try {
    await navigator.clipboard.writeText(text);
  } catch {
    const input = document.getElementById(inputId);  // no clipboard API: select it for Ctrl+C
    input.focus();
    input.select();
    toast("Selected: press Ctrl+C to copy", "info");
    return;
  }
  toast("URL copied", "info");
}

// -- dialogs -----------------------------------------------------------------------

document.addEventListener("click", (e) => {
  if (e.target.matches("[data-close]")) e.target.closest("dialog").close();
});

function sdOptions(select, selected) {
  select.replaceChildren(...state.sds.map((s) => h("option", { value: s.name, selected: s.name === selected }, s.name)));
}

// New VM, with the URI checked as it is typed.
function addDiskRow() {
  const row = $("#disk-row").content.firstElementChild.cloneNode(true);
  const n = $("#disk-rows").children.length;
  row.querySelectorAll("input, select").forEach((el) => { el.id = `disk${n}-${el.name}`; });
  row.querySelector(".probe").id = `disk${n}-probe`;
  row.querySelector("[name=url]").setAttribute("aria-describedby", `disk${n}-probe`);
  sdOptions(row.querySelector("[name=storage_domain]"));
  const kind = row.querySelector("[name=kind]");
  kind.addEventListener("change", () => {
    const blank = kind.value === "blank";
    row.classList.toggle("is-blank", blank);
    row.querySelectorAll("label.external").forEach((l) => { l.hidden = blank; });
    row.querySelector("label.blank").hidden = !blank;
    row.querySelector("[name=url]").disabled = blank;
    row.querySelector("[name=format]").disabled = blank;
    row.querySelector("[name=size]").disabled = !blank;
    if (blank) {
      clearTimeout(timer);
      controller?.abort();
      row.querySelector(".probe").textContent = "";
      row.querySelector("[name=size]").focus();
    } else {
      check();
      row.querySelector("[name=url]").focus();
    }
  });
  let timer = null;
  let controller = null;
  const check = () => {
    clearTimeout(timer);
    controller?.abort();
    const url = row.querySelector("[name=url]").value.trim();
    const format = row.querySelector("[name=format]").value || null;
    const out = row.querySelector(".probe");
    if (!url) { out.textContent = ""; out.className = "probe"; return; }
    out.textContent = "Checking…";
    out.className = "probe wait";
    timer = setTimeout(async () => {
      controller = new AbortController();
      try {
        const p = await api("POST", "/probe", { url, format }, controller.signal);
        const ro = p.read_only === true ? ", read-only export" : "";
        out.textContent = `Reachable: ${p.format}, ${bytes(p.virtual_size)}${ro}`;
        out.className = "probe ok";
      } catch (e) {
        if (e.name === "AbortError") return;
        out.textContent = e.message;
        out.className = "probe bad";
      }
    }, 500);
  };
  row.querySelector("[name=url]").addEventListener("input", check);
  row.querySelector("[name=format]").addEventListener("change", check);
  row.querySelector(".remove-disk").addEventListener("click", () => {
    if ($("#disk-rows").children.length > 1) row.remove();
  });
  $("#disk-rows").append(row);
  row.querySelector("[name=kind]").focus();
}

function openNewVm() {
  if (!state.sds.length) {
    toast("Add a storage domain first: the temporary disks go there.");
    return;
  }
  $("#vm-form").reset();
  $("#disk-rows").replaceChildren();
  $("#vm-form-error").textContent = "";
  $("#vm-dialog").showModal();
  addDiskRow();
  $("#vm-form [name=name]").focus();
}

async function createVm(e) {
  e.preventDefault();
  const form = e.target;
  const body = {
    name: form.elements.name.value.trim(),
    memory_mib: Number(form.elements.memory_mib.value),
    cpus: Number(form.elements.cpus.value),
    disks: [...$("#disk-rows").children].map((row) => {
      const storage_domain = row.querySelector("[name=storage_domain]").value || null;
      if (row.querySelector("[name=kind]").value === "blank") {
        // GiB to bytes, in whole 512-byte sectors
        const gib = Number(row.querySelector("[name=size]").value);
        return { blank: { virtual_size: Math.ceil((gib * 2 ** 30) / 512) * 512 }, storage_domain };
      }
      return { external_disk: { url: row.querySelector("[name=url]").value.trim(),
        format: row.querySelector("[name=format]").value || null }, storage_domain };
    }),
  };
  const button = $("#vm-create");
  button.disabled = true;
  button.textContent = "Creating…";
  try {
    await api("POST", "/vms", body);
    $("#vm-dialog").close();
    await refresh();
    document.getElementById(`vm-${body.name}-start`)?.focus();
  } catch (err) {
    $("#vm-form-error").textContent = err.message;
  } finally {
    button.disabled = false;
    button.textContent = "Create";
  }
}

let importing = null;
function openImport(vm) {
  importing = vm;
  const form = $("#import-form");
  form.reset();
  $("#import-title").textContent = `Import ${vm.name}`;
  $("#import-error").textContent = "";
  // Not where its temporary disks are (the engine would stream there; a user
  // importing means "somewhere else" more often than not).
  const temporary = new Set(vm.disks.map((d) => sdName(d.storage_domain)));
  const target = state.sds.find((s) => !temporary.has(s.name)) || state.sds[0];
  sdOptions(form.elements.to, target && target.name);
  $("#import-dialog").showModal();
}

async function startImport(e) {
  e.preventDefault();
  const form = e.target;
  const body = { to: form.elements.to.value, strategy: form.elements.strategy.value || null,
    bandwidth_mib: form.elements.bandwidth_mib.value ? Number(form.elements.bandwidth_mib.value) : null };
  try {
    const job = await api("POST", `/vms/${importing.name}/import`, body);
    $("#import-dialog").close();
    if (!state.jobs.some((j) => j.id === job.id)) state.jobs.unshift(job);
    render();
  } catch (err) {
    $("#import-error").textContent = err.message;
  }
}

// A confirmation that says what will happen; resolves true when confirmed.
function confirmDialog(title, body, yes) {
  const dialog = $("#confirm-dialog");
  $("#confirm-title").textContent = title;
  replace($("#confirm-body"), body);
  $("#confirm-yes").textContent = yes;
  dialog.returnValue = "";
  dialog.showModal();
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "yes"), { once: true });
  });
}

function deletes(vm) {
  return h("ul", {}, vm.disks.map((d) => h("li", {},
    `${d.target}: `, h("code", {}, d.volume_path), ` on ${sdName(d.storage_domain)}`,
    d.location === "external" ? " (temporary disk: the guest's writes since it was created)"
      : d.blank ? " (blank disk made with the VM: all the guest wrote to it)"
        : " (imported: the VM's only copy of its data)")));
}

async function confirmRollback(vm) {
  const external = vm.disks.filter((d) => d.external_disk);
  const body = [
    h("p", {}, `Roll back ${vm.name}: `, vm.state === "running" ? "stop it, " : "",
      activeJob(vm) ? "cancel its import, " : "", "undefine its domain and delete:"),
    deletes(vm),
    external.length ? h("p", {}, `Kept, never written: the external disk${external.length > 1 ? "s" : ""} `,
      external.map((d, i) => [i ? ", " : "", h("code", {}, d.external_disk.url)]), ".") : null,
  ];
  if (await confirmDialog(`Roll back ${vm.name}?`, body, "Roll back and delete")) {
    await act(null, () => api("POST", `/vms/${vm.name}/rollback`));
  }
}

async function confirmRemove(vm) {
  const body = [
    h("p", {}, `Remove ${vm.name}: `, vm.state === "running" ? "power it off, " : "",
      "undefine its domain and delete:"),
    deletes(vm),
  ];
  if (await confirmDialog(`Remove ${vm.name}?`, body, "Remove and delete")) {
    await act(null, () => api("DELETE", `/vms/${vm.name}?force=true`));
  }
}

// The serial console, followed while its dialog is open: each read waits on the
// engine (long-poll) until the guest printed more.
let consoleRun = 0;
let consoleName = null;
async function openConsole(name) {
  const run = ++consoleRun;
  const dialog = $("#console-dialog");
  const pre = $("#console-text");
  consoleName = name;
  $("#console-title").textContent = `Console of ${name}`;
  closeTerminal();
  pre.textContent = "";
  pre.dataset.empty = "true";
  renderConsoleInfo();
  if (!dialog.open) dialog.showModal();
  const stop = new AbortController();
  dialog.addEventListener("close", () => { stop.abort(); closeTerminal(); }, { once: true });
  let offset = 0;
  while (dialog.open && run === consoleRun) {
    try {
      const c = await api("GET", `/vms/${name}/console?offset=${offset}&wait=25`, undefined, stop.signal);
      if (run !== consoleRun) return;
      if (c.offset < offset) { pre.textContent = ""; pre.dataset.empty = "true"; }  // a new log
      if (c.text) {
        delete pre.dataset.empty;
        const atEnd = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 20;
        pre.append(c.text);
        if (atEnd) pre.scrollTop = pre.scrollHeight;
      }
      offset = c.offset;
    } catch (e) {
      if (e.name === "AbortError") return;
      $("#console-info").textContent = e.message;
      if (e.status === 404) return;
      await sleep(2000);
    }
  }
}

// The interactive console: xterm.js (as Proxmox's) over a WebSocket to the
// engine, which relays libvirt's console stream both ways. xterm.js is loaded
// when first asked for (scripts/setup.sh fetches it from npm).
let term = null;
let termSocket = null;
function loadXterm() {
  if (window.Terminal) return Promise.resolve();
  return new Promise((resolve, reject) => {
    const css = h("link", { rel: "stylesheet", href: "vendor/xterm/xterm.css" });
    const js = h("script", { src: "vendor/xterm/xterm.js" });
    // The bundle writes into a global `exports` when there is one, and the
    // element with id "exports" is one (named access): hide it meanwhile.
    window.exports = undefined;
    js.onload = () => { delete window.exports; resolve(); };
    js.onerror = () => {
      delete window.exports;
      reject(new Error("the terminal needs xterm.js: run scripts/setup.sh (it fetches it with npm)"));
    };
    document.head.append(css, js);
  });
}

async function openTerminal() {
  const name = consoleName;
  try {
    await loadXterm();
  } catch (e) {
    $("#console-info").textContent = e.message;
    return;
  }
  closeTerminal();
  consoleRun++;  // the read-only view stops
  $("#console-text").hidden = true;
  $("#console-type").hidden = true;
  const box = $("#console-term");
  box.hidden = false;
  term = new window.Terminal({ convertEol: false, cursorBlink: true, fontSize: 13, scrollback: 5000 });
  term.open(box);
  term.write(`\x1b[2mConnecting to the serial console of ${name}…\x1b[0m\r\n`);
  const proto = location.protocol === "https:" ? "wss:" : "ws:";
  const ws = new WebSocket(`${proto}//${location.host}${API}/vms/${encodeURIComponent(name)}/console/ws`);
  ws.binaryType = "arraybuffer";
  termSocket = ws;
  let heard = false;
  ws.onopen = () => {
    ws.send(JSON.stringify({ token: sessionStorage.getItem(TOKEN_KEY) || "" }));
    term.write("\x1b[2mConnected; waiting for output (press Enter to wake a login prompt).\x1b[0m\r\n");
    term.focus();
  };
  ws.onmessage = (e) => {
    if (!heard) { heard = true; box.dataset.heard = "true"; }
    term.write(new Uint8Array(e.data));
  };
  ws.onclose = (e) => {
    if (term && termSocket === ws) term.write(`\r\n\x1b[2m[disconnected: ${e.reason || e.code}]\x1b[0m\r\n`);
  };
  term.onData((d) => { if (ws.readyState === WebSocket.OPEN) ws.send(new TextEncoder().encode(d)); });
}

function closeTerminal() {
  termSocket?.close();
  termSocket = null;
  term?.dispose();
  term = null;
  const box = $("#console-term");
  box.hidden = true;
  box.replaceChildren();
  delete box.dataset.heard;
  $("#console-text").hidden = false;
  $("#console-type").hidden = false;
}

function renderConsoleInfo() {
  if (!consoleName) return;
  const vm = state.vms.find((v) => v.name === consoleName);
  $("#console-info").textContent = vm
    ? `${vm.state}${vm.last_start_seconds !== null ? `; started in ${vm.last_start_seconds.toFixed(2)} s` : ""}`
    : "";
}

// -- wiring ----------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  $("#sign-in").addEventListener("submit", async (e) => {
    e.preventDefault();
    $("#sign-in-error").textContent = "";
    try {
      await signIn($("#token").value.trim());
    } catch (err) {
      signOut(err.status === 401 ? "The engine does not know this token." : err.message);
    }
  });
  $("#sign-out").addEventListener("click", () => signOut());
  $("#new-vm").addEventListener("click", openNewVm);
  $("#console-type").addEventListener("click", openTerminal);
  $("#add-disk").addEventListener("click", addDiskRow);
  $("#vm-form").addEventListener("submit", createVm);
  $("#import-form").addEventListener("submit", startImport);
  $("#sd-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const f = e.target;
    formAct(f, "#sd-error", async () => {
      await api("POST", "/storage_domains", { name: f.elements.name.value.trim(), path: f.elements.path.value.trim() });
      f.reset();
    });
  });
  const exposeSource = () => {
    const f = $("#expose-form");
    const fromVm = f.elements.source.value === "vm";
    f.querySelectorAll(".from-image").forEach((l) => { l.hidden = fromVm; });
    f.querySelectorAll(".from-vm").forEach((l) => { l.hidden = !fromVm; });
    f.elements.image.disabled = fromVm;
    f.elements.image.required = !fromVm;
    f.elements.vm.disabled = !fromVm;
    f.elements.disk.disabled = !fromVm;
  };
  $("#expose-form [name=source]").addEventListener("change", exposeSource);
  $("#expose-form [name=vm]").addEventListener("change", exposeDisks);
  exposeSource();
  $("#expose-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const f = e.target;
    const fromVm = f.elements.source.value === "vm";
    formAct(f, "#expose-error", async () => {
      const x = await api("POST", "/exports", {
        image: fromVm ? null : f.elements.image.value.trim(),
        vm: fromVm ? f.elements.vm.value || null : null,
        disk: fromVm ? f.elements.disk.value || null : null,
        name: f.elements.name.value.trim() || null,
        format: fromVm ? null : f.elements.format.value || null,
        protocol: f.elements.protocol.value, tls: f.elements.tls.value });
      f.reset();
      exposeSource();
      toast(`Exposed at ${x.url}`, "info");
    });
  });
  // VMs and jobs come as events; storage domains' free space and exports' clients
  // do not: look again now and then.
  setInterval(() => { if (!document.hidden) refresh(); }, 30000);
  const saved = sessionStorage.getItem(TOKEN_KEY);
  if (saved) signIn(saved).catch(() => signOut()); else signOut();
});
