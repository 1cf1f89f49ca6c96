// The attribution graph viewer: draws the graph file that `tl-transcoders attribute`
// exported (circuit-tracer's graph JSON: nodes and links) with d3, features at their
// layer and position, and shows a node's inputs, outputs and dashboard on click.
"use strict";

const data = JSON.parse(document.getElementById("tlt-data").textContent);
const graph = data.graph;
const tokens = graph.metadata.prompt_tokens;
const nodes = graph.nodes;
const byId = new Map(nodes.map((node) => [node.node_id, node]));
const links = graph.links.filter((link) => byId.has(link.source) && byId.has(link.target));
const incoming = new Map(nodes.map((node) => [node.node_id, []]));
const outgoing = new Map(nodes.map((node) => [node.node_id, []]));
for (const link of links) {
  incoming.get(link.target).push(link);
  outgoing.get(link.source).push(link);
}

const KINDS = {
  "cross layer transcoder": "feature",
  "mlp reconstruction error": "error",
  embedding: "token",
  logit: "logit",
};
const kind = (node) => KINDS[node.feature_type] || "feature";
// Rows: tokens, then one per layer, then the targets just above the last layer.
const lastLayer = Math.max(-1, ...nodes.filter((n) => n.layer !== "E" && kind(n) !== "logit").map((n) => Number(n.layer)));
const row = (node) => (node.layer === "E" ? 0 : kind(node) === "logit" ? lastLayer + 2 : Number(node.layer) + 1);
const latent = (node) => Number(node.node_id.split("_")[1]);
const dashboardKey = (node) => `${node.layer}_${latent(node)}`;

function describe(node) {
  const at = `position ${node.ctx_idx} (${JSON.stringify(tokens[node.ctx_idx] ?? "")})`;
  switch (kind(node)) {
    case "feature":
      return `layer ${node.layer} latent ${latent(node)} at ${at}`;
    case "error":
      return `error node of layer ${node.layer} at ${at}`;
    case "token":
      return `token embedding at ${at}`;
    default:
      return node.clerp || `logit ${node.node_id}`;
  }
}

// --- layout: a column per prompt position, a row per layer (tokens below, logits above)
const nRows = Math.max(...nodes.map(row)) + 1;
const margin = { left: 70, right: 20, top: 20, bottom: 70 };
// Fit the pane where it can: columns of 60-140 px, rows of 18-34 px.
const pane = document.getElementById("canvas");
const columnWidth = Math.max(60, Math.min(140, (pane.clientWidth - 90) / Math.max(tokens.length, 1)));
const rowHeight = Math.max(18, Math.min(34, (pane.clientHeight - 90) / nodes.reduce((m, n) => Math.max(m, row(n) + 1), 1)));
const width = margin.left + margin.right + columnWidth * tokens.length;
const height = margin.top + margin.bottom + rowHeight * nRows;
const x = (position) => margin.left + columnWidth * (position + 0.5);
const y = (r) => margin.top + rowHeight * (nRows - 1 - r + 0.5);

const cells = d3.group(nodes, (node) => `${row(node)}_${node.ctx_idx}`);
for (const members of cells.values()) {
  members.sort((a, b) => (b.influence ?? 0) - (a.influence ?? 0));
  const spacing = Math.min(14, (columnWidth - 8) / members.length);
  members.forEach((node, i) => {
    node.x = x(node.ctx_idx) + (i - (members.length - 1) / 2) * spacing;
    node.y = y(row(node));
  });
}

const svg = d3.select("#graph").attr("width", width).attr("height", height);
const axis = svg.append("g").attr("class", "axis");
axis
  .selectAll("line")
  .data(d3.range(nRows))
  .join("line")
  .attr("x1", margin.left)
  .attr("x2", width - margin.right)
  .attr("y1", y)
  .attr("y2", y);
axis
  .selectAll("text.row")
  .data(d3.range(nRows))
  .join("text")
  .attr("class", "row")
  .attr("x", 6)
  .attr("y", (r) => y(r) + 4)
  .text((r) => (r === 0 ? "tokens" : r === lastLayer + 2 ? "targets" : `layer ${r - 1}`));
axis
  .selectAll("text.token")
  .data(tokens)
  .join("text")
  .attr("class", "token")
  .attr("text-anchor", "end")
  .attr("transform", (_, i) => `translate(${x(i)},${height - margin.bottom + 14}) rotate(-40)`)
  .text((token) => token);

const maxWeight = d3.max(links, (link) => Math.abs(link.weight)) || 1;
const linkPaths = svg
  .append("g")
  .selectAll("line")
  .data(links)
  .join("line")
  .attr("class", "link")
  .attr("x1", (link) => byId.get(link.source).x)
  .attr("y1", (link) => byId.get(link.source).y)
  .attr("x2", (link) => byId.get(link.target).x)
  .attr("y2", (link) => byId.get(link.target).y)
  .attr("stroke", (link) => (link.weight >= 0 ? "#2166ac" : "#b2182b"))
  .attr("stroke-width", (link) => 0.4 + (3 * Math.abs(link.weight)) / maxWeight);

