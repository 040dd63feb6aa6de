// nodeagent web: this node's rejected connections, live from /api/events (server-sent events
// fed by the LocalAPI watch stream). Plain JS, no build step; everything from the agent is put
// into the page as text, never as HTML.
"use strict";

const PROTO = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmpv6", 132: "sctp"};
const $ = (id) => document.getElementById(id);
const token = document.querySelector('meta[name="nodeagent-token"]').content;

let last = null;       // the last snapshot event's data
const seen = new Map(); // row key -> Count, to flash rows that changed

function split(endpoint) {
  if (endpoint.startsWith("[")) {
    const i = endpoint.indexOf("]:");
    return i < 0 ? [endpoint.slice(1, -1), ""] : [endpoint.slice(1, i), endpoint.slice(i + 2)];
  }
  const i = endpoint.lastIndexOf(":");
  return i < 0 ? [endpoint, ""] : [endpoint.slice(0, i), endpoint.slice(i + 1)];
}

// What a reason means when the agent gave no Explanation (the CLI table's hints).
function hint(reason, direction, peer) {
  if (direction === "incoming") {
    return {
      acl: `this node's tailnet policy does not allow ${peer} to connect here`,
      shields: `shields-up on this node refused ${peer} (nodeagent prefs ShieldsUp)`,
    }[reason] || `this node refused ${peer}: ${reason}`;
  }
  return {
    acl: `refused by the tailnet policy on ${peer}`,
    shields: `${peer} has shields-up: it accepts no incoming connections`,
    "host-ip-forwarding": `${peer} cannot forward to the subnet: IP forwarding is off there`,
    "host-firewall": `${peer}'s host firewall dropped the connection`,
    "no-peer": "no node in the netmap owns this address (typo, or a route not advertised?)",
    "peer-unreachable": `${peer} is in the netmap but no path to it works`,
    timeout: `${peer} is reachable but never answered (service down or filtered?)`,
  }[reason] || `${peer} rejected it for an unknown reason`;
}

function ago(ts) {
  const t = Date.parse(ts);
  if (Number.isNaN(t)) return ts;
  const d = Math.max(0, (Date.now() - t) / 1000);
  if (d < 60) return `${d.toFixed(0)}s ago`;
  if (d < 3600) return `${(d / 60).toFixed(0)}m ago`;
  if (d < 86400) return `${(d / 3600).toFixed(1)}h ago`;
  return `${(d / 86400).toFixed(1)}d ago`;
}

function rowsOf(data) {
  const r = data.Rejects || {};
  const names = data.Names || {};
  const rows = [];
  for (const [direction, list] of [["outgoing", r.Outgoing || []], ["incoming", r.Incoming || []]]) {
    for (const ev of list) {
      const [addr] = split(direction === "outgoing" ? ev.Dst : ev.Src);
      const [, port] = split(ev.Dst);
      const name = names[addr] || "";
      rows.push({direction, addr, name, port, ev,
                 key: `${direction}|${ev.Proto}|${addr}|${ev.Reason}`,
                 explanation: typeof ev.Explanation === "string" && ev.Explanation
                   ? ev.Explanation : hint(ev.Reason, direction, name || addr)});
    }
  }
  rows.sort((a, b) => (Date.parse(b.ev.Last) || 0) - (Date.parse(a.ev.Last) || 0));
  return rows;
}

function cell(tr, cls, text, title) {
  const td = document.createElement("td");
  if (cls) td.className = cls;
  td.textContent = text;
  if (title) td.title = title;
  tr.appendChild(td);
  return td;
}

function syncReasons(rows) {
  const sel = $("reason-filter");
  const have = new Set([...sel.options].map((o) => o.value));
  for (const r of rows) {
    if (!have.has(r.ev.Reason)) {
      const o = document.createElement("option");
      o.value = o.textContent = r.ev.Reason;
      sel.appendChild(o);
      have.add(r.ev.Reason);
    }
  }
}

