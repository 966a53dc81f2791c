// Create an instance: from a form that builds the URL, or from a pasted
// URL.  The URL preview updates as the form changes; the API's own 400
// message is shown when it refuses.

import {field, h, newId, setText} from "./dom.js";
import {PARAMS, buildUrl, parseTags} from "./urls.js";

function radioGroup(legendText, name, choices, checked) {
  const inputs = [];
  const fs = h("fieldset", {class: "radios"}, h("legend", {}, legendText));
  for (const [value, label] of choices) {
    const id = newId(name);
    const input = h("input", {type: "radio", name, id, value, checked: value === checked});
    inputs.push(input);
    fs.append(h("span", {class: "radio"}, input, h("label", {for: id}, label)));
  }
  return {el: fs, inputs, value: () => inputs.find((i) => i.checked)?.value};
}

export function createView(ctx) {
  const {api, navigate, store} = ctx;
  const source = radioGroup("Start from", "source", [["form", "Build the URL"], ["paste", "Paste a URL"]], "form");
  const role = radioGroup("Role", "role", [["client", "Client"], ["server", "Server"]], "client");

  const host = h("input", {type: "text", id: "tunnel-host", placeholder: "0.0.0.0, example.com, [::1]", autocomplete: "off", spellcheck: "false"});
  const port = h("input", {type: "text", id: "tunnel-port", inputmode: "numeric", pattern: "[0-9]*", placeholder: "10101", autocomplete: "off"});
  const targets = h("input", {type: "text", id: "targets", placeholder: "127.0.0.1:8080, 10.0.0.2:8080", autocomplete: "off", spellcheck: "false"});
  const tunnelKey = h("input", {type: "text", id: "tunnel-key", placeholder: "derived from the port", autocomplete: "off", spellcheck: "false"});
  const hostHint = h("small", {class: "hint", id: "tunnel-hint"});

  const controls = new Map(); // name -> {param, wrap, get(), setRole()}
  const mainParams = h("div", {class: "form-grid"});
  const moreParams = h("div", {class: "form-grid"});
  for (const p of PARAMS) {
    const id = `param-${p.name}`;
    let control;
    let wrap;
    let get;
    if (p.kind === "select") {
      control = h("select", {id});
      wrap = field(p.label, control, p.hint);
      get = () => control.value;
    } else if (p.kind === "number" || p.kind === "text") {
      control = h("input", {
        type: "text", id, inputmode: p.kind === "number" ? "numeric" : undefined,
        placeholder: p.placeholder || (p.def ? `${p.def} (default)` : ""), autocomplete: "off", spellcheck: "false",
      });
      wrap = field(p.label, control, p.hint);
      get = () => control.value;
    } else if (p.kind === "bool") {
      control = h("input", {type: "checkbox", id});
      wrap = h("div", {class: "check"}, control, h("label", {for: id}, p.label));
      get = () => control.checked;
    } else {
      const boxes = p.options.map(([value, label]) => {
        const boxId = `${id}-${value}`;
        const box = h("input", {type: "checkbox", id: boxId, value});
        return {box, el: h("span", {class: "check"}, box, h("label", {for: boxId}, label))};
      });
      wrap = h("fieldset", {class: "radios", id}, h("legend", {}, p.label), boxes.map((b) => b.el));
      get = () => boxes.filter((b) => b.box.checked).map((b) => b.box.value);
    }
    const setRole = (r) => {
      if (p.kind === "select") {
        const options = Array.isArray(p.options) ? p.options : p.options[r];
        const keep = control.value;
        control.replaceChildren(...options.map(([value, label]) => h("option", {value}, label)));
        control.value = options.some(([v]) => v === keep) ? keep : p.def;
      }
    };
    controls.set(p.name, {param: p, wrap, get, setRole});
    (p.main ? mainParams : moreParams).append(wrap);
  }

  const paste = h("input", {type: "text", id: "paste-url", class: "mono", placeholder: "client://127.0.0.1:10101/127.0.0.1:8080?mode=1", autocomplete: "off", spellcheck: "false"});
  const alias = h("input", {type: "text", id: "create-alias", maxlength: 256, autocomplete: "off"});
  const tags = h("textarea", {id: "create-tags", rows: 3, spellcheck: "false", placeholder: "env=prod\nowner=ops"});
  const restart = h("input", {type: "checkbox", id: "create-restart", checked: true});
  const preview = h("output", {id: "url-preview", class: "mono wrap", for: "tunnel-host tunnel-port targets"});
  const error = h("p", {class: "error", id: "create-error", role: "alert"});
  const submit = h("button", {type: "submit", class: "btn btn-primary", id: "create-submit"}, "Create and start");

  const built = h(
    "div",
    {id: "build-fields"},
    role.el,
    h("div", {class: "form-grid"},
      h("div", {class: "field"}, h("label", {for: "tunnel-host"}, "Tunnel host"), host, hostHint),
      field("Tunnel port", port),
      field("Targets", targets, "host:port; several, separated by commas, are tried in turn"),
      field("Tunnel key (optional)", tunnelKey, "Both ends must share it"),
    ),
    mainParams,
    h("details", {}, h("summary", {}, "More options"), moreParams),
    h("div", {class: "preview"}, h("span", {class: "label"}, "URL"), preview),
  );
  const pasted = h("div", {id: "paste-fields", hidden: true}, field("Instance URL", paste, "server://… or client://…, as on a command line"));

  function values() {
    const params = {};
    for (const [name, c] of controls) {
      params[name] = c.get();
    }
    return {role: role.value(), host: host.value, port: port.value, tunnelKey: tunnelKey.value, targets: targets.value, params};
  }
  function url() {
    return source.value() === "paste" ? paste.value.trim() : buildUrl(values());
  }
  function refresh() {
    const r = role.value();
    const pasting = source.value() === "paste";
    built.hidden = pasting;
    pasted.hidden = !pasting;
    const params = values().params;
    for (const c of controls.values()) {
      const p = c.param;
      const on = p.roles.includes(r) && !(p.when && Object.entries(p.when).some(([k, v]) => params[k] !== v));
      c.wrap.hidden = !on;
    }
    hostHint.textContent =
      r === "server"
        ? "Where the server listens for clients (empty: all interfaces)."
        : "The server's tunnel address; in single-end mode (mode 1), where this client listens.";
    setText(preview, buildUrl(values()));
  }
  for (const input of role.inputs) {
    input.addEventListener("change", () => {
      for (const c of controls.values()) {
        c.setRole(role.value());
      }
      refresh();
    });
  }
  for (const c of controls.values()) {
    c.setRole(role.value());
  }

  const form = h(
    "form",
    {id: "create-form", novalidate: true},
    source.el,
    built,
    pasted,
    h("div", {class: "form-grid"},
      field("Alias (optional)", alias),
      field("Tags (optional), one key=value a line", tags),
    ),
    h("div", {class: "check"}, restart, h("label", {for: "create-restart"}, "Start this instance again when the master starts")),
    error,
    h("div", {class: "actions"}, submit, h("a", {href: "#/instances", class: "btn"}, "Cancel")),
  );
  for (const input of source.inputs) {
    input.addEventListener("change", () => {
      error.textContent = ""; // it was about the other way of giving the URL
    });
  }
  form.addEventListener("input", refresh);
  form.addEventListener("change", refresh);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    error.textContent = "";
    const body = {url: url(), restart: restart.checked};
    try {
      if (alias.value.trim()) {
        body.alias = alias.value;
      }
      const t = parseTags(tags.value);
      if (Object.keys(t).length) {
        body.meta = {tags: t};
      }
    } catch (e) {
      error.textContent = e.message;
      return;
    }
    if (!body.url) {
      error.textContent = "Give a URL.";
      return;
    }
    submit.disabled = true;
    try {
      const inst = await api.call("POST", "/instances", body);
      if (inst && inst.id && !store.instances.has(inst.id)) {
        store.upsert(inst, store.now(), "create");
      }
      navigate(`#/instance/${encodeURIComponent(inst.id)}`);
    } catch (e) {
      error.textContent = e.status ? `The master refused it (${e.status}): ${e.message}` : e.message;
      error.focus?.();
    } finally {
      submit.disabled = false;
    }
  });
  refresh();

  const el = h(
    "section",
    {class: "view", "aria-labelledby": "create-title"},
    h("div", {class: "view-head"}, h("h2", {id: "create-title", tabindex: "-1"}, "New instance")),
    h("div", {class: "card"}, form),
  );
  return {el};
}