const tooltip = d3.select("#tooltip");
const nodeGroups = svg
  .append("g")
  .selectAll("g")
  .data(nodes)
  .join("g")
  .attr("class", (node) => `node ${kind(node)}${node.clerp && kind(node) === "feature" ? " labelled" : ""}`)
  .attr("data-id", (node) => node.node_id)
  .attr("transform", (node) => `translate(${node.x},${node.y})`)
  .on("mouseenter", (event, node) => {
    const label = node.clerp && kind(node) === "feature" ? `<br><span class="label">${escapeHtml(node.clerp)}</span>` : "";
    tooltip.property("hidden", false).html(`${escapeHtml(describe(node))}${label}`);
  })
  .on("mousemove", (event) => tooltip.style("left", `${event.clientX + 12}px`).style("top", `${event.clientY + 12}px`))
  .on("mouseleave", () => tooltip.property("hidden", true))
  .on("click", (event, node) => select(node.node_id));
nodeGroups.each(function (node) {
  const group = d3.select(this);
  if (kind(node) === "error") {
    group.append("rect").attr("class", "shape").attr("x", -4).attr("y", -4).attr("width", 8).attr("height", 8);
  } else if (kind(node) === "token") {
    group.append("rect").attr("class", "shape").attr("x", -6).attr("y", -4).attr("width", 12).attr("height", 8).attr("rx", 2);
  } else {
    group.append("circle").attr("class", "shape").attr("r", kind(node) === "logit" ? 6 : 5);
  }
});

function escapeHtml(text) {
  return String(text).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}

function edgeList(title, edges, other) {
  const top = [...edges].sort((a, b) => Math.abs(b.weight) - Math.abs(a.weight)).slice(0, 12);
  if (!top.length) return `<h3>${title}</h3><p class="hint">none kept by pruning</p>`;
  const items = top
    .map((link) => {
      const node = byId.get(other(link));
      const sign = link.weight >= 0 ? "pos" : "neg";
      const label = node.clerp && kind(node) === "feature" ? ` <span class="label">${escapeHtml(node.clerp)}</span>` : "";
      return `<li data-id="${escapeHtml(node.node_id)}"><span class="weight ${sign}">${link.weight.toPrecision(3)}</span> ${escapeHtml(describe(node))}${label}</li>`;
    })
    .join("");
  return `<h3>${title} (${edges.length}, strongest first)</h3><ol>${items}</ol>`;
}

function select(id) {
  const node = byId.get(id);
  if (!node) return;
  nodeGroups.classed("selected", (other) => other.node_id === id);
  linkPaths
    .classed("lit", (link) => link.source === id || link.target === id)
    .classed("faded", (link) => link.source !== id && link.target !== id);
  const facts = [];
  if (node.activation != null) facts.push(`activation ${node.activation.toPrecision(4)}`);
  if (node.influence != null) facts.push(`cumulative influence ${node.influence.toPrecision(3)}`);
  let dashboard = "";
  if (kind(node) === "feature") {
    const html = data.dashboards[dashboardKey(node)];
    dashboard = html
      ? `<h3>Dashboard</h3><div id="dashboard">${html}</div>`
      : `<h3>Dashboard</h3><p class="hint">no dashboard for this latent (serve --dashboards FILE.json)</p>`;
  }
  const label = node.clerp ? `<p class="label" id="node-label">${escapeHtml(node.clerp)}</p>` : "";
  d3.select("#details").html(
    `<h2 id="node-title">${escapeHtml(describe(node))}</h2>${label}<p>${facts.join(", ")}</p>` +
      edgeList("Inputs", incoming.get(id), (link) => link.source) +
      edgeList("Outputs", outgoing.get(id), (link) => link.target) +
      dashboard,
  );
  d3.selectAll("#details li[data-id]").on("click", function () {
    select(this.dataset.id);
  });
  history.replaceState(null, "", `#node=${encodeURIComponent(id)}`);
}

const counts = d3.rollup(nodes, (members) => members.length, kind);
d3.select("#summary").text(
  `${graph.metadata.prompt ?? ""} — ${counts.get("feature") ?? 0} features, ${counts.get("error") ?? 0} error nodes, ` +
    `${counts.get("token") ?? 0} tokens, ${counts.get("logit") ?? 0} targets, ${links.length} edges (pruned at node ` +
    `threshold ${graph.metadata.node_threshold})`,
);
const linked = new URLSearchParams(location.hash.slice(1)).get("node");
if (linked) select(linked);
document.body.dataset.ready = "true";
