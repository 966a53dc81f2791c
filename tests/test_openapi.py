"""The OpenAPI document (nodepass.master.openapi) and the Swagger UI page
(nodepass.master.swagger): validity, agreement with the routes the Klein app
really answers, agreement of real answers with the schemas, and the public
/openapi.json and /docs (assets served locally) through a real master."""

from __future__ import annotations

import os
import re

import treq
from openapi_schema_validator import OAS31Validator
from openapi_spec_validator import validate
from openapi_spec_validator.validation.exceptions import OpenAPIValidationError
from swagger_ui_bundle import swagger_ui_path
from twisted.internet import defer
from twisted.trial import unittest

from tests.master_helpers import in_process
from nodepass.config.urls import Tunables, parse_url
from nodepass.ctl.client import MasterClient
from nodepass.master.api import MasterAPI, MasterRoot
from nodepass.master.openapi import openapi_document
from nodepass.master.service import MasterService
from nodepass.master.swagger import docs_page
from tests import helpers

METHODS = ("get", "post", "put", "patch", "delete")
TUNABLES = Tunables(report_interval=0.2, service_cooldown=0.2, shutdown_timeout=1.0)


def _d(coro_fn):
    def wrapper(self):
        return defer.ensureDeferred(coro_fn(self))

    wrapper.__name__ = coro_fn.__name__
    wrapper.__doc__ = coro_fn.__doc__
    return wrapper


class DocumentTests(unittest.TestCase):
    def test_valid_openapi_31(self):
        for prefix in ("/api", "", "/", "/deep/prefix"):
            doc = openapi_document(prefix)
            self.assertEqual(doc["openapi"], "3.1.0")
            validate(doc)

    def test_validator_rejects_a_broken_document(self):
        """The validity test above can fail: a missing response section or a
        dangling reference is refused."""
        doc = openapi_document("/api")
        del doc["paths"]["/instances/{id}"]["parameters"]
        self.assertRaises(OpenAPIValidationError, validate, doc)
        doc = openapi_document("/api")
        doc["components"]["schemas"]["Instance"]["required"] = "id"
        self.assertRaises(OpenAPIValidationError, validate, doc)
        doc = openapi_document("/api")
        doc["paths"]["/info"]["get"]["responses"]["200"]["content"]["application/json"]["schema"] = {
            "$ref": "#/components/schemas/Nope"
        }
        self.assertRaises(Exception, validate, doc)

    def test_servers_and_security(self):
        doc = openapi_document("/api")
        self.assertEqual(doc["servers"][0]["url"], "/api/v1")
        self.assertEqual(openapi_document("/x/y/")["servers"][0]["url"], "/x/y/v1")
        self.assertEqual(
            doc["components"]["securitySchemes"]["ApiKey"], {"type": "apiKey", "in": "header", "name": "X-API-Key"}
        )
        self.assertEqual(doc["security"], [{"ApiKey": []}])
        for path, item in doc["paths"].items():
            for method, op in item.items():
                if method not in METHODS:
                    continue
                public = path in ("/openapi.json", "/docs")
                self.assertEqual(op.get("security") == [], public, f"{method} {path}")
                if not public:
                    self.assertIn("401", op["responses"], f"{method} {path}")

    def test_fresh_copy_each_call(self):
        doc = openapi_document("/api")
        doc["paths"].clear()
        self.assertIn("/instances", openapi_document("/api")["paths"])

    def test_every_error_status_of_the_spec_is_documented(self):
        doc = openapi_document("/api")

        def statuses(path, method):
            return set(doc["paths"][path][method]["responses"])

        self.assertEqual(statuses("/instances", "post"), {"201", "400", "401", "413", "500"})
        self.assertEqual(statuses("/instances/{id}", "get"), {"200", "401", "404"})
        self.assertEqual(
            statuses("/instances/{id}", "put"), {"200", "400", "401", "403", "404", "409", "413", "500"}
        )
        self.assertEqual(statuses("/instances/{id}", "delete"), {"204", "401", "403", "404", "500"})
        self.assertEqual(statuses("/tcping", "get"), {"200", "400", "401"})
        self.assertIn("text/event-stream", doc["paths"]["/events"]["get"]["responses"]["200"]["content"])


