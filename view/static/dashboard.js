// multibroker dashboard: no framework, no CDN. Reads /api/dashboard, then follows /api/dashboard/stream (server-sent
// events read through fetch so the admin token travels in a header, never in a URL).
"use strict";
const $ = (id) => document.getElementById(id);
const state = { token: sessionStorage.getItem("mb-token") || "", controller: null, snapshot: null };
const COLORS = ["#58a6ff", "#3fb950", "#d29922", "#f778ba", "#a371f7", "#79c0ff", "#ffa657", "#56d364"];

function esc(v) { return String(v ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c])); }
function money(v) { if (v === null || v === undefined || v === "") return "—"; const n = Number(v); const s = n.toLocaleString("en-US", { minimumFractionDigits: 2, maximumFractionDigits: 2 }); return `<span class="${n > 0 ? "pos" : n < 0 ? "neg" : ""}">${s}</span>`; }
function plain(v) { return v === null || v === undefined ? "—" : Number(v).toLocaleString("en-US", { minimumFractionDigits: 2, maximumFractionDigits: 2 }); }
// Times arrive in UTC; traders read them in exchange time (America/New_York, DST-correct via Intl).
const ET = new Intl.DateTimeFormat("en-US", { timeZone: "America/New_York", month: "2-digit", day: "2-digit", hour: "2-digit", minute: "2-digit", second: "2-digit", hour12: false });
function et(v) { if (!v) return ""; const d = new Date(v); return isNaN(d) ? String(v) : `${ET.format(d).replace(",", "")} ET`; }
function table(el, head, rows) {
  el.innerHTML = `<thead><tr>${head.map((h) => `<th>${h}</th>`).join("")}</tr></thead><tbody>${rows.length ? rows.join("") : `<tr><td colspan="${head.length}" class="muted">none</td></tr>`}</tbody>`;
}
function showError(msg) { const e = $("error"); e.textContent = msg; e.hidden = !msg; }

async function api(path, options = {}) {
  const res = await fetch(path, { ...options, headers: { ...(options.headers || {}), Authorization: `Bearer ${state.token}`, "Content-Type": "application/json" } });
  if (res.status === 401) { lock("The admin token was refused."); throw new Error("unauthorized"); }
  const body = await res.json().catch(() => ({}));
  if (!res.ok) throw new Error(body?.error?.message || `HTTP ${res.status}`);
  return body;
}

