// DOM building and formatting for the console.
//
// Every string the console shows goes through text nodes: `h()` turns
// string children into text nodes and has no way to set innerHTML, because
// aliases, tags and log lines are written by whoever holds the API key or
// by a tunnel's peer.  The page's Content-Security-Policy forbids inline
// script as a second line of defence, but the DOM must not need it.

const SVG_NS = "http://www.w3.org/2000/svg";

// Properties set as properties (not attributes): their live value matters.
const PROPERTIES = new Set(["value", "checked", "disabled", "selected", "hidden", "indeterminate", "open"]);
const FORBIDDEN = new Set(["innerHTML", "outerHTML", "srcdoc"]);

function setProps(el, props) {
  for (const [name, value] of Object.entries(props || {})) {
    if (FORBIDDEN.has(name)) {
      throw new Error("refusing to set " + name);
    }
    if (value === undefined || value === null || value === false) {
      continue;
    }
    if (name === "class") {
      el.setAttribute("class", value);
    } else if (name === "dataset") {
      Object.assign(el.dataset, value);
    } else if (name.startsWith("on") && typeof value === "function") {
      el.addEventListener(name.slice(2), value);
    } else if (PROPERTIES.has(name)) {
      el[name] = value;
    } else {
      el.setAttribute(name, value === true ? "" : String(value));
    }
  }
}

/** Append children: strings and numbers become text nodes. */
export function append(el, ...children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) {
      continue;
    }
    el.appendChild(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

/** `h("button", {class: "x", onclick: f}, "text")`: an element. */
export function h(tag, props, ...children) {
  const el = document.createElement(tag);
  setProps(el, props);
  return append(el, children);
}

/** An SVG element (attributes only). */
export function svg(tag, attrs, ...children) {
  const el = document.createElementNS(SVG_NS, tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value !== undefined && value !== null) {
      el.setAttribute(name, String(value));
    }
  }
  return append(el, children);
}

/** Replace every child of `el`. */
export function replace(el, ...children) {
  el.replaceChildren();
  return append(el, children);
}

/** Set text only when it changed (keeps selection and avoids layout work). */
export function setText(el, text) {
  const value = String(text);
  if (el.textContent !== value) {
    el.textContent = value;
  }
}

let uid = 0;
/** A fresh element id, for label/input pairs. */
export function newId(stem) {
  uid += 1;
  return `${stem}-${uid}`;
}

/** A label and its control, wrapped in a `.field`. */
export function field(labelText, control, hint) {
  if (!control.id) {
    control.id = newId("f");
  }
  const parts = [h("label", {for: control.id}, labelText), control];
  if (hint) {
    const hintId = control.id + "-hint";
    control.setAttribute("aria-describedby", hintId);
    parts.push(h("small", {id: hintId, class: "hint"}, hint));
  }
  return h("div", {class: "field"}, parts);
}

// ---------------------------------------------------------------- formatting

const UNITS = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];

export function bytes(n) {
  if (typeof n !== "number" || !Number.isFinite(n) || n < 0) {
    return "–";
  }
  let i = 0;
  while (n >= 1024 && i < UNITS.length - 1) {
    n /= 1024;
    i += 1;
  }
  if (i === 0) {
    return `${Math.round(n)} B`;
  }
  return `${n.toFixed(n >= 100 ? 0 : 1)} ${UNITS[i]}`;
}

export function rate(n) {
  return bytes(n) + "/s";
}

export function duration(seconds) {
  if (typeof seconds !== "number" || !Number.isFinite(seconds) || seconds < 0) {
    return "–";
  }
  seconds = Math.floor(seconds);
  const d = Math.floor(seconds / 86400);
  const hrs = Math.floor((seconds % 86400) / 3600);
  const m = Math.floor((seconds % 3600) / 60);
  const s = seconds % 60;
  if (d) {
    return `${d}d ${hrs}h ${m}m`;
  }
  if (hrs) {
    return `${hrs}h ${m}m`;
  }
  if (m) {
    return `${m}m ${s}s`;
  }
  return `${s}s`;
}

export function percent(n) {
  return typeof n === "number" && Number.isFinite(n) && n >= 0 ? `${n.toFixed(n < 10 ? 1 : 0)}%` : "–";
}

// ---------------------------------------------------------------- feedback

let toastBox = null;

/** A short message in the page's live region (read out by screen readers). */
export function toast(message, kind = "info") {
  if (!toastBox) {
    toastBox = document.getElementById("toasts");
  }
  const item = h("div", {class: `toast toast-${kind}`, role: kind === "error" ? "alert" : "status"}, message);
  toastBox.appendChild(item);
  setTimeout(() => item.remove(), kind === "error" ? 8000 : 4000);
  while (toastBox.children.length > 4) {
    toastBox.firstChild.remove();
  }
}

/**
 * Ask before something that cannot be undone: a modal <dialog> (Esc or
 * Cancel answer no; Cancel has the focus, so Enter does not confirm by
 * accident).  Resolves to true or false.
 */
export function confirmDialog(title, message, confirmLabel = "Confirm") {
  return new Promise((resolve) => {
    const cancel = h("button", {type: "button", class: "btn", "data-role": "cancel"}, "Cancel");
    const ok = h("button", {type: "button", class: "btn btn-danger", "data-role": "confirm"}, confirmLabel);
    const titleId = newId("dlg");
    const dialog = h(
      "dialog",
      {class: "dialog", "aria-labelledby": titleId},
      h("h2", {id: titleId}, title),
      h("p", {}, message),
      h("div", {class: "actions"}, cancel, ok),
    );
    let answered = false;
    const finish = (answer) => {
      if (answered) {
        return;
      }
      answered = true;
      dialog.close();
      dialog.remove();
      resolve(answer);
    };
    cancel.addEventListener("click", () => finish(false));
    ok.addEventListener("click", () => finish(true));
    dialog.addEventListener("cancel", (event) => {
      event.preventDefault();
      finish(false);
    });
    document.body.appendChild(dialog);
    dialog.showModal();
    cancel.focus();
  });
}

/** Copy `text`; falls back to a selection where the Clipboard API is not
 * available (it needs a secure context: https or localhost). */
export async function copyText(text) {
  try {
    if (navigator.clipboard && window.isSecureContext) {
      await navigator.clipboard.writeText(text);
      return true;
    }
  } catch (e) {
    // fall through to the selection copy
  }
  const area = h("textarea", {class: "offscreen", readonly: true});
  area.value = text;
  document.body.appendChild(area);
  area.select();
  let done = false;
  try {
    done = document.execCommand("copy");
  } catch (e) {
    done = false;
  }
  area.remove();
  return done;
}

/** A "Copy" button for the text `get()` returns at click time. */
export function copyButton(get, label = "Copy") {
  const button = h("button", {type: "button", class: "btn btn-small"}, label);
  button.addEventListener("click", async () => {
    const ok = await copyText(get());
    button.textContent = ok ? "Copied" : "Copy failed";
    setTimeout(() => {
      button.textContent = label;
    }, 1500);
  });
  return button;
}