class DocsPageTests(unittest.TestCase):
    def test_page_uses_local_assets_only(self):
        page = docs_page("/api").decode("utf-8")
        self.assertIn('href="/api/v1/docs/static/swagger-ui.css"', page)
        self.assertIn('src="/api/v1/docs/static/swagger-ui-bundle.js"', page)
        self.assertIn('"/api/v1/openapi.json"', page)
        self.assertNotRegex(page, r"(?i)https?://")  # no CDN, no external host at all
        for asset in re.findall(r'(?:src|href)="/api/v1/docs/static/([^"]+)"', page):
            self.assertTrue(os.path.isfile(os.path.join(swagger_ui_path, asset)), asset)

    def test_prefix_is_escaped(self):
        page = docs_page('/a"<b></script>').decode("utf-8")
        self.assertNotIn("<b>", page)
        self.assertEqual(page.count("</script>"), 3)


async def _start_master(test, url="master://127.0.0.1:0"):
    svc = MasterService(in_process(parse_url(url)), test.mktemp(), tunables=TUNABLES)
    svc.startService()
    await svc.ready
    test.addCleanup(svc.stopService)
    return svc


def _schema_validator(doc: dict, name: str) -> OAS31Validator:
    schema = {"$ref": f"#/components/schemas/{name}", "components": doc["components"]}
    return OAS31Validator(schema)


