"""An OpenSearch cluster's ``_bulk`` API as the wire shows it: NDJSON action/document pairs,
explicit ``_index`` per action, per-item statuses with ``errors: true``, dynamic mapping (the first
document fixes a field's type; a later document that conflicts gets a 400
``mapper_parsing_exception`` for that item only), 429 ``es_rejected_execution_exception``
throttling of chosen items, whole-request failures, and HTTP basic or SigV4 authentication
(checked with the daemon's own verifier, service ``es``).

Documents are kept per index and ``_id`` (a re-sent id overwrites, ``_version`` counts); a
document without ``_id`` gets a fresh one, as the cluster does.
"""

from __future__ import annotations

import base64
import uuid
from typing import Any

import orjson
from aiohttp import web

from fakes.server import ThreadedServer
from firehose.auth import AuthError, verify


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, dict):
        return "object"
    return "text"


class OpenSearchServer(ThreadedServer):
    def __init__(self, port: int | None = None, *, user: str | None = None, password: str | None = None,
                 sigv4: dict[str, str] | None = None) -> None:
        super().__init__(port)
        self.user, self.password, self.sigv4 = user, password, sigv4
        self.indices: dict[str, dict[str, bytes]] = {}
        self.versions: dict[tuple[str, str], int] = {}
        self.mappings: dict[str, dict[str, str]] = {}
        self.actions: list[dict[str, Any]] = []  # every action line received
        self.request_failures: list[int] = []  # scripted whole-request statuses
        self.throttle_items = 0  # the next N items answer 429
        self.bulk_requests = 0

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/", self._info)
        app.router.add_post("/_bulk", self._bulk)
        app.router.add_put("/_bulk", self._bulk)

    def stats(self) -> dict[str, Any]:
        docs = [src for d in self.indices.values() for src in d.values()]
        return {"records": len(docs), "bytes": sum(map(len, docs)), "requests": self.bulk_requests}

    def documents(self) -> dict[str, bytes]:
        """``index/_id`` -> source, over every index."""
        with self.lock:
            return {f"{index}/{doc_id}": src for index, docs in self.indices.items() for doc_id, src in docs.items()}

    @staticmethod
    def _error(status: int, kind: str, reason: str) -> web.Response:
        body = {"error": {"root_cause": [{"type": kind, "reason": reason}], "type": kind, "reason": reason},
                "status": status}
        return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")

    def _authenticate(self, request: web.Request, body: bytes) -> web.Response | None:
        if self.user is not None:
            expected = "Basic " + base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
            if request.headers.get("Authorization") != expected:
                return self._error(401, "security_exception", "Unauthorized")
        if self.sigv4 is not None:
            try:
                verify(request.method, request.path, request.query_string, list(request.headers.items()), body,
                       self.sigv4, service="es")
            except AuthError as exc:
                return web.Response(status=403, body=orjson.dumps({"message": exc.message}),
                                    content_type="application/json")
        return None

    async def _info(self, request: web.Request) -> web.Response:
        denied = self._authenticate(request, b"")
        if denied is not None:
            return denied
        return web.json_response({"name": "fake", "cluster_name": "fake",
                                  "version": {"distribution": "opensearch", "number": "2.11.0"}})

    async def _bulk(self, request: web.Request) -> web.Response:
        body = await request.read()
        denied = self._authenticate(request, body)
        if denied is not None:
            return denied
        with self.lock:
            self.bulk_requests += 1
            scripted = self.request_failures.pop(0) if self.request_failures else None
        if scripted is not None:
            return self._error(scripted, "scripted_failure", "scripted failure")
        if not request.headers.get("Content-Type", "").startswith(("application/json", "application/x-ndjson")):
            return self._error(406, "content_type_exception", "Content-Type header is not supported")
        lines = body.split(b"\n")
        if lines and lines[-1] == b"":
            lines.pop()
        else:
            return self._error(400, "illegal_argument_exception", "The bulk request must be terminated by a newline [\\n]")
        items: list[dict[str, Any]] = []
        errors = False
        i = 0
        while i < len(lines):
            try:
                action = orjson.loads(lines[i])
                (op, meta), = action.items()
            except (orjson.JSONDecodeError, ValueError, AttributeError):
                return self._error(400, "illegal_argument_exception", f"Malformed action/metadata line [{i + 1}]")
            if op not in ("index", "create") or i + 1 >= len(lines):
                return self._error(400, "illegal_argument_exception", f"Malformed action/metadata line [{i + 1}]")
            source = lines[i + 1]
            i += 2
            with self.lock:
                self.actions.append(action)
                item = self._index_one(op, meta, source)
            errors = errors or "error" in item
            items.append({op: item})
        return web.Response(body=orjson.dumps({"took": 1, "errors": errors, "items": items}),
                            content_type="application/json")

    def _index_one(self, op: str, meta: dict[str, Any], source: bytes) -> dict[str, Any]:
        index = meta.get("_index")
        doc_id = meta.get("_id") or uuid.uuid4().hex[:20]
        if not index:
            return {"_id": doc_id, "status": 400, "error": {"type": "action_request_validation_exception",
                                                           "reason": "Validation Failed: 1: index is missing;"}}
        if self.throttle_items > 0:
            self.throttle_items -= 1
            return {"_index": index, "_id": doc_id, "status": 429, "error": {
                "type": "es_rejected_execution_exception", "reason": "rejected execution of coordinating operation"}}
        try:
            doc = orjson.loads(source)
        except orjson.JSONDecodeError as exc:
            return {"_index": index, "_id": doc_id, "status": 400, "error": {
                "type": "mapper_parsing_exception", "reason": f"failed to parse: {exc}"}}
        if not isinstance(doc, dict):
            return {"_index": index, "_id": doc_id, "status": 400, "error": {
                "type": "mapper_parsing_exception", "reason": "failed to parse, document is empty"}}
        mapping = self.mappings.setdefault(index, {})
        for field, value in doc.items():
            kind = _kind(value)
            known = mapping.get(field)
            if known is not None and known != kind and not (known == "text" and kind in ("number", "boolean")):
                return {"_index": index, "_id": doc_id, "status": 400, "error": {
                    "type": "mapper_parsing_exception",
                    "reason": f"failed to parse field [{field}] of type [{known}] in document with id '{doc_id}'"}}
        for field, value in doc.items():
            mapping.setdefault(field, _kind(value))
        docs = self.indices.setdefault(index, {})
        if op == "create" and doc_id in docs:
            return {"_index": index, "_id": doc_id, "status": 409, "error": {
                "type": "version_conflict_engine_exception", "reason": f"[{doc_id}]: document already exists"}}
        version = self.versions.get((index, doc_id), 0) + 1
        self.versions[(index, doc_id)] = version
        created = doc_id not in docs
        docs[doc_id] = source
        return {"_index": index, "_id": doc_id, "_version": version, "result": "created" if created else "updated",
                "_shards": {"total": 2, "successful": 1, "failed": 0}, "status": 201 if created else 200}
