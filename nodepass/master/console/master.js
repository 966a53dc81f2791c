// The master itself: /info (polled while this panel is open), its alias,
// key rotation and the tcping tool.

import {bytes, confirmDialog, duration, field, h, percent, rate, replace, setText, toast} from "./dom.js";
import {legend, lineChart, spanFor} from "./chart.js";
import {KEY_ID} from "./store.js";

const POLL_MS = 3000;
const SPAN_MS = 5 * 60 * 1000;

/** Samples of /info kept across visits of the panel (CPU is "since the
 * previous /info call", so it needs regular polling to mean anything). */
const samples = [];

export function masterView(ctx) {
  const {api} = ctx;
  const values = {};
  const list = h("dl", {class: "figures", id: "info"});
  const rows = [
    ["ver", "Version"], ["mid", "Master ID"], ["name", "Host"], ["os", "System"], ["cpu", "CPU"], ["mem", "Memory"],
    ["swap", "Swap"], ["net", "Network (in / out)"], ["netrate", "Network rate"], ["disk", "Disk (read / write)"],
    ["sysup", "System uptime"], ["uptime", "Master uptime"], ["tls", "API TLS"], ["log", "Log level"],
  ];
  for (const [name, label] of rows) {
    values[name] = h("dd", {"data-field": name});
    list.append(h("div", {}, h("dt", {}, label), values[name]));
  }
  const memBar = h("meter", {min: 0, max: 1, value: 0, id: "mem-meter", "aria-label": "Memory in use"});
  const cpuBar = h("meter", {min: 0, max: 100, value: 0, id: "cpu-meter", "aria-label": "CPU in use"});
  const chartBox = h("div", {class: "chart-box", id: "info-chart"});
  const series = [
    {label: "CPU %", cls: "s-cpu"},
    {label: "Memory %", cls: "s-mem"},
  ];
  const infoError = h("p", {class: "error", role: "alert"});

  function show(info) {
    const last = samples[samples.length - 1];
    const t = Date.now();
    const sample = {t, info, cpu: info.cpu, mem: info.mem_total ? (100 * info.mem_used) / info.mem_total : 0};
    if (last && t > last.t) {
      sample.rx = Math.max(0, ((info.netrx - last.info.netrx) * 1000) / (t - last.t));
      sample.tx = Math.max(0, ((info.nettx - last.info.nettx) * 1000) / (t - last.t));
    }
    samples.push(sample);
    while (samples.length > 2 && samples[0].t < t - SPAN_MS) {
      samples.shift();
    }
    setText(values.ver, `${info.ver} (nodepass-py ${info.nodepass_py || "?"})`);
    setText(values.mid, info.mid);
    setText(values.name, info.name);
    setText(values.os, `${info.os}/${info.arch}`);
    setText(values.cpu, info.cpu < 0 ? "unknown" : percent(info.cpu));
    cpuBar.value = Math.max(0, info.cpu);
    setText(values.mem, `${bytes(info.mem_used)} of ${bytes(info.mem_total)} (${percent(sample.mem)})`);
    memBar.value = info.mem_total ? info.mem_used / info.mem_total : 0;
    setText(values.swap, info.swap_total ? `${bytes(info.swap_used)} of ${bytes(info.swap_total)}` : "none");
    setText(values.net, `${bytes(info.netrx)} / ${bytes(info.nettx)}`);
    setText(values.netrate, sample.rx === undefined ? "–" : `${rate(sample.rx)} / ${rate(sample.tx)}`);
    setText(values.disk, `${bytes(info.diskr)} / ${bytes(info.diskw)}`);
    setText(values.sysup, duration(info.sysup));
    setText(values.uptime, duration(info.uptime));
    setText(values.tls, info.tls === "0" ? "0 (plain HTTP)" : info.tls);
    setText(values.log, info.log);
    if (!aliasDirty) {
      aliasInput.value = info.alias || "";
    }
    ctx.setMasterName(info.alias || info.name || "");
    replace(
      chartBox,
      lineChart({
        series: [
          {...series[0], points: samples.filter((s) => s.cpu >= 0).map((s) => [s.t, s.cpu])},
          {...series[1], points: samples.map((s) => [s.t, s.mem])},
        ],
        now: t,
        span: spanFor(samples[0]?.t, t, SPAN_MS),
        max: 100,
        format: (v) => `${Math.round(v)}%`,
        title: "CPU and memory use (percent)",
      }),
    );
  }

  let timer = null;
  let alive = true;
  async function poll() {
    try {
      show(await api.call("GET", "/info"));
      infoError.textContent = "";
    } catch (e) {
      infoError.textContent = `Cannot read /info: ${e.message}`;
    }
    if (alive) {
      timer = setTimeout(poll, POLL_MS);
    }
  }

  // -- alias
  let aliasDirty = false;
  const aliasInput = h("input", {type: "text", id: "master-alias", maxlength: 256, autocomplete: "off"});
  aliasInput.addEventListener("input", () => {
    aliasDirty = true;
  });
  const aliasError = h("p", {class: "error", role: "alert"});
  const aliasForm = h(
    "form",
    {class: "inline-form", novalidate: true},
    field("Master alias", aliasInput),
    h("button", {type: "submit", class: "btn"}, "Save"),
    aliasError,
  );
  aliasForm.addEventListener("submit", async (event) => {
    event.preventDefault();
    aliasError.textContent = "";
    try {
      const info = await api.call("POST", "/info", {alias: aliasInput.value});
      aliasDirty = false;
      show(info);
      toast("Master alias saved");
    } catch (e) {
      aliasError.textContent = e.message;
    }
  });

  // -- key rotation
  const rotate = h("button", {type: "button", class: "btn btn-danger", id: "rotate-key"}, "Rotate API key");
  rotate.addEventListener("click", async () => {
    const ok = await confirmDialog(
      "Rotate the API key?",
      "A new key is made and the current one stops working at once, for every client and dashboard. " +
        "This console shows the new key once and then asks for it.",
      "Rotate",
    );
    if (!ok) {
      return;
    }
    rotate.disabled = true;
    ctx.keyRotating(true);
    try {
      const record = await api.call("PATCH", `/instances/${encodeURIComponent(KEY_ID)}`, {action: "restart"});
      ctx.keyRotated(record && typeof record.url === "string" ? record.url : "");
    } catch (e) {
      ctx.keyRotating(false);
      toast(`Key rotation failed: ${e.message}`, "error");
      rotate.disabled = false;
    }
  });

  // -- tcping
  const target = h("input", {type: "text", id: "tcping-target", placeholder: "example.com:443", autocomplete: "off", spellcheck: "false"});
  const result = h("p", {id: "tcping-result", role: "status"});
  const probe = h("button", {type: "submit", class: "btn", id: "tcping-probe"}, "Probe");
  const tcpingForm = h("form", {class: "inline-form", novalidate: true}, field("Target host:port", target), probe, result);
  tcpingForm.addEventListener("submit", async (event) => {
    event.preventDefault();
    probe.disabled = true;
    setText(result, "Probing…");
    result.className = "";
    try {
      const r = await api.call("GET", `/tcping?target=${encodeURIComponent(target.value.trim())}`);
      if (r.connected) {
        setText(result, `${r.target}: connected in ${r.latency} ms`);
        result.className = "ok";
      } else {
        setText(result, `${r.target}: not connected (${r.error || "no reason given"})`);
        result.className = "error";
      }
    } catch (e) {
      setText(result, e.message);
      result.className = "error";
    } finally {
      probe.disabled = false;
    }
  });

  const docs = h("a", {href: `${api.root}/docs`}, "API documentation (Swagger UI)");
  const openapi = h("a", {href: `${api.root}/openapi.json`}, "OpenAPI document");
  const el = h(
    "section",
    {class: "view", "aria-labelledby": "master-title"},
    h("div", {class: "view-head"}, h("h2", {id: "master-title", tabindex: "-1"}, "Master")),
    infoError,
    h("div", {class: "grid-2"},
      h("section", {class: "card"}, h("h3", {}, "System"), h("div", {class: "meters"},
        h("label", {for: "cpu-meter"}, "CPU"), cpuBar, h("label", {for: "mem-meter"}, "Memory"), memBar), list),
      h("section", {class: "card"}, h("h3", {}, "CPU and memory"), chartBox, legend(series, h)),
    ),
    h("div", {class: "grid-2"},
      h("section", {class: "card"}, h("h3", {}, "Alias"), aliasForm),
      h("section", {class: "card"}, h("h3", {}, "TCP reachability (tcping)"), tcpingForm),
    ),
    h(
      "section",
      {class: "card"},
      h("h3", {}, "API key"),
      h("p", {}, "Rotating the key logs out every client using the current one, this console included; " +
        "the master's open event streams get a shutdown event."),
      rotate,
    ),
    h("p", {class: "links"}, docs, " · ", openapi),
  );
  if (samples.length) {
    show(samples[samples.length - 1].info);
    samples.pop(); // shown again, not a new sample
  }
  poll();
  return {
    el,
    destroy() {
      alive = false;
      clearTimeout(timer);
    },
  };
}
