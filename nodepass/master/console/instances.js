// The instances table, kept live by the event stream.  Rows are built once
// and then only their cells' text changes, so a keyboard user's focus on a
// row's button survives the updates.

import {bytes, h, rate, replace, setText, toast} from "./dom.js";
import {modeText} from "./urls.js";

const COLUMNS = [
  ["id", "ID"],
  ["alias", "Alias"],
  ["type", "Type"],
  ["status", "Status"],
  ["mode", "Mode"],
  ["pool", "Pool"],
  ["ping", "Ping"],
  ["conns", "TCP / UDP"],
  ["rx", "Received"],
  ["tx", "Sent"],
  ["rates", "Rate in / out"],
  ["tags", "Tags"],
  ["actions", "Actions"],
];

export function statusBadge(status) {
  return h("span", {class: `badge status-${/^[a-z]+$/.test(status) ? status : "unknown"}`}, status || "unknown");
}

export function tagChips(tags) {
  const entries = Object.entries(tags || {});
  return entries.map(([k, v]) => h("span", {class: "chip"}, v === "" ? k : `${k}=${v}`));
}

function matches(inst, text) {
  if (!text) {
    return true;
  }
  const hay = [inst.id, inst.alias, inst.type, inst.status, inst.url, ...Object.entries(inst.meta?.tags || {}).flat()]
    .join("\n")
    .toLowerCase();
  return hay.includes(text);
}

export function instancesView(ctx) {
  const {store, api} = ctx;
  const rows = new Map(); // id -> {tr, cells, toggle}
  const filter = h("input", {type: "search", id: "instance-filter", placeholder: "id, alias, tag, status…", autocomplete: "off"});
  const count = h("span", {class: "muted", "aria-live": "polite"});
  const tbody = h("tbody", {});
  const empty = h(
    "p",
    {class: "empty", hidden: true},
    "No instances yet. ",
    h("a", {href: "#/create"}, "Create one"),
    ".",
  );
  const table = h(
    "table",
    {class: "instances", id: "instances"},
    h("caption", {class: "sr-only"}, "Instances (live)"),
    h("thead", {}, h("tr", {}, COLUMNS.map(([, label]) => h("th", {scope: "col"}, label)))),
    tbody,
  );

  async function act(inst, action, button) {
    button.disabled = true;
    try {
      store.known(await api.call("PATCH", `/instances/${encodeURIComponent(inst.id)}`, {action}));
      toast(`${inst.alias || inst.id}: ${action} done`);
    } catch (e) {
      toast(`${inst.alias || inst.id}: ${action} failed: ${e.message}`, "error");
    } finally {
      button.disabled = false;
    }
  }

  function makeRow(id) {
    const cells = {};
    const tr = h("tr", {"data-id": id});
    for (const [name, label] of COLUMNS) {
      const td = h("td", {"data-label": label, class: `col-${name}`});
      cells[name] = td;
      tr.appendChild(td);
    }
    const link = h("a", {href: `#/instance/${encodeURIComponent(id)}`, class: "mono"}, id);
    cells.id.appendChild(link);
    const toggle = h("button", {type: "button", class: "btn btn-small", "data-action": "toggle"});
    toggle.addEventListener("click", () => {
      const inst = store.instances.get(id);
      if (inst) {
        act(inst, inst.status === "stopped" ? "start" : "stop", toggle);
      }
    });
    const open = h("a", {class: "btn btn-small", href: `#/instance/${encodeURIComponent(id)}`}, "Details");
    cells.actions.append(toggle, " ", open);
    const row = {tr, cells, toggle, tagsKey: null, status: null};
    rows.set(id, row);
    return row;
  }

  function fill(row, inst) {
    const {cells} = row;
    setText(cells.alias, inst.alias || "");
    setText(cells.type, inst.type);
    if (row.status !== inst.status) {
      replace(cells.status, statusBadge(inst.status));
      row.status = inst.status;
    }
    setText(cells.mode, modeText(inst));
    setText(cells.pool, inst.pool);
    setText(cells.ping, `${inst.ping} ms`);
    setText(cells.conns, `${inst.tcps} / ${inst.udps}`);
    setText(cells.rx, bytes(inst.tcprx + inst.udprx));
    setText(cells.tx, bytes(inst.tcptx + inst.udptx));
    cells.rx.title = `TCP ${bytes(inst.tcprx)}, UDP ${bytes(inst.udprx)}`;
    cells.tx.title = `TCP ${bytes(inst.tcptx)}, UDP ${bytes(inst.udptx)}`;
    const r = store.rates(inst.id);
    setText(cells.rates, `${rate(r.rx)} / ${rate(r.tx)}`);
    const tagsKey = JSON.stringify(inst.meta?.tags || {});
    if (row.tagsKey !== tagsKey) {
      replace(cells.tags, tagChips(inst.meta?.tags));
      row.tagsKey = tagsKey;
    }
    setText(row.toggle, inst.status === "stopped" ? "Start" : "Stop");
    row.toggle.setAttribute("aria-label", `${inst.status === "stopped" ? "Start" : "Stop"} ${inst.alias || inst.id}`);
  }

  function sync() {
    const text = filter.value.trim().toLowerCase();
    let shown = 0;
    const order = [];
    for (const [id, inst] of store.instances) {
      const row = rows.get(id) || makeRow(id);
      fill(row, inst);
      row.tr.hidden = !matches(inst, text);
      shown += row.tr.hidden ? 0 : 1;
      order.push(row.tr);
    }
    for (const [id, row] of rows) {
      if (!store.instances.has(id)) {
        row.tr.remove();
        rows.delete(id);
      }
    }
    // Append in store order; appendChild moves a row only if misplaced.
    order.forEach((tr, i) => {
      if (tbody.children[i] !== tr) {
        tbody.insertBefore(tr, tbody.children[i] || null);
      }
    });
    empty.hidden = store.instances.size !== 0;
    wrap.hidden = store.instances.size === 0;
    setText(count, `${shown} of ${store.instances.size} shown`);
  }

  const wrap = h("div", {class: "table-wrap"}, table);
  filter.addEventListener("input", sync);
  const el = h(
    "section",
    {class: "view", "aria-labelledby": "instances-title"},
    h(
      "div",
      {class: "view-head"},
      h("h2", {id: "instances-title", tabindex: "-1"}, "Instances"),
      h("a", {href: "#/create", class: "btn btn-primary"}, "New instance"),
    ),
    h("div", {class: "toolbar"}, h("label", {for: "instance-filter"}, "Filter"), filter, count),
    empty,
    wrap,
  );
  sync();
  const timer = setInterval(sync, 2000); // rates of silent instances decay
  return {
    el,
    update(kind) {
      if (kind !== "log") {
        sync();
      }
    },
    destroy() {
      clearInterval(timer);
    },
  };
}
