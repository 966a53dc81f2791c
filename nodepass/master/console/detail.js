// One instance: figures, a traffic chart, settings, actions, the config URL
// and its log lines.

import {bytes, confirmDialog, copyButton, field, h, rate, replace, setText, toast} from "./dom.js";
import {legend, lineChart, spanFor} from "./chart.js";
import {statusBadge, tagChips} from "./instances.js";
import {HISTORY_MS, LOG_LIMIT} from "./store.js";
import {modeText, parseTags, tagsText} from "./urls.js";

const LEVEL = /^\S+ \S+\s+(DEBUG|INFO|WARN|ERROR|EVENT)\s/;

export function detailView(ctx, id) {
  const {api, store, navigate} = ctx;
  const path = `/instances/${encodeURIComponent(id)}`;
  const title = h("h2", {id: "detail-title", tabindex: "-1"});
  const subtitle = h("p", {class: "muted mono"});
  const status = h("span", {id: "detail-status"});
  const gone = h("p", {class: "notice", hidden: true, role: "status"}, "This instance no longer exists.");

  // -- figures
  const figures = {};
  const figureList = h("dl", {class: "figures", id: "figures"});
  for (const [name, label] of [
    ["type", "Type"], ["mode", "Mode"], ["pool", "Pool"], ["ping", "Ping"], ["tcps", "TCP connections"],
    ["udps", "UDP sessions"], ["tcprx", "TCP received"], ["tcptx", "TCP sent"], ["udprx", "UDP received"],
    ["udptx", "UDP sent"], ["rxrate", "Rate in"], ["txrate", "Rate out"],
  ]) {
    figures[name] = h("dd", {"data-field": name});
    figureList.append(h("div", {}, h("dt", {}, label), figures[name]));
  }

  // -- actions
  // Buttons whose own action is under way stay disabled whatever sync() says.
  const inFlight = new Set();
  async function act(action, button) {
    button.disabled = true;
    inFlight.add(button);
    try {
      store.known(await api.call("PATCH", path, {action}));
      toast(`${action}: done`);
    } catch (e) {
      toast(`${action} failed: ${e.message}`, "error");
    } finally {
      inFlight.delete(button);
      button.disabled = false;
      sync();
    }
  }
  const actionButtons = ["start", "stop", "restart"].map((action) => {
    const b = h("button", {type: "button", class: "btn", "data-action": action}, action[0].toUpperCase() + action.slice(1));
    b.addEventListener("click", () => act(action, b));
    return b;
  });
  const resetButton = h("button", {type: "button", class: "btn", "data-action": "reset"}, "Reset counters");
  resetButton.addEventListener("click", async () => {
    if (await confirmDialog("Reset counters?", "The four traffic counters go back to zero.", "Reset")) {
      act("reset", resetButton);
    }
  });
  const deleteButton = h("button", {type: "button", class: "btn btn-danger", "data-action": "delete"}, "Delete");
  deleteButton.addEventListener("click", async () => {
    const inst = store.instances.get(id);
    const name = inst && inst.alias ? `"${inst.alias}" (${id})` : id;
    if (!(await confirmDialog("Delete this instance?", `Instance ${name} is stopped and removed. This cannot be undone.`, "Delete"))) {
      return;
    }
    deleteButton.disabled = true;
    inFlight.add(deleteButton);
    try {
      await api.call("DELETE", path);
      toast(`Instance ${id} deleted`);
      navigate("#/instances");
    } catch (e) {
      toast(`Delete failed: ${e.message}`, "error");
      inFlight.delete(deleteButton);
      deleteButton.disabled = false;
    }
  });

  // -- settings
  // Inputs follow the record until the user edits them, and again once
  // the edit is saved.
  const dirty = new Set();
  function settingsForm(legendText, inputs, control, save) {
    const error = h("p", {class: "error", role: "alert"});
    const button = h("button", {type: "submit", class: "btn"}, "Save");
    const form = h("form", {class: "inline-form", novalidate: true, "aria-label": legendText}, control, button, error);
    for (const input of inputs) {
      input.addEventListener("input", () => dirty.add(input));
      input.addEventListener("change", () => dirty.add(input));
    }
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      error.textContent = "";
      button.disabled = true;
      try {
        const answer = await save();
        if (answer !== false) {
          store.known(answer);
          inputs.forEach((input) => dirty.delete(input));
          toast(`${legendText}: saved`);
          sync();
        }
      } catch (e) {
        error.textContent = e.message;
      } finally {
        button.disabled = false;
      }
    });
    return form;
  }
  const aliasInput = h("input", {type: "text", id: "alias-input", maxlength: 256, autocomplete: "off"});
  const aliasForm = settingsForm("Alias", [aliasInput], field("Alias", aliasInput), async () => {
    return api.call("PATCH", path, {alias: aliasInput.value});
  });
  aliasForm.id = "alias-form";
  const tagsInput = h("textarea", {id: "tags-input", rows: 3, spellcheck: "false", placeholder: "env=prod\nowner=ops"});
  const tagsForm = settingsForm(
    "Tags",
    [tagsInput],
    field("Tags, one key=value a line", tagsInput, "Saving replaces every tag; saving an empty box removes them all."),
    async () => {
      const tags = parseTags(tagsInput.value);
      // An empty map means "no change" to the API (as to Go's master);
      // null removes every tag.
      const empty = Object.keys(tags).length === 0;
      return api.call("PATCH", path, {meta: {tags: empty ? null : tags}});
    },
  );
  const restartInput = h("input", {type: "checkbox", id: "restart-input"});
  const restartForm = settingsForm(
    "Restart policy",
    [restartInput],
    h("div", {class: "check"}, restartInput, h("label", {for: "restart-input"}, "Start this instance when the master starts")),
    async () => {
      return api.call("PATCH", path, {restart: restartInput.checked});
    },
  );
  const urlInput = h("input", {type: "text", id: "url-input", class: "mono", spellcheck: "false", autocomplete: "off"});
  const urlForm = settingsForm(
    "URL",
    [urlInput],
    field("Instance URL", urlInput, "Saving restarts the instance with the new URL (same ID, alias, tags and counters)."),
    async () => {
      if (!(await confirmDialog("Replace the URL?", "The instance restarts with the new URL.", "Replace"))) {
        return false;
      }
      return api.call("PUT", path, {url: urlInput.value.trim()});
    },
  );

  // -- config
  const configCode = h("code", {id: "config-url", class: "mono wrap"});
  const urlCode = h("code", {class: "mono wrap"});

  // -- chart
  const chartBox = h("div", {class: "chart-box", id: "traffic-chart"});
  const series = [
    {label: "Received (in)", cls: "s-rx"},
    {label: "Sent (out)", cls: "s-tx"},
  ];

  // -- logs
  const logBox = h("div", {class: "logs", id: "logs", role: "log", "aria-live": "off", tabindex: "0", "aria-label": "Log lines"});
  const logFilter = h("input", {type: "search", id: "log-filter", placeholder: "text to look for", autocomplete: "off"});
  const pause = h("button", {type: "button", class: "btn", id: "log-pause", "aria-pressed": "false"}, "Pause");
  const clear = h("button", {type: "button", class: "btn", id: "log-clear"}, "Clear");
  const logCount = h("span", {class: "muted", id: "log-count"});
  let paused = false;
  let pending = 0;

  function logLine(line) {
    const m = LEVEL.exec(line);
    return h("div", {class: `line level-${m ? m[1].toLowerCase() : "none"}`}, line);
  }
  function visible(line) {
    const text = logFilter.value.trim().toLowerCase();
    return !text || line.toLowerCase().includes(text);
  }
  function redrawLogs() {
    const lines = store.logs.get(id) || [];
    const shown = lines.filter(visible);
    replace(logBox, shown.map(logLine));
    pending = 0;
    countLogs(shown.length, lines.length);
    logBox.scrollTop = logBox.scrollHeight;
  }
  function countLogs(shown, total) {
    const extra = paused && pending ? `, ${pending} new while paused` : "";
    setText(logCount, `${shown} of ${total} lines (last ${LOG_LIMIT} kept)${extra}`);
  }
  function addLog(line) {
    if (paused) {
      pending += 1;
      const total = (store.logs.get(id) || []).length;
      countLogs(logBox.childElementCount, total);
      return;
    }
    const atBottom = logBox.scrollHeight - logBox.scrollTop - logBox.clientHeight < 40;
    if (visible(line)) {
      logBox.appendChild(logLine(line));
      while (logBox.childElementCount > LOG_LIMIT) {
        logBox.firstChild.remove();
      }
    }
    countLogs(logBox.childElementCount, (store.logs.get(id) || []).length);
    if (atBottom) {
      logBox.scrollTop = logBox.scrollHeight;
    }
  }
  logFilter.addEventListener("input", redrawLogs);
  pause.addEventListener("click", () => {
    paused = !paused;
    pause.setAttribute("aria-pressed", String(paused));
    pause.textContent = paused ? "Resume" : "Pause";
    if (!paused) {
      redrawLogs();
    }
  });
  clear.addEventListener("click", () => {
    store.logs.set(id, []);
    redrawLogs();
  });

  function drawChart() {
    const list = store.history.get(id) || [];
    const now = store.now();
    const data = [
      {...series[0], points: list.map((s) => [s.t, s.rxRate])},
      {...series[1], points: list.map((s) => [s.t, s.txRate])},
    ];
    const span = spanFor(list[0]?.t, now, HISTORY_MS);
    replace(chartBox, lineChart({series: data, now, span, format: rate, binary: true, title: "Traffic rate (bytes per second)"}));
  }

  function sync() {
    const inst = store.instances.get(id);
    if (!inst) {
      gone.hidden = false;
      for (const b of [...actionButtons, resetButton, deleteButton]) {
        b.disabled = true;
      }
      return;
    }
    gone.hidden = true;
    setText(title, inst.alias || "(no alias)");
    setText(subtitle, `${inst.type} instance ${inst.id}`);
    if (status.dataset.status !== inst.status) {
      replace(status, statusBadge(inst.status));
      status.dataset.status = inst.status;
    }
    setText(figures.type, inst.type);
    setText(figures.mode, modeText(inst));
    setText(figures.pool, inst.pool);
    setText(figures.ping, `${inst.ping} ms`);
    setText(figures.tcps, inst.tcps);
    setText(figures.udps, inst.udps);
    for (const k of ["tcprx", "tcptx", "udprx", "udptx"]) {
      setText(figures[k], bytes(inst[k]));
      figures[k].dataset.bytes = String(inst[k]);
    }
    const r = store.rates(id);
    setText(figures.rxrate, rate(r.rx));
    setText(figures.txrate, rate(r.tx));
    setText(configCode, inst.config);
    setText(urlCode, inst.url);
    if (!dirty.has(aliasInput)) {
      aliasInput.value = inst.alias || "";
    }
    if (!dirty.has(tagsInput)) {
      tagsInput.value = tagsText(inst.meta?.tags);
    }
    if (!dirty.has(urlInput)) {
      urlInput.value = inst.url;
    }
    if (!dirty.has(restartInput)) {
      restartInput.checked = !!inst.restart;
    }
    replace(tagsShown, tagChips(inst.meta?.tags));
    // Known now (also after a reload straight onto this page): every action
    // is possible again, except one still under way.
    actionButtons[0].disabled = inFlight.has(actionButtons[0]) || inst.status === "running";
    actionButtons[1].disabled = inFlight.has(actionButtons[1]) || inst.status === "stopped";
    for (const b of [actionButtons[2], resetButton, deleteButton]) {
      b.disabled = inFlight.has(b);
    }
    drawChart();
  }
  const tagsShown = h("div", {class: "chips"});

  const el = h(
    "section",
    {class: "view detail", "aria-labelledby": "detail-title"},
    h("p", {}, h("a", {href: "#/instances"}, "← All instances")),
    h("div", {class: "view-head"}, h("div", {}, title, subtitle, tagsShown), status),
    gone,
    h("div", {class: "actions", role: "group", "aria-label": "Instance actions"}, actionButtons, resetButton, deleteButton),
    h("div", {class: "grid-2"},
      h("section", {class: "card"}, h("h3", {}, "Figures"), figureList),
      h("section", {class: "card"}, h("h3", {}, "Traffic"), chartBox, legend(series, h)),
    ),
    h(
      "section",
      {class: "card"},
      h("h3", {}, "Configuration"),
      h("p", {class: "label"}, "Effective configuration (every default written out)"),
      h("div", {class: "copy-row"}, configCode, copyButton(() => configCode.textContent, "Copy")),
      h("p", {class: "label"}, "URL as given"),
      h("div", {class: "copy-row"}, urlCode, copyButton(() => urlCode.textContent, "Copy")),
    ),
    h("section", {class: "card settings"}, h("h3", {}, "Settings"), aliasForm, restartForm, tagsForm, urlForm),
    h(
      "section",
      {class: "card"},
      h("h3", {}, "Logs"),
      h("div", {class: "toolbar"}, h("label", {for: "log-filter"}, "Filter"), logFilter, pause, clear, logCount),
      logBox,
      h("p", {class: "hint"}, "Lines arrive while this console is connected, at the instance's own log= level."),
    ),
  );
  sync();
  redrawLogs();
  const timer = setInterval(drawChart, 5000); // the time axis moves on
  return {
    el,
    update(kind, changed, extra) {
      if (changed !== id) {
        return;
      }
      if (kind === "log") {
        addLog(extra);
      }
      sync();
    },
    destroy() {
      clearInterval(timer);
    },
  };
}
