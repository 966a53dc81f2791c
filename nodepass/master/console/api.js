// The master's REST API and its event stream, as the console uses them.
//
// Every call sends the key as X-API-Key; it never goes in a URL (URLs end
// up in logs, history and Referer headers).  The event stream is read with
// fetch() because EventSource cannot send a header.

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

export class Api {
  /** `root` is the API's path, `{prefix}/v1`. */
  constructor(root) {
    this.root = root;
    this.key = "";
    // Called on any 401 (the key was rotated, or the master's state reset).
    this.onUnauthorized = null;
  }

  headers(extra) {
    return Object.assign({"X-API-Key": this.key, Accept: "application/json"}, extra || {});
  }

  /** `await api.call("PATCH", "/instances/ID", {alias: "x"})`: the decoded
   * JSON answer (null for 204); an ApiError with the API's own `error`
   * text otherwise. */
  async call(method, path, body, {key, quiet} = {}) {
    const init = {method, headers: this.headers(), cache: "no-store", credentials: "omit"};
    if (key !== undefined) {
      init.headers["X-API-Key"] = key;
    }
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    let response;
    try {
      response = await fetch(this.root + path, init);
    } catch (e) {
      throw new ApiError(0, `Cannot reach the master (${e.message})`);
    }
    const text = await response.text();
    let data = null;
    if (text) {
      try {
        data = JSON.parse(text);
      } catch (e) {
        data = null;
      }
    }
    if (!response.ok) {
      const message = data && typeof data.error === "string" ? data.error : `HTTP ${response.status}`;
      const error = new ApiError(response.status, message);
      if (response.status === 401 && !quiet && this.onUnauthorized) {
        this.onUnauthorized(error);
      }
      throw error;
    }
    return data;
  }
}

/** Reconnection delays: 1 s, doubling to 30 s, with ±20 % jitter so a
 * restarted master is not hit by every console at the same instant.  The
 * count starts over once a connection has lasted 10 s, so a master that
 * accepts and at once drops the stream is not retried every second. */
export function backoff(attempt) {
  const base = Math.min(30000, 1000 * 2 ** Math.min(attempt, 5));
  return Math.round(base * (0.8 + Math.random() * 0.4));
}

/**
 * `{prefix}/v1/events`, read with fetch streaming, reconnecting with
 * backoff.  `handlers`:
 *   open()                   -- connected; `initial` events follow
 *   event(data)              -- one decoded event {type, time, instance, logs}
 *   state(name, detail)      -- "connecting", "live", "waiting" {delay, reason}
 *   unauthorized()           -- 401: the key is no longer valid; stops
 */
export class EventStream {
  constructor(api, handlers) {
    this.api = api;
    this.handlers = handlers;
    this.stopped = true;
    this.controller = null;
    this.timer = null;
    this.wake = null;
  }

  start() {
    if (!this.stopped) {
      return;
    }
    this.stopped = false;
    this.run();
  }

  stop() {
    this.stopped = true;
    if (this.controller) {
      this.controller.abort();
    }
    clearTimeout(this.timer);
    if (this.wake) {
      this.wake();
    }
  }

  /** Reconnect now rather than at the end of the current wait. */
  retryNow() {
    clearTimeout(this.timer);
    if (this.wake) {
      this.wake();
    }
  }

  async run() {
    let attempt = 0;
    while (!this.stopped) {
      let reason = "connection closed";
      this.handlers.state("connecting");
      this.controller = new AbortController();
      try {
        const response = await fetch(this.api.root + "/events", {
          headers: this.api.headers({Accept: "text/event-stream", "Cache-Control": "no-cache"}),
          cache: "no-store",
          credentials: "omit",
          signal: this.controller.signal,
        });
        if (response.status === 401) {
          this.stopped = true;
          this.handlers.unauthorized();
          return;
        }
        if (!response.ok || !response.body) {
          throw new Error(`HTTP ${response.status}`);
        }
        const opened = Date.now();
        this.handlers.open();
        this.handlers.state("live");
        reason = await this.read(response.body.getReader());
        if (Date.now() - opened > 10000) {
          attempt = 0; // it worked for a while: start the delays over
        }
      } catch (e) {
        if (this.stopped) {
          return;
        }
        reason = e.message || String(e);
      }
      if (this.stopped) {
        return;
      }
      const delay = backoff(attempt);
      attempt += 1;
      this.handlers.state("waiting", {delay, reason});
      await new Promise((resolve) => {
        this.wake = resolve;
        this.timer = setTimeout(resolve, delay);
      });
      this.wake = null;
    }
  }

  /** Split the stream into events (blank-line separated blocks). */
  async read(reader) {
    const decoder = new TextDecoder();
    let buffer = "";
    let reason = "the master closed the stream";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) {
        return reason;
      }
      buffer += decoder.decode(value, {stream: true});
      // Line ends may be CRLF, LF or CR (the master sends LF); a CR at the
      // very end may be the first half of a CRLF, so it waits.
      const tail = buffer.endsWith("\r") ? "\r" : "";
      buffer = buffer.slice(0, buffer.length - tail.length).replace(/\r\n?/g, "\n") + tail;
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const data = parseBlock(block);
        if (data) {
          if (data.type === "shutdown") {
            reason = "the master stopped or its API key changed";
          }
          this.handlers.event(data);
        }
      }
      if (buffer.length > 4 << 20) {
        throw new Error("event too large");
      }
    }
  }
}

/** One SSE block: the decoded JSON of its data lines, or null. */
export function parseBlock(block) {
  const data = [];
  for (const line of block.split("\n")) {
    if (line.startsWith("data:")) {
      data.push(line.slice(line.startsWith("data: ") ? 6 : 5));
    }
  }
  if (!data.length) {
    return null;
  }
  try {
    const value = JSON.parse(data.join("\n"));
    return value && typeof value === "object" ? value : null;
  } catch (e) {
    return null;
  }
}