function render(s) {
  state.snapshot = s;
  const p = s.portfolio || {};
  const limits = (p.limits || []).map((l) => `<div class="card"><div class="label">${esc(l.limit)}</div><div class="value">${money(l.daily_pnl)} / -${plain(l.limit_usd)}</div><div class="bar ${l.breached ? "hot" : ""}"><span style="width:${Math.min(100, Math.max(0, -Number(l.daily_pnl) / Number(l.limit_usd) * 100))}%"></span></div></div>`);
  $("totals").innerHTML = [
    `<div class="card"><div class="label">Portfolio daily P&amp;L</div><div class="value" id="total-pnl">${money(p.total?.daily_pnl)}</div></div>`,
    `<div class="card"><div class="label">Realized / unrealized</div><div class="value">${money(p.total?.realized)} / ${money(p.total?.unrealized)}</div></div>`,
    `<div class="card"><div class="label">Commissions today</div><div class="value">${plain(p.total?.commissions)}</div></div>`,
    `<div class="card"><div class="label">Open contracts</div><div class="value">${p.total?.open_contracts ?? 0}</div></div>`,
    ...Object.entries(p.total?.free_margin_by_broker || {}).map(([b, v]) => `<div class="card"><div class="label">Free margin at ${esc(b)}</div><div class="value">${plain(v)}</div></div>`),
    ...limits,
  ].join("");
  $("alerts").innerHTML = (s.alerts || []).map((a) => `<p class="alert" data-alert="${esc(a.kind)}"><span class="pill ${a.kind === "clear" ? "on" : a.kind === "adopt" ? "warn" : "off"}">${esc(a.kind.replace("_", " "))}</span> ${esc(et(a.time))} <b>${esc(a.name)}</b> ${esc(a.reason || "")}</p>`).join("");
  table($("attention"), ["Time", "Account", "Broker", "Order", "Status", "What it means", "Why"], (s.attention || []).map((o) => `<tr data-order="${esc(o.client_order_id)}" class="${o.exit ? "hot" : ""}"><td>${esc(et(o.time))}</td><td>${esc(o.account)}</td><td>${esc(o.broker)}</td><td>${esc(o.side)} ${esc(o.quantity)} ${esc(o.contract)} (${esc(o.intent)})</td><td><span class="pill ${o.status === "unknown" ? "warn" : "off"}">${esc(o.status)}</span></td><td>${esc(o.meaning)}</td><td class="muted">${esc(o.detail || "")}</td></tr>`));
  table($("brokers"), ["Broker", "Type", "Connection", "Rate-limit headroom", ""], (s.brokers || []).map((b) => `<tr data-broker="${esc(b.name)}"><td>${esc(b.name)}</td><td>${esc(b.type)}</td><td><span class="pill ${b.paused ? "warn" : b.connected ? "on" : "off"}">${b.paused ? "paused" : b.connected ? "connected" : "down"}</span></td><td>${Math.round((b.rate_limit_headroom ?? 1) * 100)}%</td><td>${b.paused ? `<button data-action="resume" data-name="${esc(b.name)}">Resume</button>` : `<button data-action="pause" data-name="${esc(b.name)}">Pause</button>`}</td></tr>`));
  const paused = new Set((s.brokers || []).filter((b) => b.paused).map((b) => b.name));
  table($("accounts"), ["Account", "Broker", "Cash", "Margin used", "Free margin", "Buffer left", "Daily P&L", "Limit headroom", "Status", ""], (p.accounts || []).map((a) => {
    const lim = (a.limits || [])[0];
    return `<tr data-account="${esc(a.name)}"><td>${esc(a.name)}</td><td>${esc(a.broker)}</td><td class="num">${plain(a.cash)}</td><td class="num">${plain(a.margin_used)}</td><td class="num">${plain(a.free_margin)}</td><td class="num">${money(a.buffer_left)}</td><td class="num">${money(a.daily_pnl)}</td><td class="num">${lim ? plain(lim.headroom) : "—"}</td><td>${a.halted ? `<span class="pill off">halted: ${esc(a.halted)}</span>` : a.connected ? `<span class="pill on">ok</span>` : paused.has(a.broker) ? `<span class="pill warn">broker paused</span>` : `<span class="pill off">broker down</span>`}</td><td><button data-action="flatten-account" data-name="${esc(a.name)}">Flatten</button></td></tr>`;
  }));
  const positions = (p.accounts || []).flatMap((a) => a.positions || []);
  table($("positions"), ["Account", "Strategy", "Contract", "Qty", "Avg price", "Mark", "Unrealized"], positions.map((x) => `<tr data-position="${esc(x.account)}:${esc(x.contract)}"><td>${esc(x.account)}</td><td>${esc(x.strategy)}</td><td>${esc(x.contract)}</td><td class="num">${x.quantity}</td><td class="num">${esc(x.avg_price)}</td><td class="num">${esc(x.mark ?? "—")}</td><td class="num">${money(x.unrealized)}</td></tr>`));
  renderEquity(s.equity || {});
  $("signals").innerHTML = (s.signals || []).map((sig) => {
    const d = sig.decision || {};
    const orders = (d.orders || []).map((o) => `<li>${esc(o.account)} @ ${esc(o.broker)}: ${esc(o.side)} ${o.quantity} ${esc(o.contract)} (${esc(o.intent)})</li>`).join("");
    const skipped = (d.skipped || []).map((k) => `<li class="muted">${esc(k.account)} skipped: ${esc(k.reason)}${k.by ? ` [${esc(k.by)}]` : ""}</li>`).join("");
    // Which rules decided (records journaled before decisions named them have no ruleset: nothing shown).
    const rs = d.ruleset || {};
    const rules = rs.content_hash ? `<li class="muted" data-rules="${esc(rs.content_hash)}">decided by rules ${rs.generation != null ? `generation ${esc(rs.generation)} ` : ""}(${esc(String(rs.content_hash).slice(0, 8))})</li>` : "";
    const status = sig.status === "rejected" ? `<span class="pill off">rejected</span>` : d.accepted ? `<span class="pill on">accepted</span>` : `<span class="pill warn">no orders</span>`;
    return `<details class="signal" data-signal="${esc(sig.signal_id)}"><summary>${esc(et(sig.received_at))} ${status} <b>${esc(sig.strategy || "")}</b> ${esc(sig.action || "")} ${esc(sig.ticker || "")} ${d.rule ? `via ${esc(d.rule)}` : ""} ${d.blocked_by ? `blocked by ${esc(d.blocked_by)}` : ""} ${esc(sig.reason || d.reason || "")}</summary><ul>${orders}${skipped}${rules}</ul></details>`;
  }).join("") || `<p class="muted">no signals yet</p>`;
  table($("reconciliations"), ["Time", "Broker", "Account", "Result"], (s.reconciliations || []).map((r) => `<tr><td>${esc(et(r.time))}</td><td>${esc(r.broker)}</td><td>${esc(r.account || "")}</td><td>${r.ok ? `<span class="pill on">ok</span>` : `<span class="pill off">${esc(r.detail || "mismatch")}</span>`}</td></tr>`));
  $("halts").innerHTML = (s.halts || []).map((h) => `<p><span class="pill off">${esc(h.name)}</span> ${esc(h.reason || "")} <button data-action="clear-halt" data-name="${esc(h.name)}">Clear</button></p>`).join("") || `<p class="muted">no halts</p>`;
  const r = s.rules || {};
  $("rules").textContent = r.generation !== undefined ? `rules generation ${r.generation} (${String(r.content_hash || "").slice(0, 8)})` : "";
  const last = r.last_reload;
  $("reload").innerHTML = last ? `<p>Last reload ${esc(et(last.time))}: ${last.ok ? `<span class="pill on">ok</span>` : `<span class="pill off">failed, old rules still running</span>`}</p>${(last.errors || []).length ? `<pre>${esc(last.errors.join("\n"))}</pre>` : ""}` : `<p class="muted">no reload yet</p>`;
}

