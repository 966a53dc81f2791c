"""The ``/docs`` page: Swagger UI served entirely by the master itself.

The Go master loads Swagger UI from a CDN, which leaves an air-gapped master
with a blank page.  We serve the JS/CSS of the ``swagger-ui-bundle`` package
from ``{prefix}/v1/docs/static/`` instead, so the page works with no internet.

That package ships Swagger UI 4.15, which renders OpenAPI 3.0 only, while the
master publishes 3.1.  The page therefore fetches ``openapi.json`` itself and
hands Swagger UI a 3.0 rendition made in the browser (nullable unions become
``nullable``, schema ``examples`` become ``example``, keywords 3.0 lacks are
dropped).  The published document stays 3.1; only the viewer's copy is
converted.
"""

from __future__ import annotations

import html
import json

from swagger_ui_bundle import swagger_ui_path
from twisted.web import resource, static

# Converts the 3.1 document to the 3.0 dialect Swagger UI 4 understands.
_INIT_JS = """
(function () {
  "use strict";
  var DROP = {propertyNames: 1, $schema: 1, $id: 1, const: 0};
  function down(node) {
    if (Array.isArray(node)) { node.forEach(down); return; }
    if (node === null || typeof node !== "object") { return; }
    if (Array.isArray(node.type)) {
      var kinds = node.type.filter(function (t) { return t !== "null"; });
      if (kinds.length !== node.type.length) { node.nullable = true; }
      if (kinds.length === 1) { node.type = kinds[0]; } else { delete node.type; }
    }
    ["anyOf", "oneOf"].forEach(function (k) {
      if (!Array.isArray(node[k])) { return; }
      var rest = node[k].filter(function (s) { return !(s && s.type === "null"); });
      if (rest.length !== node[k].length) { node.nullable = true; node[k] = rest; }
    });
    if (Array.isArray(node.examples)) {
      if (node.examples.length) { node.example = node.examples[0]; }
      delete node.examples;
    }
    if (Object.prototype.hasOwnProperty.call(node, "const")) {
      node["enum"] = [node["const"]];
      delete node["const"];
    }
    Object.keys(DROP).forEach(function (k) { if (DROP[k]) { delete node[k]; } });
    Object.keys(node).forEach(function (k) { down(node[k]); });
  }
  function show(message) {
    document.getElementById("swagger-ui").textContent = message;
  }
  fetch(SPEC_URL, {headers: {Accept: "application/json"}})
    .then(function (r) {
      if (!r.ok) { throw new Error("HTTP " + r.status); }
      return r.json();
    })
    .then(function (spec) {
      spec.openapi = "3.0.3";
      down(spec);
      window.ui = SwaggerUIBundle({
        spec: spec,
        dom_id: "#swagger-ui",
        deepLinking: true,
        persistAuthorization: true,
        validatorUrl: null,
        presets: [SwaggerUIBundle.presets.apis],
        layout: "BaseLayout"
      });
    })
    .catch(function (e) { show("Cannot load " + SPEC_URL + ": " + e.message); });
})();
"""


def _api_root(prefix: str) -> str:
    prefix = prefix.strip("/")
    return f"/{prefix}/v1" if prefix else "/v1"


def docs_page(prefix: str) -> bytes:
    """The HTML of the Swagger UI page for the master under ``prefix``."""
    root = _api_root(prefix)
    static_root = html.escape(f"{root}/docs/static", quote=True)
    # JSON is a JS string literal; escaping "<" keeps "</script>" out of it.
    spec_url = json.dumps(f"{root}/openapi.json").replace("<", "\\u003c")
    page = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>NodePass master API</title>
<link rel="stylesheet" href="{static_root}/swagger-ui.css">
<link rel="icon" type="image/png" href="{static_root}/favicon-32x32.png" sizes="32x32">
<style>body {{ margin: 0; }}</style>
</head>
<body>
<div id="swagger-ui">Loading the API description...</div>
<script src="{static_root}/swagger-ui-bundle.js"></script>
<script>var SPEC_URL = {spec_url};</script>
<script>{_INIT_JS}</script>
</body>
</html>
"""
    return page.encode("utf-8")


class _AssetDirectory(static.File):
    """Swagger UI's asset directory, serving only the assets the page needs.

    The package also ships a demo ``index.html`` and initializer that load the
    petstore example from the internet; those are not served, and there is no
    index page or directory listing."""

    indexNames: list = []
    _SUFFIXES = (".js", ".css", ".png", ".map")
    _HIDDEN = {"swagger-initializer.js"}

    def getChild(self, path, request):
        name = path.decode("utf-8", "replace") if isinstance(path, bytes) else path
        if not name.endswith(self._SUFFIXES) or name in self._HIDDEN or "/" in name:
            return resource.NoResource("No such asset")
        return super().getChild(path, request)

    def directoryListing(self) -> resource.Resource:
        return resource.NoResource("No such asset")

    def render_GET(self, request):
        if self.isdir():  # the directory itself: no listing, no redirect
            return resource.NoResource("No such asset").render(request)
        return super().render_GET(request)


def static_resource() -> static.File:
    """A resource serving Swagger UI's files from the installed package."""
    return _AssetDirectory(swagger_ui_path)
