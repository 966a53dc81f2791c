// Instance URLs from the create form (docs/urls.md): the parameters, their
// defaults, and the URL a set of form values makes.  A parameter left at
// its default is left out of the URL, so the URL stays short and the
// master's defaults (and, for servers, its log= and tls=) apply.

/**
 * The query parameters the form offers.  `roles`: which roles take it;
 * `kind`: "select" (options [value, label]), "number", "text", "flags"
 * (checkboxes whose digits are concatenated), "bool" (checkbox -> 1).
 * `def`: the value that means "leave it out".
 */
export const PARAMS = [
  {
    name: "mode", label: "Mode", kind: "select", roles: ["server", "client"], def: "0",
    options: {
      server: [["0", "0 - auto"], ["1", "1 - reverse"], ["2", "2 - forward"]],
      client: [["0", "0 - auto"], ["1", "1 - single-end"], ["2", "2 - dual-end"]],
    },
    hint: "Server: 1 reverse (the server reaches the targets), 2 forward (the client does). " +
      "Client: 1 single-end (no server, listen and forward), 2 dual-end (through a server).",
    main: true,
  },
  {
    name: "tls", label: "TLS", kind: "select", roles: ["server"], def: "",
    options: [["", "the master's setting"], ["0", "0 - plain"], ["1", "1 - self-signed certificate"], ["2", "2 - certificate files"]],
    hint: "Pool connections between server and client.",
    main: true,
  },
  {name: "crt", label: "Certificate file (tls=2)", kind: "text", roles: ["server"], def: "", placeholder: "/etc/nodepass/cert.pem", when: {tls: "2"}},
  {name: "key", label: "Private key file (tls=2)", kind: "text", roles: ["server"], def: "", placeholder: "/etc/nodepass/key.pem", when: {tls: "2"}},
  {
    name: "type", label: "Pool type", kind: "select", roles: ["server"], def: "0",
    options: [["0", "0 - TCP"], ["1", "1 - QUIC"], ["2", "2 - WebSocket"], ["3", "3 - HTTP/2"]],
    hint: "QUIC and HTTP/2 always encrypt.",
  },
  {name: "min", label: "Minimum pool", kind: "number", roles: ["client"], def: "64", min: 1},
  {name: "max", label: "Maximum pool", kind: "number", roles: ["server"], def: "1024", min: 1},
  {name: "sni", label: "Server name (SNI)", kind: "text", roles: ["client"], def: "", placeholder: "tunnel host, or none for an IP"},
  {
    name: "wire", label: "Wire generation", kind: "select", roles: ["server", "client"], def: "auto",
    options: [["auto", "auto"], ["1.14", "1.14"], ["1.12", "1.12"]],
  },
  {
    name: "log", label: "Log level", kind: "select", roles: ["server", "client"], def: "",
    options: [["", "the master's level"], ["debug", "debug"], ["info", "info"], ["warn", "warn"], ["error", "error"], ["event", "event"], ["none", "none"]],
    main: true,
  },
  {name: "rate", label: "Rate limit (Mbit/s)", kind: "number", roles: ["server", "client"], def: "0", min: 0, hint: "0 = unlimited"},
  {name: "slot", label: "Connection slots", kind: "number", roles: ["server", "client"], def: "65536", min: 0, hint: "0 = unlimited"},
  {name: "read", label: "Idle timeout", kind: "text", roles: ["server", "client"], def: "", placeholder: "0 (never), e.g. 10m", hint: "Go duration"},
  {name: "dial", label: "Source IP for targets", kind: "text", roles: ["server", "client"], def: "", placeholder: "auto"},
  {name: "dns", label: "DNS cache TTL", kind: "text", roles: ["server", "client"], def: "", placeholder: "5m"},
  {
    name: "block", label: "Block users speaking", kind: "flags", roles: ["server", "client"], def: "",
    options: [["1", "SOCKS"], ["2", "HTTP"], ["3", "TLS"]],
  },
  {name: "proxy", label: "Send PROXY protocol v1 header", kind: "bool", roles: ["server", "client"], def: ""},
  {name: "notcp", label: "Disable TCP", kind: "bool", roles: ["server", "client"], def: ""},
  {name: "noudp", label: "Disable UDP", kind: "bool", roles: ["server", "client"], def: ""},
];

/** Query values escaped as little as a URL allows (easier to read back). */
function queryValue(value) {
  return encodeURIComponent(value).replace(/%2F/gi, "/").replace(/%3A/gi, ":").replace(/%2C/gi, ",");
}

/** `host` as the authority needs it: IPv6 literals in brackets. */
export function hostPart(host) {
  const h = host.trim();
  return h.includes(":") && !h.startsWith("[") ? `[${h}]` : h;
}

/** Targets typed with commas, spaces or new lines: `a:1,b:2`. */
export function targetList(text) {
  return text
    .split(/[\s,]+/)
    .map((t) => t.trim())
    .filter(Boolean)
    .join(",");
}

/**
 * The URL for `values`: {role, host, port, tunnelKey, targets, params:
 * {name: value}} (checkbox values are booleans, flags arrays).
 */
export function buildUrl(values) {
  const role = values.role === "server" ? "server" : "client";
  const user = values.tunnelKey ? encodeURIComponent(values.tunnelKey) + "@" : "";
  const authority = `${hostPart(values.host || "")}:${(values.port || "").trim()}`;
  const query = [];
  for (const p of PARAMS) {
    if (!p.roles.includes(role)) {
      continue;
    }
    if (p.when && Object.entries(p.when).some(([k, v]) => values.params[k] !== v)) {
      continue;
    }
    let value = values.params[p.name];
    if (p.kind === "bool") {
      value = value ? "1" : "";
    } else if (p.kind === "flags") {
      value = (value || []).slice().sort().join("");
    } else {
      value = value === undefined || value === null ? "" : String(value).trim();
    }
    if (value !== "" && value !== p.def) {
      query.push(`${p.name}=${queryValue(value)}`);
    }
  }
  return `${role}://${user}${authority}/${targetList(values.targets || "")}${query.length ? "?" + query.join("&") : ""}`;
}

/** `key=value` lines as a tags object; throws on a line without `=`. */
export function parseTags(text) {
  const tags = {};
  for (const [i, raw] of text.split("\n").entries()) {
    const line = raw.trim();
    if (!line) {
      continue;
    }
    const at = line.indexOf("=");
    if (at <= 0) {
      throw new Error(`Tags, line ${i + 1}: write key=value`);
    }
    tags[line.slice(0, at).trim()] = line.slice(at + 1).trim();
  }
  return tags;
}

/** The tags of an instance as `key=value` lines. */
export function tagsText(tags) {
  return Object.entries(tags || {})
    .map(([k, v]) => `${k}=${v}`)
    .join("\n");
}

export const MODES = {
  server: {0: "auto", 1: "reverse", 2: "forward"},
  client: {0: "auto", 1: "single-end", 2: "dual-end"},
};

/** "1 single-end" for a record's mode. */
export function modeText(inst) {
  const names = MODES[inst.type] || {};
  const name = names[inst.mode];
  return name ? `${inst.mode} ${name}` : String(inst.mode ?? "");
}
