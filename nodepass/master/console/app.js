// The console's entry point: sign-in, the event stream, and the views
// behind the hash routes (#/instances, #/instance/ID, #/create, #/master).
//
// The page is served at {prefix}/, so the API is at {prefix}/v1 -- "v1"
// relative to the page.  The key is kept in sessionStorage (this tab only,
// gone when it closes) and sent as X-API-Key; it is never put in a URL.

import {Api, EventStream} from "./api.js";
import {copyButton, h, replace, setText, toast} from "./dom.js";
import {Store} from "./store.js";
import {instancesView} from "./instances.js";
import {detailView} from "./detail.js";
import {createView} from "./create.js";
import {masterView} from "./master.js";

const KEY_ITEM = "nodepass-console-key";
const API_ROOT = new URL("v1", document.baseURI).pathname.replace(/\/+$/, "");

class App {
  constructor() {
    this.api = new Api(API_ROOT);
    this.store = new Store();
    this.main = document.getElementById("main");
    this.nav = document.getElementById("nav");
    this.session = document.getElementById("session");
    this.liveText = document.getElementById("live-text");
    this.live = document.getElementById("live");
    this.retry = document.getElementById("retry-now");
    this.masterName = document.getElementById("master-name");
    this.view = null;
    this.signedIn = false;
    this.rotating = false;
    this.host = ""; // the master's host name, shown when it has no alias
    this.settleTimer = null;

    this.api.onUnauthorized = () => this.expired();
    this.stream = new EventStream(this.api, {
      open: () => {
        this.store.connected();
        clearTimeout(this.settleTimer);
        this.settleTimer = setTimeout(() => this.store.settle(), 1500);
      },
      event: (data) => this.store.apply(data),
      state: (name, detail) => this.showState(name, detail),
      unauthorized: () => this.expired(),
    });
    this.store.subscribe((kind, id, extra) => {
      if (kind === "shutdown") {
        if (!this.rotating) {
          toast("The master closed the event stream (it is stopping, or its API key changed). Reconnecting…");
        }
        return;
      }
      if (kind === "identity" && this.store.identity) {
        this.setMasterName(this.store.identity.alias || this.host);
      }
      if (this.view && this.view.update) {
        this.view.update(kind, id, extra);
      }
    });
    window.addEventListener("hashchange", () => this.route(true));
    document.getElementById("sign-out").addEventListener("click", () => this.signOut());
    this.retry.addEventListener("click", () => this.stream.retryNow());
  }

  async boot() {
    const saved = sessionStorage.getItem(KEY_ITEM);
    if (!saved) {
      this.showSignIn();
      return;
    }
    try {
      await this.api.call("GET", "/info", undefined, {key: saved, quiet: true});
      this.enter(saved);
    } catch (e) {
      if (e.status !== 401) {
        // Unreachable for now: keep the key, the stream retries with backoff.
        this.enter(saved);
        toast(e.message, "error");
        return;
      }
      sessionStorage.removeItem(KEY_ITEM);
      this.showSignIn({error: "The saved key is no longer accepted (it may have been rotated). Enter the current key."});
    }
  }

  // -- session -------------------------------------------------------------

