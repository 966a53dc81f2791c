"""The OpenAPI 3.1 description of the master API (SPEC §8).

Built as plain dicts by a function of the URL prefix, so the document a master
serves always names the paths that master really answers on.  Dashboards and
code generators read this document; ``tests/test_openapi.py`` checks it with
``openapi-spec-validator`` and against the routes of the Klein app, so a route
added to the app without being described here fails the suite.
"""

from __future__ import annotations

import copy
from typing import Any

from nodepass import __version__

ERROR_STATUSES: dict[str, str] = {
    "400": "Bad request: `Invalid request body` (not a JSON object, unknown field, "
    "no url), `Invalid URL format`, `Invalid URL scheme`, `Invalid action: X`, "
    "`Invalid alias: ...` (wrong type or over 256 characters), a missing or bad tcping target.",
    "401": "Unauthorized: API key required / Unauthorized: Invalid API key.",
    "403": "Forbidden: the operation is not allowed on the `********` key instance.",
    "404": "Instance not found.",
    "409": "Instance URL conflict: the new URL equals the current one.",
    "413": "Request body too large (the limit is 64 KiB).",
    "500": "Failed to save state: the state file could not be written (disk full, "
    "permissions); nothing was changed.",
}

_STR256 = {"type": "string", "maxLength": 256}
_COUNTER = {"type": "integer", "minimum": 0}