function render() {
  if (last === null) return;
  const enabled = !!(last.Rejects && last.Rejects.Enabled);
  $("disabled").hidden = enabled;
  $("live").hidden = !enabled;
  const rows = rowsOf(last);
  syncReasons(rows);
  const peerQ = $("peer-filter").value.trim().toLowerCase();
  const reasonQ = $("reason-filter").value;
  const shown = rows.filter((r) => (!reasonQ || r.ev.Reason === reasonQ) &&
    (!peerQ || r.addr.toLowerCase().includes(peerQ) || r.name.toLowerCase().includes(peerQ)));
  const body = $("rows");
  body.replaceChildren();
  for (const r of shown) {
    const tr = document.createElement("tr");
    tr.className = "reject";
    tr.dataset.key = r.key;
    tr.dataset.peer = r.addr;
    tr.dataset.reason = r.ev.Reason;
    tr.dataset.count = String(r.ev.Count);
    if (seen.has(r.key) && seen.get(r.key) !== r.ev.Count) tr.classList.add("fresh");
    cell(tr, "direction", r.direction);
    const peer = cell(tr, "peer", "");
    if (r.name) {
      const b = document.createElement("strong");
      b.textContent = r.name;
      peer.append(b, " ");
    }
    const a = document.createElement("span");
    a.className = r.name ? "addr" : "";
    a.textContent = r.addr;
    peer.appendChild(a);
    cell(tr, "port", r.port || "-");
    cell(tr, "proto", PROTO[r.ev.Proto] || String(r.ev.Proto));
    cell(tr, "reason", r.ev.Reason, `source: ${r.ev.Source}${r.ev.MaybeBroken ? " (maybe broken)" : ""}`);
    cell(tr, "count", String(r.ev.Count));
    cell(tr, "last", ago(r.ev.Last), `last ${r.ev.Last}, first ${r.ev.First}`).dataset.ts = r.ev.Last;
    cell(tr, "explanation", r.explanation);
    body.appendChild(tr);
  }
  for (const r of rows) seen.set(r.key, r.ev.Count);
  $("empty").hidden = rows.length !== 0;
  $("filtered").hidden = rows.length === shown.length;
  $("filtered").textContent = `${rows.length - shown.length} of ${rows.length} hidden by the filters`;
}

function setStatus(cls, text) {
  const s = $("conn-status");
  s.className = `status ${cls}`;
  s.textContent = text;
}

function connect() {
  const es = new EventSource("/api/events");
  es.addEventListener("snapshot", (e) => {
    last = JSON.parse(e.data);
    $("agent-error").hidden = true;
    setStatus("live", "live");
    render();
  });
  es.addEventListener("heartbeat", () => setStatus("live", "live"));
  es.addEventListener("agent-closing", () => setStatus("error", "agent stopping; reconnecting…"));
  es.addEventListener("agent-error", (e) => {
    const msg = JSON.parse(e.data).error || "agent error";
    $("agent-error").textContent = msg;
    $("agent-error").hidden = false;
    setStatus("error", "agent unreachable; retrying…");
  });
  es.addEventListener("server-closing", () => setStatus("error", "web server stopped"));
  es.onerror = () => setStatus("connecting", "reconnecting…");
}

$("peer-filter").addEventListener("input", render);
$("reason-filter").addEventListener("change", render);
$("clear").addEventListener("click", async () => {
  const out = $("clear-result");
  out.textContent = "clearing…";
  try {
    const r = await fetch("/api/clear", {method: "POST", headers: {"X-Nodeagent-Token": token},
                                         credentials: "same-origin"});
    const body = await r.json().catch(() => ({}));
    out.textContent = r.ok ? "cleared" : `not cleared: ${body.error || r.status}`;
  } catch (err) {
    out.textContent = `not cleared: ${err}`;
  }
});
// "Last seen" ages in place; this reads no data, the stream brings every change.
setInterval(() => {
  for (const td of document.querySelectorAll("td.last")) td.textContent = ago(td.dataset.ts);
}, 1000);
connect();