  showSignIn({notice, error, newKey} = {}) {
    this.setView(null);
    this.nav.hidden = true;
    this.session.hidden = true;
    setText(this.masterName, "");
    const input = h("input", {type: "password", id: "api-key", autocomplete: "off", spellcheck: "false", required: true, "aria-describedby": "api-key-hint"});
    const reveal = h("button", {type: "button", class: "btn btn-small", "aria-pressed": "false", "aria-controls": "api-key"}, "Show");
    reveal.addEventListener("click", () => {
      const shown = input.type === "password";
      input.type = shown ? "text" : "password";
      reveal.setAttribute("aria-pressed", String(shown));
      reveal.textContent = shown ? "Hide" : "Show";
    });
    const message = h("p", {class: "error", id: "signin-error", role: "alert"}, error || "");
    const submit = h("button", {type: "submit", class: "btn btn-primary", id: "sign-in"}, "Sign in");
    const form = h(
      "form",
      {id: "signin-form", novalidate: true},
      h("label", {for: "api-key"}, "API key"),
      h("div", {class: "key-row"}, input, reveal),
      h(
        "small",
        {class: "hint", id: "api-key-hint"},
        "The master logs it at start (“API Key created: …”) and keeps it in its state file. " +
          "It stays in this browser tab only and is sent as the X-API-Key header.",
      ),
      message,
      submit,
    );
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      const key = input.value.trim();
      if (!key) {
        message.textContent = "Enter the API key.";
        input.focus();
        return;
      }
      submit.disabled = true;
      message.textContent = "";
      try {
        await this.api.call("GET", "/info", undefined, {key, quiet: true});
        this.enter(key);
      } catch (e) {
        message.textContent =
          e.status === 401 ? `Wrong API key: the master answered 401 (${e.message}).` : `Cannot sign in: ${e.message}`;
        input.select();
        input.focus();
      } finally {
        submit.disabled = false;
      }
    });
    const notices = [];
    if (notice) {
      notices.push(h("p", {class: "notice", role: "status"}, notice));
    }
    if (newKey) {
      const code = h("code", {id: "new-key", class: "mono"}, newKey);
      notices.push(
        h(
          "div",
          {class: "notice", id: "rotated", role: "status"},
          h("p", {}, "The API key was rotated. The new key is shown only this once: keep it, then sign in with it."),
          h("div", {class: "copy-row"}, code, copyButton(() => newKey, "Copy key")),
        ),
      );
    }
    replace(
      this.main,
      h(
        "section",
        {class: "signin card", "aria-labelledby": "signin-title"},
        h("h2", {id: "signin-title"}, "Sign in to the master"),
        notices,
        form,
        h("p", {class: "links"}, h("a", {href: `${API_ROOT}/docs`}, "API documentation")),
      ),
    );
    input.focus();
  }

  enter(key) {
    this.api.key = key;
    sessionStorage.setItem(KEY_ITEM, key);
    this.signedIn = true;
    this.store.clear();
    this.nav.hidden = false;
    this.session.hidden = false;
    this.stream.start();
    this.api
      .call("GET", "/info")
      .then((info) => {
        this.host = info.name || "";
        this.setMasterName(info.alias || this.host);
      })
      .catch(() => {});
    this.route(false);
  }

  /** Leave: the key is forgotten, the stream closed. */
  signOut(options) {
    this.signedIn = false;
    this.stream.stop();
    clearTimeout(this.settleTimer);
    this.api.key = "";
    sessionStorage.removeItem(KEY_ITEM);
    this.store.clear();
    this.showState("off");
    this.showSignIn(options);
  }

  /** Any 401 while signed in: the key changed under us. */
  expired() {
    if (!this.signedIn) {
      return;
    }
    this.signOut({error: "The master no longer accepts this key (it may have been rotated). Enter the current key."});
  }

  /** We rotated the key: show the new one once and ask for it. */
  keyRotated(newKey) {
    this.signOut({newKey});
    this.rotating = false;
  }

  setMasterName(name) {
    setText(this.masterName, name);
  }

  showState(name, detail) {
    this.live.dataset.state = name;
    this.retry.hidden = name !== "waiting";
    if (name === "live") {
      setText(this.liveText, "Live");
    } else if (name === "connecting") {
      setText(this.liveText, "Connecting…");
    } else if (name === "waiting") {
      setText(this.liveText, `Reconnecting in ${Math.ceil(detail.delay / 1000)} s`);
      this.live.title = detail.reason;
    } else {
      setText(this.liveText, "Offline");
    }
  }

  // -- views ---------------------------------------------------------------

  setView(view) {
    if (this.view && this.view.destroy) {
      this.view.destroy();
    }
    this.view = view;
  }

  navigate(hash) {
    if (location.hash === hash) {
      this.route(true);
    } else {
      location.hash = hash;
    }
  }

  route(focus) {
    if (!this.signedIn) {
      return;
    }
    const hash = location.hash || "#/instances";
    if (!hash.startsWith("#/")) {
      return; // an in-page anchor such as the skip link
    }
    const ctx = {
      api: this.api,
      store: this.store,
      navigate: (to) => this.navigate(to),
      setMasterName: (name) => this.setMasterName(name),
      keyRotating: (on) => {
        this.rotating = on; // our own rotation: its shutdown event is expected
      },
      keyRotated: (key) => this.keyRotated(key),
    };
    let view;
    let current = "instances";
    const detail = /^#\/instance\/([^/]+)$/.exec(hash);
    if (detail) {
      view = detailView(ctx, decodeURIComponent(detail[1]));
    } else if (hash === "#/create") {
      view = createView(ctx);
      current = "create";
    } else if (hash === "#/master") {
      view = masterView(ctx);
      current = "master";
    } else {
      view = instancesView(ctx);
    }
    this.setView(view);
    replace(this.main, view.el);
    for (const link of this.nav.querySelectorAll("a")) {
      if (link.dataset.view === current) {
        link.setAttribute("aria-current", "page");
      } else {
        link.removeAttribute("aria-current");
      }
    }
    if (focus) {
      const heading = view.el.querySelector("h2");
      if (heading) {
        heading.focus({preventScroll: false});
      }
    }
  }
}

new App().boot();