class ServedDocumentTests(unittest.TestCase):
    async def _get(self, path: str, key: str | None = None, method: str = "GET", body: bytes | None = None):
        headers = {"X-API-Key": [key]} if key else {}
        if body is not None:
            headers["Content-Type"] = ["application/json"]
        response = await treq.request(
            method, self.root + path, headers=headers, data=body, persistent=False, allow_redirects=False
        )
        content = await treq.content(response)
        return response, content

    async def _setup(self, url="master://127.0.0.1:0"):
        self.master = await _start_master(self, url)
        self.root = self.master.base_url + "/v1"

    @_d
    async def test_public_openapi_json(self):
        await self._setup("master://127.0.0.1:0/custom/root")
        response, content = await self._get("/openapi.json")
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders("content-type")[0].split(";")[0], "application/json")
        self.assertEqual(response.headers.getRawHeaders("access-control-allow-origin"), ["*"])
        import json

        served = json.loads(content)
        self.assertEqual(served, openapi_document("/custom/root"))
        self.assertEqual(served["servers"][0]["url"], "/custom/root/v1")

    @_d
    async def test_public_docs_and_local_assets(self):
        await self._setup()
        response, content = await self._get("/docs")
        self.assertEqual(response.code, 200)
        self.assertIn("text/html", response.headers.getRawHeaders("content-type")[0])
        page = content.decode("utf-8")
        self.assertEqual(content, docs_page("/api"))
        assets = re.findall(r'(?:src|href)="(/api/v1/docs/static/[^"]+)"', page)
        self.assertGreaterEqual(len(assets), 2)
        for asset in assets:
            response, body = await self._get(asset[len("/api/v1") :])
            self.assertEqual(response.code, 200, asset)
            with open(os.path.join(swagger_ui_path, asset.rsplit("/", 1)[1]), "rb") as f:
                self.assertEqual(body, f.read(), asset)
        response, _ = await self._get("/docs/static/swagger-ui-bundle.js")
        self.assertIn("javascript", response.headers.getRawHeaders("content-type")[0])
        # No directory listing, no escaping the asset directory.
        response, body = await self._get("/docs/static/")
        self.assertEqual(response.code, 404)
        self.assertNotIn(b"swagger-ui-bundle.js", body)
        for hidden in ("..%2f..%2f__init__.py", "index.html", "swagger-initializer.js", "index.j2"):
            response, body = await self._get("/docs/static/" + hidden)
            self.assertEqual(response.code, 404, hidden)

    @_d
    async def test_document_matches_routes(self):
        """Every path of the Klein app is in the document and every
        documented path exists; every method the document lists is answered
        (never 405) and every method it omits gets 405."""
        await self._setup()
        self.assertIsInstance(self.master.site.resource, MasterRoot)  # MasterAPI's app, mounted at /api/v1
        routed = set()
        for rule in MasterAPI.app.url_map.iter_rules():
            path = rule.rule  # relative to {prefix}/v1
            if path == "/" or path.startswith(("/<", "/docs/static")):
                continue  # the JSON 404 catch-all and the asset branch
            routed.add(re.sub(r"<(?:\w+:)?(\w+)>", "{id}", path))
        doc = openapi_document("/api")
        self.assertEqual(routed, set(doc["paths"]))

        key = self.master.api_key
        for path, item in doc["paths"].items():
            if path == "/events":
                continue  # a GET there never ends; checked by the SSE tests
            concrete = path.replace("{id}", "abcdef01")
            for method in METHODS:
                response, body = await self._get(concrete, key, method.upper(), b"{}" if method != "get" else None)
                if method in item:
                    self.assertNotEqual(response.code, 405, f"{method} {path}")
                    self.assertIn(str(response.code), item[method]["responses"], f"{method} {path}: {body!r}")
                else:
                    self.assertEqual(response.code, 405, f"{method} {path}")
                    self.assertEqual(body, b'{"error":"Method not allowed"}')
            response, _ = await self._get(concrete, None, "OPTIONS")
            self.assertEqual(response.code, 200)

    @_d
    async def test_security_as_documented(self):
        """Every operation the document protects answers 401 without a key;
        the public ones answer 200."""
        await self._setup()
        doc = openapi_document("/api")
        for path, item in doc["paths"].items():
            concrete = path.replace("{id}", "abcdef01")
            for method, op in item.items():
                if method not in METHODS:
                    continue
                response, body = await self._get(concrete, None, method.upper())
                if op.get("security") == []:
                    self.assertEqual(response.code, 200, f"{method} {path}")
                else:
                    self.assertEqual(response.code, 401, f"{method} {path}")
                    self.assertEqual(body, b'{"error":"Unauthorized: API key required"}')

    @_d
    async def test_answers_match_schemas(self):
        """Real answers validate against the documented schemas."""
        import json

        await self._setup()
        key = self.master.api_key
        doc = openapi_document("/api")
        echo, _ = helpers.listen_echo()
        self.addCleanup(echo.stopListening)
        port = echo.getHost().port
        url = f"client://127.0.0.1:0/127.0.0.1:{port}?mode=1"
        response, body = await self._get("/instances", key, "POST", json.dumps({"url": url, "alias": "a"}).encode())
        self.assertEqual(response.code, 201)
        _schema_validator(doc, "Instance").validate(json.loads(body))
        response, body = await self._get("/instances", key)
        listed = json.loads(body)
        self.assertEqual(len(listed), 2)
        for inst in listed:
            _schema_validator(doc, "Instance").validate(inst)
        _schema_validator(doc, "Info").validate(json.loads((await self._get("/info", key))[1]))
        for target in (f"127.0.0.1:{port}", f"127.0.0.1:{helpers.dead_port()}"):
            response, body = await self._get(f"/tcping?target={target}", key)
            _schema_validator(doc, "TcpingResult").validate(json.loads(body))
        response, body = await self._get("/instances/nothere", key)
        self.assertEqual(response.code, 404)
        _schema_validator(doc, "Error").validate(json.loads(body))
        # Events on the stream match the Event schema.
        client = MasterClient(self.master.base_url, key)
        self.addCleanup(lambda: defer.ensureDeferred(client.close()))
        async with client.events() as stream:
            events = [await stream.next(5), await stream.next(5)]
            await client.set_alias(next(i["id"] for i in listed if i["id"] != "********"), "b")
            while events[-1]["type"] != "update":
                events.append(await stream.next(5))
        for event in events:
            _schema_validator(doc, "Event").validate(event)
        # The validators are not vacuous.
        with self.assertRaises(Exception):
            _schema_validator(doc, "Instance").validate({"id": "x"})

    @_d
    async def test_every_request_schema_accepts_what_the_app_accepts(self):
        """Bodies the document calls valid are accepted; bodies it calls
        invalid (unknown field, over-long alias) are refused with 400."""
        import json

        await self._setup()
        key = self.master.api_key
        doc = openapi_document("/api")
        patch = _schema_validator(doc, "PatchInstance")
        good = {"alias": "x" * 256, "restart": False, "meta": {"peer": {"sid": "1"}, "tags": {"k": "v"}}}
        patch.validate(good)
        bad_bodies = [{"alias": "x" * 257}, {"bogus": 1}, {"action": "fly"}, {"meta": {"peer": {"nope": ""}}}]
        for bad in bad_bodies:
            with self.assertRaises(Exception):
                patch.validate(bad)
        echo, _ = helpers.listen_echo()
        self.addCleanup(echo.stopListening)
        url = f"client://127.0.0.1:0/127.0.0.1:{echo.getHost().port}?mode=1"
        _schema_validator(doc, "CreateInstance").validate({"url": url})
        response, body = await self._get("/instances", key, "POST", json.dumps({"url": url}).encode())
        iid = json.loads(body)["id"]
        response, _ = await self._get(f"/instances/{iid}", key, "PATCH", json.dumps(good).encode())
        self.assertEqual(response.code, 200)
        for bad in bad_bodies:
            response, _ = await self._get(f"/instances/{iid}", key, "PATCH", json.dumps(bad).encode())
            self.assertEqual(response.code, 400, bad)
