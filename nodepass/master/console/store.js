// What the console knows, fed by the event stream: the instances, their
// traffic history (for rates and charts) and their recent log lines.

export const KEY_ID = "********";
export const LOG_LIMIT = 1000; // lines kept per instance
export const HISTORY_MS = 5 * 60 * 1000; // traffic samples kept per instance
const MIN_SAMPLE_MS = 1000; // unchanged counters: at most one sample a second

/** An event's `time` (RFC 3339 with nanoseconds, as Go writes it) in
 * milliseconds; Date.parse wants at most milliseconds. */
export function eventTime(text) {
  if (typeof text === "string") {
    const ms = Date.parse(text.replace(/(\.\d{3})\d+/, "$1"));
    if (Number.isFinite(ms)) {
      return ms;
    }
  }
  return Date.now();
}

function totals(inst) {
  const n = (v) => (typeof v === "number" && Number.isFinite(v) ? v : 0);
  return {rx: n(inst.tcprx) + n(inst.udprx), tx: n(inst.tcptx) + n(inst.udptx)};
}

export class Store {
  constructor() {
    this.instances = new Map(); // id -> record, in creation order
    this.identity = null; // the ******** record (master ID, alias)
    this.history = new Map(); // id -> [{t, rx, tx, rxRate, txRate}]
    this.logs = new Map(); // id -> [line]
    this.skew = 0; // local clock minus the master's, from the latest event
    this.listeners = new Set();
    this.seen = null; // ids of the current connection's initial burst
  }

  /** `fn(kind, id, extra)` on every change. */
  subscribe(fn) {
    this.listeners.add(fn);
    return () => this.listeners.delete(fn);
  }

  emit(kind, id, extra) {
    for (const fn of this.listeners) {
      fn(kind, id, extra);
    }
  }

  /** The master's clock now, for charts drawn against event times. */
  now() {
    return Date.now() - this.skew;
  }

  /** A new connection: its `initial` burst says what exists now; whatever
   * it does not name was deleted while we were away (see `settle`). */
  connected() {
    this.seen = new Set();
  }

  /** The initial burst is over: forget instances it did not name. */
  settle() {
    if (!this.seen) {
      return;
    }
    for (const id of [...this.instances.keys()]) {
      if (!this.seen.has(id)) {
        this.remove(id);
      }
    }
    this.seen = null;
  }

  apply(event) {
    const time = eventTime(event.time);
    this.skew = Date.now() - time;
    const inst = event.instance;
    if (event.type === "shutdown") {
      this.emit("shutdown");
      return;
    }
    if (!inst || typeof inst.id !== "string") {
      return;
    }
    if (event.type !== "initial") {
      this.settle();
    } else if (this.seen) {
      this.seen.add(inst.id);
    }
    if (inst.id === KEY_ID) {
      this.identity = inst;
      this.emit("identity", inst.id);
      return;
    }
    if (event.type === "delete") {
      this.remove(inst.id);
      return;
    }
    this.upsert(inst, time, event.type);
    if (event.type === "log" && typeof event.logs === "string" && event.logs) {
      this.addLog(inst.id, event.logs);
    }
  }

  upsert(inst, time, kind) {
    const known = this.instances.has(inst.id);
    this.instances.set(inst.id, inst);
    this.sample(inst, time, kind === "initial" || !known);
    this.emit(known ? "update" : "create", inst.id);
  }

  /** A record from an API answer (PATCH, PUT): shown at once, before its
   * own event arrives; the stream's events keep the traffic history. */
  known(inst) {
    if (inst && typeof inst.id === "string" && this.instances.has(inst.id)) {
      this.instances.set(inst.id, inst);
      this.emit("update", inst.id);
    }
  }

  remove(id) {
    if (this.instances.delete(id)) {
      this.history.delete(id);
      this.logs.delete(id);
      this.emit("delete", id);
    }
  }

  /** Record the counters at `time`; the rate is the change since the
   * previous sample.  A first sample (or counters that went down: a
   * `reset`) starts a new baseline with no rate. */
  sample(inst, time, baseline) {
    const now = totals(inst);
    let list = this.history.get(inst.id);
    if (!list) {
      list = [];
      this.history.set(inst.id, list);
    }
    const last = list[list.length - 1];
    const entry = {t: time, rx: now.rx, tx: now.tx, rxRate: 0, txRate: 0};
    if (!baseline && last && now.rx >= last.rx && now.tx >= last.tx) {
      const changed = now.rx !== last.rx || now.tx !== last.tx;
      const dt = time - last.t;
      if (!changed && dt < MIN_SAMPLE_MS) {
        return; // an alias edit, a log line: no new information on traffic
      }
      if (dt <= 0) {
        return;
      }
      entry.rxRate = ((now.rx - last.rx) * 1000) / dt;
      entry.txRate = ((now.tx - last.tx) * 1000) / dt;
    } else if (last && now.rx === last.rx && now.tx === last.tx) {
      return; // same counters again (a reconnect's initial burst)
    }
    list.push(entry);
    const cutoff = time - HISTORY_MS;
    while (list.length > 2 && list[0].t < cutoff) {
      list.shift();
    }
  }

  /** The latest rates of an instance: zero once it stopped, or when it
   * has not reported for a while. */
  rates(id) {
    const inst = this.instances.get(id);
    const list = this.history.get(id) || [];
    const last = list[list.length - 1];
    if (!inst || !last || inst.status !== "running" || this.now() - last.t > 30000) {
      return {rx: 0, tx: 0};
    }
    return {rx: last.rxRate, tx: last.txRate};
  }

  addLog(id, line) {
    // No terminal colours in a browser, whatever the instance's log= says.
    const clean = line.replace(/\x1b\[[0-9;]*[A-Za-z]/g, "");
    let list = this.logs.get(id);
    if (!list) {
      list = [];
      this.logs.set(id, list);
    }
    list.push(clean);
    if (list.length > LOG_LIMIT) {
      list.splice(0, list.length - LOG_LIMIT);
    }
    this.emit("log", id, clean);
  }

  clear() {
    this.instances.clear();
    this.history.clear();
    this.logs.clear();
    this.identity = null;
    this.seen = null;
  }
}