function renderEquity(curves) {
  const names = Object.keys(curves);
  if (!names.length) { $("equity").innerHTML = `<p class="muted">no marks yet</p>`; return; }
  // Accounts differ in size (50k next to 100k), so each curve is drawn as its change since its first point: shapes
  // and drawdowns stay comparable on one scale; the legend shows each current equity.
  const delta = (n, pt) => Number(pt[1]) - Number(curves[n][0][1]);
  const all = names.flatMap((n) => curves[n].map((pt) => delta(n, pt)));
  const lo = Math.min(0, ...all), hi = Math.max(0, ...all), span = hi - lo || 1;
  const len = Math.max(...names.map((n) => curves[n].length), 2);
  // Each curve is right-aligned on the shared time axis (the last point is "now"); a lone point (a fresh service,
  // no daily mark yet) is drawn as a flat line so it is visible.
  const lines = names.map((n, i) => {
    const c = curves[n].length === 1 ? [curves[n][0], curves[n][0]] : curves[n];
    const offset = len - Math.max(c.length, 2);
    const pts = c.map((pt, j) => `${((offset + j) / (len - 1)) * 100},${100 - ((delta(n, pt) - lo) / span) * 100}`).join(" ");
    return `<polyline points="${pts}" stroke="${COLORS[i % COLORS.length]}" vector-effect="non-scaling-stroke"/>`;
  }).join("");
  const last = (n) => curves[n][curves[n].length - 1][1];
  $("equity").innerHTML = `<svg class="curve" viewBox="0 0 100 100" preserveAspectRatio="none">${lines}</svg><div class="legend">${names.map((n, i) => `<span style="color:${COLORS[i % COLORS.length]}" data-equity="${esc(n)}">${esc(n)} ${plain(last(n))}</span>`).join("")}</div>`;
}

async function follow() {
  if (state.controller) state.controller.abort();
  const controller = new AbortController();
  state.controller = controller;
  try {
    const res = await fetch("/api/dashboard/stream", { headers: { Authorization: `Bearer ${state.token}`, Accept: "text/event-stream" }, signal: controller.signal });
    if (res.status === 401) { lock("The admin token was refused."); return; }
    if (!res.ok || !res.body) throw new Error(`stream HTTP ${res.status}`);
    $("live").textContent = "live"; $("live").className = "pill on";
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const frame = buffer.slice(0, cut); buffer = buffer.slice(cut + 2);
        const data = frame.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
        if (data) { render(JSON.parse(data)); showError(""); }
      }
    }
  } catch (err) {
    if (controller.signal.aborted) return;
    showError(`live updates interrupted (${err.message}); retrying`);
  }
  $("live").textContent = "offline"; $("live").className = "pill off";
  if (!controller.signal.aborted) setTimeout(follow, 2000);
}

function unlock() { $("login").hidden = true; $("logout").hidden = false; $("app").hidden = false; api("/api/dashboard").then(render).catch((e) => showError(e.message)); follow(); }
function lock(msg) { state.token = ""; sessionStorage.removeItem("mb-token"); if (state.controller) state.controller.abort(); $("login").hidden = false; $("logout").hidden = true; $("app").hidden = true; showError(msg || ""); }

$("login").addEventListener("submit", (e) => { e.preventDefault(); state.token = $("token").value.trim(); sessionStorage.setItem("mb-token", state.token); unlock(); });
$("logout").addEventListener("click", () => lock(""));
document.addEventListener("click", async (e) => {
  const btn = e.target.closest("button[data-action], #flatten-all");
  if (!btn) return;
  const action = btn.id === "flatten-all" ? "flatten-all" : btn.dataset.action;
  const name = btn.dataset.name;
  const plans = {
    "flatten-all": [`Flatten EVERY open position in every account?`, "/api/flatten", {}],
    "flatten-account": [`Flatten every position of account ${name}?`, "/api/flatten", { account: name }],
    pause: [`Pause broker ${name}? Its accounts get no new orders until resumed.`, `/api/brokers/${encodeURIComponent(name)}/pause`, {}],
    resume: [`Resume broker ${name}?`, `/api/brokers/${encodeURIComponent(name)}/resume`, {}],
    "clear-halt": [`Clear halt ${name}? Entries resume for what it blocked.`, `/api/halts/${encodeURIComponent(name)}/clear`, {}],
  };
  const plan = plans[action];
  if (!plan || !window.confirm(plan[0])) return;
  try { await api(plan[1], { method: "POST", body: JSON.stringify(plan[2]) }); showError(""); } catch (err) { showError(`${action} failed: ${err.message}`); }
});
if (state.token) unlock(); else lock("");