def _schemas() -> dict[str, Any]:
    return {
        "Error": {
            "type": "object",
            "description": "Every error answer: one human-readable message.",
            "required": ["error"],
            "properties": {"error": {"type": "string", "examples": ["Instance not found"]}},
        },
        "Peer": {
            "type": "object",
            "description": "Who is at the other end of the tunnel, as a dashboard recorded it.",
            "properties": {"sid": _STR256, "type": _STR256, "alias": _STR256},
            "additionalProperties": False,
        },
        "Tags": {
            "type": "object",
            "description": "Free-form labels; keys and values at most 256 characters.",
            "propertyNames": {"maxLength": 256},
            "additionalProperties": _STR256,
        },
        "Meta": {
            "type": "object",
            "properties": {
                "peer": {"$ref": "#/components/schemas/Peer"},
                "tags": {
                    "description": (
                        "A non-empty map replaces the tags; `{}` keeps them (as Go's master); "
                        "`null` removes every tag."
                    ),
                    "oneOf": [{"$ref": "#/components/schemas/Tags"}, {"type": "null"}],
                },
            },
            "additionalProperties": False,
        },
        "Instance": {
            "type": "object",
            "description": (
                "One tunnel instance.  Every field is always present.  The special "
                "instance `********` holds the API key in `url`, the master ID in "
                "`config` and the master alias in `alias`."
            ),
            "required": [
                "id", "alias", "type", "status", "url", "config", "restart", "meta",
                "mode", "ping", "pool", "tcps", "udps", "tcprx", "tcptx", "udprx", "udptx",
            ],
            "properties": {
                "id": {
                    "type": "string",
                    "pattern": "^([0-9a-f]{8}|\\*{8})$",
                    "examples": ["1a2b3c4d"],
                },
                "alias": {"type": "string"},
                "type": {
                    "type": "string",
                    "enum": ["server", "client", ""],
                    "description": "Empty only for the `********` key instance.",
                },
                "status": {
                    "type": "string",
                    "enum": ["running", "stopped", "error", ""],
                    "description": "Empty only for the `********` key instance (whose `restart` is false).",
                },
                "url": {
                    "type": "string",
                    "description": (
                        "The URL as given, plus the master's log (and tls/crt/key for servers) "
                        "when absent, its query re-encoded as Go's url.Values.Encode does "
                        "(keys sorted, values query-escaped)."
                    ),
                    "examples": ["server://:10101/127.0.0.1:8080?log=info&tls=1"],
                },
                "config": {
                    "type": "string",
                    "description": (
                        "The URL with every default written out, query keys sorted.  As NodePass 1.14: "
                        "a client's defaults include `sni` and `block`, a server's `type` and `block`; "
                        "URLs that give `quic=` (or `wire=1.12`) keep the 1.12 defaults."
                    ),
                    "examples": [
                        "server://127.0.0.1:10101/127.0.0.1:8080?block=0&dial=auto&dns=5m0s&log=info&max=1024"
                        "&mode=0&notcp=0&noudp=0&proxy=0&rate=0&read=0s&slot=65536&type=0"
                    ],
                },
                "restart": {"type": "boolean", "description": "Start this instance when the master starts."},
                "meta": {"$ref": "#/components/schemas/Meta"},
                "mode": {"type": "integer", "description": "Effective mode from the latest CHECK_POINT."},
                "ping": {"type": "integer", "description": "Latest round-trip time, ms."},
                "pool": {"type": "integer", "description": "Idle pool connections."},
                "tcps": {"type": "integer", "description": "Active relayed TCP connections."},
                "udps": {"type": "integer", "description": "Active UDP sessions."},
                "tcprx": _COUNTER,
                "tcptx": _COUNTER,
                "udprx": _COUNTER,
                "udptx": _COUNTER,
            },
        },
        "CreateInstance": {
            "type": "object",
            "required": ["url"],
            "properties": {
                "url": {
                    "type": "string",
                    "description": "A `server://` or `client://` URL.",
                    "examples": ["client://127.0.0.1:10101/127.0.0.1:8080"],
                },
                "alias": _STR256,
                "restart": {"type": "boolean", "default": True},
                "meta": {"$ref": "#/components/schemas/Meta"},
            },
            "additionalProperties": False,
        },
        "PatchInstance": {
            "type": "object",
            "description": (
                "Any subset of the fields.  On `********` only `{\"action\": \"restart\"}` "
                "has an effect: it makes a new API key (answered in `url`) and closes "
                "every event stream."
            ),
            "properties": {
                "alias": _STR256,
                "action": {"$ref": "#/components/schemas/Action"},
                "restart": {"type": "boolean"},
                "meta": {"$ref": "#/components/schemas/Meta"},
            },
            "additionalProperties": False,
        },
        "Action": {
            "type": "string",
            "enum": ["start", "stop", "restart", "reset"],
            "description": "`reset` zeroes the traffic counters.",
        },
        "PutInstance": {
            "description": (
                "Either a new URL (the instance restarts with it) or an action, "
                "as the older API generation sent it."
            ),
            "oneOf": [
                {
                    "type": "object",
                    "title": "Replace URL",
                    "required": ["url"],
                    "properties": {"url": {"type": "string"}},
                    "additionalProperties": False,
                },
                {
                    "type": "object",
                    "title": "Action",
                    "required": ["action"],
                    "properties": {"action": {"$ref": "#/components/schemas/Action"}},
                    "additionalProperties": False,
                },
            ],
        },
        "Info": {
            "type": "object",
            "required": [
                "mid", "alias", "os", "arch", "cpu", "mem_total", "mem_used", "swap_total",
                "swap_used", "netrx", "nettx", "diskr", "diskw", "sysup", "ver", "nodepass_py",
                "name", "uptime", "log", "tls", "crt", "key",
            ],
            "properties": {
                "mid": {"type": "string", "pattern": "^[0-9a-f]{16}$", "description": "Master ID, made once."},
                "alias": {"type": "string"},
                "os": {"type": "string", "examples": ["linux"]},
                "arch": {"type": "string", "examples": ["amd64"]},
                "cpu": {"type": "integer", "minimum": -1, "description": "CPU use in percent, -1 if unknown."},
                "mem_total": _COUNTER,
                "mem_used": _COUNTER,
                "swap_total": _COUNTER,
                "swap_used": _COUNTER,
                "netrx": {**_COUNTER, "description": "Bytes received, loopback and virtual interfaces excluded."},
                "nettx": {**_COUNTER, "description": "Bytes sent, loopback and virtual interfaces excluded."},
                "diskr": {**_COUNTER, "description": "Bytes read, whole disks only."},
                "diskw": {**_COUNTER, "description": "Bytes written, whole disks only."},
                "sysup": {**_COUNTER, "description": "System uptime, seconds."},
                "ver": {
                    "type": "string",
                    "description": (
                        "The newest Go NodePass release whose master API this master "
                        "implements, in Go's form (`v1.12.0`)."
                    ),
                    "examples": ["v1.12.0"],
                },
                "nodepass_py": {"type": "string", "description": "The nodepass-py package version."},
                "name": {"type": "string", "description": "Host name of the master URL."},
                "uptime": {**_COUNTER, "description": "Seconds since the master started."},
                "log": {"type": "string"},
                "tls": {"type": "string"},
                "crt": {"type": "string"},
                "key": {"type": "string"},
            },
        },
        "SetMasterAlias": {
            "type": "object",
            "required": ["alias"],
            "properties": {"alias": _STR256},
            "additionalProperties": False,
        },
        "TcpingResult": {
            "type": "object",
            "required": ["target", "connected", "latency", "error"],
            "properties": {
                "target": {"type": "string", "examples": ["example.com:443"]},
                "connected": {"type": "boolean"},
                "latency": {"type": "integer", "minimum": 0, "description": "Connect time, ms."},
                "error": {"type": ["string", "null"]},
            },
        },
        "Event": {
            "type": "object",
            "description": (
                "The JSON of one `data:` line of the event stream (SSE event name "
                "`instance`).  `logs` carries one log line for `log` events."
            ),
            "required": ["type", "time", "instance", "logs"],
            "properties": {
                "type": {
                    "type": "string",
                    "enum": ["initial", "create", "update", "delete", "log", "shutdown"],
                },
                "time": {
                    "type": "string",
                    "format": "date-time",
                    "description": (
                        "RFC 3339 with nanoseconds, trailing zeros trimmed, in the master's "
                        "local zone (Go's time.Time JSON)."
                    ),
                    "examples": ["2025-11-25T08:00:00.123456789Z"],
                },
                "instance": {
                    "description": "The instance concerned; null in `shutdown` events.",
                    "anyOf": [{"$ref": "#/components/schemas/Instance"}, {"type": "null"}],
                },
                "logs": {"type": "string", "description": "One log line for `log` events, else empty."},
            },
        },
    }


