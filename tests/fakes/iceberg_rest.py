"""An Iceberg REST catalog (the Apache Iceberg REST catalog protocol, the subset a writer uses)
in front of a real pyiceberg SQL catalog: no REST catalog server runs here (Polaris, Nessie,
Lakekeeper are JVM or native services), so this one speaks the protocol and leaves every catalog
decision to pyiceberg's SqlCatalog: loading a table, checking a commit's requirements against
the table's current metadata, writing the new metadata file, and refusing a stale commit.

Routes (``/v1`` prefix, as the specification's OpenAPI document names them):

* ``GET /v1/config``: no defaults, no overrides;
* ``GET /v1/namespaces/{ns}/tables/{table}``: LoadTableResult (``metadata-location``,
  ``metadata``), or 404 with the error model (``NoSuchTableException``);
* ``POST /v1/namespaces/{ns}/tables/{table}``: CommitTableRequest (``requirements``,
  ``updates``) -> CommitTableResponse, or 409 ``CommitFailedException`` when a requirement no
  longer holds, 404 when the table is gone.

With ``token`` set, every request must carry ``Authorization: Bearer <token>`` (else 401).
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from fakes.server import ThreadedServer


def _error(status: int, kind: str, message: str) -> web.Response:
    return web.json_response({"error": {"message": message, "type": kind, "code": status}}, status=status)


class IcebergRestCatalog(ThreadedServer):
    def __init__(self, sql_properties: dict[str, str], *, token: str | None = None, port: int | None = None) -> None:
        super().__init__(port)
        from pyiceberg.catalog import load_catalog

        self.catalog = load_catalog("default", **sql_properties)
        self.token = token
        self.requests: list[tuple[str, str]] = []  # (method, path) received
        self.commits = 0

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/v1/config", self._config)
        app.router.add_get("/v1/namespaces/{ns}/tables/{table}", self._load)
        app.router.add_post("/v1/namespaces/{ns}/tables/{table}", self._commit)

    async def _guard(self, request: web.Request) -> web.Response | None:
        with self.lock:
            self.requests.append((request.method, request.path))
        if self.token is not None and request.headers.get("Authorization") != f"Bearer {self.token}":
            return _error(401, "NotAuthorizedException", "Not authorized")
        return None

    async def _config(self, request: web.Request) -> web.Response:
        return await self._guard(request) or web.json_response({"defaults": {}, "overrides": {}})

    def _identifier(self, request: web.Request) -> tuple[str, ...]:
        # A multi-level namespace is joined by the unit separator (0x1F) in the path.
        return (*request.match_info["ns"].split("\x1f"), request.match_info["table"])

    async def _load(self, request: web.Request) -> web.Response:
        refused = await self._guard(request)
        if refused is not None:
            return refused
        from pyiceberg.exceptions import NoSuchTableError

        try:
            table = await asyncio.to_thread(self.catalog.load_table, self._identifier(request))
        except NoSuchTableError as exc:
            return _error(404, "NoSuchTableException", str(exc))
        return self._table_response(table.metadata_location, table.metadata)

    async def _commit(self, request: web.Request) -> web.Response:
        refused = await self._guard(request)
        if refused is not None:
            return refused
        from pyiceberg.exceptions import CommitFailedException, NoSuchTableError
        from pyiceberg.table import CommitTableRequest

        body = CommitTableRequest.model_validate_json(await request.read())

        def commit() -> Any:
            table = self.catalog.load_table(self._identifier(request))
            return self.catalog.commit_table(table, body.requirements, body.updates)

        try:
            response = await asyncio.to_thread(commit)
        except NoSuchTableError as exc:
            return _error(404, "NoSuchTableException", str(exc))
        except CommitFailedException as exc:
            return _error(409, "CommitFailedException", str(exc))
        with self.lock:
            self.commits += 1
        return self._table_response(response.metadata_location, response.metadata)

    @staticmethod
    def _table_response(location: str, metadata: Any) -> web.Response:
        doc = {"metadata-location": location, "metadata": metadata.model_dump(mode="json", by_alias=True),
               "config": {}}
        return web.json_response(doc)
