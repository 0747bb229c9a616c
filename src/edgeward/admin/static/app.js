// The dashboard: the last hour from /history, then one view a second from /events (server-sent
// events). Everything is written with textContent: service names come from the config, ban
// reasons from log lines an attacker wrote, and none of it may become markup.
"use strict";

const HOUR = 3600;
const SVG = "http://www.w3.org/2000/svg";
let points = [];  // {time, clients, in_rate, out_rate}, oldest first, at most the last hour

function $(id) { return document.getElementById(id); }

function rate(bps) {
  const units = ["B/s", "kB/s", "MB/s", "GB/s"];
  let i = 0;
  while (bps >= 1000 && i < units.length - 1) { bps /= 1000; i++; }
  return (i === 0 ? bps.toFixed(0) : bps.toFixed(1)) + " " + units[i];
}

function clock(t) {
  return t ? new Date(t * 1000).toLocaleTimeString() : "forever";
}

function cell(tr, text, cls) {
  const td = document.createElement("td");
  td.textContent = String(text);
  if (cls) td.className = cls;
  tr.appendChild(td);
  return td;
}

function fill(tbody, rows, empty, columns) {
  const next = document.createDocumentFragment();
  for (const r of rows) next.appendChild(r);
  if (!rows.length) {
    const tr = document.createElement("tr");
    tr.className = "empty";
    const td = cell(tr, empty);
    td.colSpan = columns;
    next.appendChild(tr);
  }
  tbody.replaceChildren(next);
}

function services(view) {
  const rows = Object.entries(view.services)
    .sort((a, b) => b[1].clients - a[1].clients || a[0].localeCompare(b[0]))
    .map(([name, s]) => {
      const tr = document.createElement("tr");
      tr.dataset.service = name;
      cell(tr, name, "name");
      cell(tr, s.clients, "n clients");
      cell(tr, s.active, "n active");
      cell(tr, s.udp_sessions, "n udp");
      cell(tr, rate(s.in_rate), "n in");
      cell(tr, rate(s.out_rate), "n out");
      cell(tr, s.pool || "-", "pool");
      return tr;
    });
  fill($("services").tBodies[0], rows, "no services", 7);
}

function servers(view) {
  const rows = [];
  for (const [pool, p] of Object.entries(view.pools)) {
    for (const s of p.servers) {
      const tr = document.createElement("tr");
      tr.dataset.pool = pool;
      tr.dataset.server = s.server;
      cell(tr, pool, "pool");
      cell(tr, s.server, "name");
      const state = s.drain ? "drain" : s.available ? "up" : "down";
      cell(tr, state === "down" ? "DOWN" : state, "health " + state);
      cell(tr, s.clients, "n clients");
      cell(tr, s.active, "n active");
      cell(tr, s.udp_sessions, "n udp");
      cell(tr, rate(s.in_rate), "n in");
      cell(tr, rate(s.out_rate), "n out");
      rows.push(tr);
    }
  }
  fill($("servers").tBodies[0], rows, "no pools", 8);
}

function bans(view) {
  const rows = view.bans.map((b) => {
    const tr = document.createElement("tr");
    tr.dataset.address = b.address;
    cell(tr, b.address, "address");
    cell(tr, b.jail, "jail");
    cell(tr, clock(b.start));
    cell(tr, clock(b.end));
    cell(tr, b.reason || "", "reason");
    return tr;
  });
  fill($("bans").tBodies[0], rows, "no bans in force", 5);
}

function chart(svg, values, format) {
  const w = 600, h = 140, top = 14;
  const now = Date.now() / 1000;
  const max = Math.max(1, ...values.map((v) => v[1]));
  // The last hour, or since the first point when there is less (at least a minute): a fresh edge's
  // first minutes are a line, not a dot at the right edge.
  const span = Math.min(HOUR, Math.max(60, values.length ? now - values[0][0] : HOUR));
  const x = (t) => Math.max(0, Math.min(w, w - ((now - t) / span) * w));
  const y = (v) => h - (v / max) * (h - top);
  let d = "";
  for (const [t, v] of values) d += (d ? "L" : "M") + x(t).toFixed(1) + "," + y(v).toFixed(1);
  const line = document.createElementNS(SVG, "path");
  line.setAttribute("class", "line");
  line.setAttribute("d", d || "M0," + h);
  const area = document.createElementNS(SVG, "path");
  area.setAttribute("class", "area");
  area.setAttribute("d", d ? d + "L" + x(values[values.length - 1][0]).toFixed(1) + "," + h + "L" + x(values[0][0]).toFixed(1) + "," + h + "Z" : "");
  const label = document.createElementNS(SVG, "text");
  label.setAttribute("class", "max");
  label.setAttribute("x", "4");
  label.setAttribute("y", "11");
  label.textContent = "max " + format(max);
  svg.replaceChildren(area, line, label);
}

function addPoint(p) {
  if (!p) return;
  if (points.length && p.time <= points[points.length - 1].time) return;
  points.push({ time: p.time, clients: p.clients, in_rate: p.in_rate, out_rate: p.out_rate });
  const since = p.time - HOUR;
  while (points.length && points[0].time < since) points.shift();
}

function charts() {
  chart($("chart-clients"), points.map((p) => [p.time, p.clients]), (v) => String(Math.round(v)));
  chart($("chart-rate"), points.map((p) => [p.time, p.in_rate + p.out_rate]), rate);
}

function show(view) {
  if (view.error) {
    $("state").textContent = view.error;
    $("state").className = "state lost";
    return;
  }
  $("version").textContent = "v" + view.version + " · up " + Math.floor(view.uptime) + " s";
  $("clients").textContent = view.clients;
  $("connections").textContent = view.connections;
  $("udp-sessions").textContent = view.udp_sessions;
  $("in-rate").textContent = rate(view.in_rate);
  $("out-rate").textContent = rate(view.out_rate);
  $("bans-in-force").textContent = view.bans_in_force;
  services(view);
  servers(view);
  bans(view);
  // The chart: the edge's 10 s history, and between its points what this page saw each second.
  addPoint(view.point);
  addPoint({ time: view.time, clients: view.clients, in_rate: view.in_rate, out_rate: view.out_rate });
  charts();
  $("state").textContent = "live · " + new Date(view.time * 1000).toLocaleTimeString();
  $("state").className = "state live";
  document.body.dataset.updated = String(view.time);
}

async function start() {
  const r = await fetch("/history", { credentials: "same-origin" });
  if (r.status === 401) { window.location.assign("/login"); return; }
  if (r.ok) {
    for (const p of (await r.json()).points) addPoint(p);
    charts();
  }
  const events = new EventSource("/events");
  events.onmessage = (e) => show(JSON.parse(e.data));
  events.onerror = () => {
    $("state").textContent = "reconnecting…";
    $("state").className = "state lost";
  };
}

start();