def _error(status: str) -> dict[str, Any]:
    return {"$ref": f"#/components/responses/{_RESPONSE_NAMES[status]}"}


_RESPONSE_NAMES = {
    "400": "BadRequest",
    "401": "Unauthorized",
    "403": "Forbidden",
    "404": "NotFound",
    "409": "Conflict",
    "413": "TooLarge",
    "500": "SaveFailed",
}


def _json(schema_name: str, description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema_name}"}}},
    }


def _body(schema_name: str) -> dict[str, Any]:
    return {
        "required": True,
        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema_name}"}}},
    }


def _errors(*statuses: str) -> dict[str, Any]:
    return {s: _error(s) for s in statuses}


_ID_PARAM = {
    "name": "id",
    "in": "path",
    "required": True,
    "description": "Instance ID (8 hex digits) or `********` for the API key instance.",
    "schema": {"type": "string"},
}


def _paths() -> dict[str, Any]:
    instance = {"$ref": "#/components/schemas/Instance"}
    return {
        "/instances": {
            "get": {
                "operationId": "listInstances",
                "tags": ["instances"],
                "summary": "List all instances, the `********` key instance included",
                "responses": {
                    "200": {
                        "description": "Every instance.",
                        "content": {"application/json": {"schema": {"type": "array", "items": instance}}},
                    },
                    **_errors("401"),
                },
            },
            "post": {
                "operationId": "createInstance",
                "tags": ["instances"],
                "summary": "Create an instance and start it at once",
                "requestBody": _body("CreateInstance"),
                "responses": {
                    "201": _json("Instance", "The new instance."),
                    **_errors("400", "401", "413", "500"),
                },
            },
        },
        "/instances/{id}": {
            "parameters": [_ID_PARAM],
            "get": {
                "operationId": "getInstance",
                "tags": ["instances"],
                "summary": "One instance",
                "responses": {"200": _json("Instance", "The instance."), **_errors("401", "404")},
            },
            "patch": {
                "operationId": "patchInstance",
                "tags": ["instances"],
                "summary": "Set alias, restart policy or meta; start, stop, restart or reset counters",
                "requestBody": _body("PatchInstance"),
                "responses": {
                    "200": _json("Instance", "The updated instance (for `********` restart: the new key in `url`)."),
                    **_errors("400", "401", "404", "413", "500"),
                },
            },
            "put": {
                "operationId": "putInstance",
                "tags": ["instances"],
                "summary": "Replace the URL and restart, or control the instance with an action",
                "requestBody": _body("PutInstance"),
                "responses": {
                    "200": _json("Instance", "The updated instance."),
                    **_errors("400", "401", "403", "404", "409", "413", "500"),
                },
            },
            "delete": {
                "operationId": "deleteInstance",
                "tags": ["instances"],
                "summary": "Stop and remove an instance",
                "responses": {
                    "204": {"description": "Removed."},
                    **_errors("401", "403", "404", "500"),
                },
            },
        },
        "/events": {
            "get": {
                "operationId": "streamEvents",
                "tags": ["events"],
                "summary": "Server-Sent Events: instance changes and logs",
                "description": (
                    "The stream starts with `retry: 3000`, then one `initial` event per "
                    "existing instance, then live `create`, `update`, `delete` and `log` "
                    "events.  Each event is `event: instance` followed by one `data:` line "
                    "holding an `Event` object as JSON.  A `shutdown` event is sent and the "
                    "stream closed when the master stops or the API key is regenerated.  "
                    "A subscriber that stops reading is disconnected."
                ),
                "responses": {
                    "200": {
                        "description": "The event stream.",
                        "content": {
                            "text/event-stream": {
                                "schema": {"type": "string"},
                                "x-item-schema": {"$ref": "#/components/schemas/Event"},
                            }
                        },
                    },
                    **_errors("401"),
                },
            },
        },
        "/info": {
            "get": {
                "operationId": "getInfo",
                "tags": ["master"],
                "summary": "Master and host information",
                "responses": {"200": _json("Info", "Master information."), **_errors("401")},
            },
            "post": {
                "operationId": "setMasterAlias",
                "tags": ["master"],
                "summary": "Set the master alias",
                "requestBody": _body("SetMasterAlias"),
                "responses": {
                    "200": _json("Info", "Master information with the new alias."),
                    **_errors("400", "401", "413", "500"),
                },
            },
        },
        "/tcping": {
            "get": {
                "operationId": "tcping",
                "tags": ["master"],
                "summary": "Measure TCP connect time from the master to host:port",
                "description": "At most 10 probes run at once; a further one waits up to 1 s, then answers with error `too many requests`.",
                "parameters": [
                    {
                        "name": "target",
                        "in": "query",
                        "required": True,
                        "schema": {"type": "string", "examples": ["127.0.0.1:22"]},
                    }
                ],
                "responses": {"200": _json("TcpingResult", "The probe result."), **_errors("400", "401")},
            },
        },
        "/metrics": {
            "get": {
                "operationId": "metrics",
                "tags": ["master"],
                "summary": "Prometheus metrics of this master and its instances",
                "description": (
                    "The Prometheus text exposition format 0.0.4: per instance (labels `id`, "
                    "`alias`, `type`) the traffic counters, connections, pool, ping and status "
                    "of `GET /instances`; per master the instances by status, process CPU and "
                    "memory, event-stream subscribers, and API requests by route template "
                    "(counter and latency histogram).  Besides `X-API-Key`, this route accepts "
                    "the key as `Authorization: Bearer <key>` (what Prometheus's "
                    "`authorization` block sends); `X-API-Key` wins when both are present.  "
                    "See docs/monitoring.md for every metric."
                ),
                "security": [{"ApiKey": []}, {"BearerKey": []}],
                "responses": {
                    "200": {
                        "description": "The metrics.",
                        "content": {
                            "text/plain; version=0.0.4": {
                                "schema": {"type": "string"},
                                "examples": {
                                    "instance": {
                                        "value": (
                                            "nodepass_instance_rx_bytes_total{id=\"1a2b3c4d\",alias=\"web\","
                                            "type=\"server\",protocol=\"tcp\"} 20000.0\n"
                                        )
                                    }
                                },
                            }
                        },
                    },
                    **_errors("401"),
                },
            },
        },
        "/openapi.json": {
            "get": {
                "operationId": "openapi",
                "tags": ["documentation"],
                "summary": "This document",
                "security": [],
                "responses": {
                    "200": {
                        "description": "The OpenAPI 3.1 document.",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    }
                },
            },
        },
        "/docs": {
            "get": {
                "operationId": "docs",
                "tags": ["documentation"],
                "summary": "Swagger UI for this document (assets served by the master itself)",
                "security": [],
                "responses": {
                    "200": {
                        "description": "An HTML page.",
                        "content": {"text/html": {"schema": {"type": "string"}}},
                    }
                },
            },
        },
    }


def openapi_document(prefix: str) -> dict[str, Any]:
    """The complete OpenAPI 3.1 document for a master whose routes live under
    ``{prefix}/v1``.  A fresh dict each call: callers may mutate it."""
    prefix = "/" + prefix.strip("/") if prefix.strip("/") else ""
    responses = {
        name: _json("Error", ERROR_STATUSES[status]) for status, name in _RESPONSE_NAMES.items()
    }
    doc = {
        "openapi": "3.1.0",
        "info": {
            "title": "NodePass master API",
            "version": __version__,
            "description": (
                "Manage NodePass tunnel instances (server:// and client://) on this "
                "master.  Every route except `/openapi.json` and `/docs` needs the API "
                "key in the `X-API-Key` header (`/metrics` also takes it as a Bearer "
                "token); the master prints it at start.  Every "
                "response carries CORS headers and `OPTIONS` answers 200 on every path.  "
                "A method a path does not list answers 405 `Method not allowed` with an "
                "`Allow` header (methods are case-sensitive: `get` is not `GET`); a path "
                "that does not exist answers 404.  Text fields refuse lone surrogates and "
                "control characters (400); request heads over the size limits answer 414 "
                "or 431."
            ),
            "license": {"name": "BSD-3-Clause"},
        },
        "servers": [{"url": f"{prefix}/v1", "description": "This master"}],
        "tags": [
            {"name": "instances", "description": "Tunnel instances"},
            {"name": "events", "description": "Live event stream"},
            {"name": "master", "description": "The master itself"},
            {"name": "documentation", "description": "This document and its viewer (public)"},
        ],
        "security": [{"ApiKey": []}],
        "paths": _paths(),
        "components": {
            "securitySchemes": {
                "ApiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
                "BearerKey": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "The API key as a Bearer token (`Authorization: Bearer <key>`); `/metrics` only.",
                },
            },
            "schemas": _schemas(),
            "responses": responses,
        },
    }
    return copy.deepcopy(doc)
