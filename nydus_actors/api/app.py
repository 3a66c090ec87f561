"""The falcon application: nydusd's route table over the `Daemon` actor.

Resources only check the request shape (method, body, query), call one
`Daemon` message and wait for its answer; every error goes through
`api/errors.py`. Shape checks follow nydusd's handlers (reference §2): a route
answers 400 `BadRequest` for a method it lacks, for a body where none is
expected and for a missing body; "no body" and `Content-Length: 0` are the same.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar
from urllib.parse import parse_qsl

import falcon

from nydus_actors.api import bodies, errors
from nydus_actors.api.bodies import BodyError
from nydus_actors.config import blob_entry_config
from nydus_actors.exceptions import InvalidArgument
from nydus_actors.models import FS_TYPE_BY_NAME, MountCmd

logger = logging.getLogger(__name__)

#: Longest wait for the daemon's answer; beyond it the reply is 503.
API_TIMEOUT = 60.0
#: nydusd's request-body limit (dbs-uhttp `MAX_PAYLOAD_SIZE`).
MAX_BODY = 51_200
#: Methods dbs-uhttp can parse at all; others fail before routing.
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"})
#: Content types dbs-uhttp accepts on a request.
ACCEPTED_CONTENT_TYPES = frozenset({"application/json", "text/plain"})


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One method of a route: its handler, body rule and error wrapper names."""

    handler: str  # name of the resource method
    body: bool  # True: a body is required; False: no body allowed
    wrapper: str  # nydusd `HttpError` variant
    layer: str = "DaemonAbnormal"  # ApiError variant inside it


def _query(req: falcon.Request) -> dict[str, str]:
    """Parse the query like the `url` crate: percent-decoding, `+`, first key wins."""
    result: dict[str, str] = {}
    for key, value in parse_qsl(req.query_string, keep_blank_values=True):
        result.setdefault(key, value)
    return result


def _read_body(req: falcon.Request) -> bytes:
    length = req.content_length or 0
    return req.bounded_stream.read(length) if length else b""


class Resource:
    """Dispatches every method through nydusd's shape checks to a handler."""

    endpoints: ClassVar[dict[str, Endpoint]] = {}
    #: Required query parameter checked before the method (nydusd's `/mount` order).
    query_first: str | None = None

    def __init__(self, daemon: Any, wait: Callable[[Any], Any]) -> None:
        self._daemon = daemon
        self._wait = wait

    def _dispatch(self, req: falcon.Request, resp: falcon.Response) -> None:
        query = _query(req)
        if self.query_first is not None and self.query_first not in query:
            raise bodies.query_missing(self.query_first)
        endpoint = self.endpoints.get(req.method)
        if endpoint is None:
            raise bodies.bad_request()
        body = _read_body(req)
        if bool(body) != endpoint.body:
            raise bodies.bad_request()
        req.context.endpoint = endpoint
        result = getattr(self, endpoint.handler)(req, query, body)
        if result is None:
            resp.status = falcon.HTTP_204
        else:
            resp.status = falcon.HTTP_200
            resp.content_type = falcon.MEDIA_JSON
            resp.text = json.dumps(result)

    on_get = on_put = on_post = on_delete = on_patch = on_head = _dispatch


class DaemonResource(Resource):
    """`/api/v{1,2}/daemon`: daemon info and log level."""

    endpoints: ClassVar[dict[str, Endpoint]] = {
        "GET": Endpoint("get", body=False, wrapper="DaemonInfo"),
        "PUT": Endpoint("put", body=True, wrapper="Configure"),
    }

    def __init__(self, daemon: Any, wait: Callable[[Any], Any], *, v2: bool) -> None:
        super().__init__(daemon, wait)
        self._v2 = v2

    def get(self, req: falcon.Request, query: dict, body: bytes) -> Any:
        return self._wait(self._daemon.info(v2=self._v2))

    def put(self, req: falcon.Request, query: dict, body: bytes) -> None:
        conf = bodies.decode_struct(body, "DaemonConf", bodies.DAEMON_CONF)
        self._wait(self._daemon.configure(conf["log_level"]))


class EventsResource(Resource):
    endpoints: ClassVar[dict[str, Endpoint]] = {"GET": Endpoint("get", body=False, wrapper="Events")}

    def get(self, req: falcon.Request, query: dict, body: bytes) -> Any:
        return self._wait(self._daemon.events())


class BackendInfoResource(Resource):
    endpoints: ClassVar[dict[str, Endpoint]] = {
        "GET": Endpoint("get", body=False, wrapper="FsBackendInfo", layer="Metrics")
    }

    def get(self, req: falcon.Request, query: dict, body: bytes) -> Any:
        if "mountpoint" not in query:
            raise bodies.query_missing("mountpoint")
        return self._wait(self._daemon.backend_info(query["mountpoint"]))


class ActionResource(Resource):
    """A PUT without body that triggers one daemon action (start, exit, sendfd, takeover)."""

    def __init__(self, daemon: Any, wait: Callable[[Any], Any], *, action: str, wrapper: str) -> None:
        super().__init__(daemon, wait)
        self._action = action
        self.endpoints = {"PUT": Endpoint("put", body=False, wrapper=wrapper)}

    def put(self, req: falcon.Request, query: dict, body: bytes) -> None:
        self._wait(getattr(self._daemon, self._action)())


class MountResource(Resource):
    """`/api/v1/mount`: mount, remount and umount a filesystem instance."""

    query_first = "mountpoint"
    endpoints: ClassVar[dict[str, Endpoint]] = {
        "POST": Endpoint("post", body=True, wrapper="Mount", layer="MountFilesystem"),
        "PUT": Endpoint("put", body=True, wrapper="Mount", layer="MountFilesystem"),
        "DELETE": Endpoint("delete", body=False, wrapper="Mount", layer="MountFilesystem"),
    }

    @staticmethod
    def _command(query: dict, body: bytes) -> MountCmd:
        fields = bodies.decode_struct(body, "ApiMountCmd", bodies.MOUNT_CMD)
        name = fields.get("fs_type", "")
        fs_type = FS_TYPE_BY_NAME.get(name)
        if fs_type is None:
            raise InvalidArgument(f"only 'rafs' and 'passthrough_fs' are supported, but {name} was specified")
        return MountCmd(
            fs_type=fs_type,
            source=fields["source"],
            config=fields["config"],
            mountpoint=query["mountpoint"],
            prefetch_files=tuple(fields.get("prefetch_files") or ()),
        )

    def post(self, req: falcon.Request, query: dict, body: bytes) -> None:
        self._wait(self._daemon.mount(self._command(query, body)))

    def put(self, req: falcon.Request, query: dict, body: bytes) -> None:
        self._wait(self._daemon.remount(self._command(query, body)))

    def delete(self, req: falcon.Request, query: dict, body: bytes) -> None:
        self._wait(self._daemon.umount(query["mountpoint"]))


class MetricsResource(Resource):
    """A `GET /api/v1/metrics[/kind]?id=` route."""

    def __init__(self, daemon: Any, wait: Callable[[Any], Any], *, kind: str, wrapper: str) -> None:
        super().__init__(daemon, wait)
        self._kind = kind
        self.endpoints = {"GET": Endpoint("get", body=False, wrapper=wrapper, layer="Metrics")}

    def get(self, req: falcon.Request, query: dict, body: bytes) -> Any:
        latest = query.get("latest") == "true"  # Rust `parse::<bool>()`: only "true" is true
        return self._wait(self._daemon.metrics(self._kind, query.get("id"), latest=latest))


class InflightResource(Resource):
    endpoints: ClassVar[dict[str, Endpoint]] = {
        "GET": Endpoint("get", body=False, wrapper="InflightMetrics", layer="Metrics")
    }

    def get(self, req: falcon.Request, query: dict, body: bytes) -> Any:
        busy = self._wait(self._daemon.inflight())
        if not busy:
            return None  # nydusd answers 204 when no request is in flight
        return [
            {"inode": r.inode, "opcode": r.opcode, "unique": r.unique, "timestamp_secs": r.timestamp_secs}
            for r in busy
        ]


class ConfigResource(Resource):
    """`/api/v1/config`: runtime backend settings keyed by id."""

    endpoints: ClassVar[dict[str, Endpoint]] = {
        "GET": Endpoint("get", body=False, wrapper="Configure"),
        "PUT": Endpoint("put", body=True, wrapper="Configure"),
    }

    def get(self, req: falcon.Request, query: dict, body: bytes) -> Any:
        return self._wait(self._daemon.get_config(query.get("id")))

    def put(self, req: falcon.Request, query: dict, body: bytes) -> None:
        items = bodies.decode_string_map(body)
        self._wait(self._daemon.set_config(query.get("id", ""), items))


class BlobsResource(Resource):
    """`/api/v2/blobs`: blob objects of the blob cache manager."""

    endpoints: ClassVar[dict[str, Endpoint]] = {
        "GET": Endpoint("get", body=False, wrapper="GetBlobObjects"),
        "PUT": Endpoint("put", body=True, wrapper="CreateBlobObject"),
        "DELETE": Endpoint("delete", body=False, wrapper="DeleteBlobObject"),
    }

    def get(self, req: falcon.Request, query: dict, body: bytes) -> Any:
        if "domain_id" not in query:
            raise bodies.bad_request()
        return self._wait(self._daemon.get_blobs(query["domain_id"], query.get("blob_id")))

    def put(self, req: falcon.Request, query: dict, body: bytes) -> None:
        entry = bodies.decode_struct(body, "BlobCacheEntry", bodies.BLOB_CACHE_ENTRY)
        try:
            config = blob_entry_config(entry)
        except (ValueError, TypeError, AttributeError):
            raise bodies.bad_request() from None  # nydusd: prepare_configuration_info() failed
        self._wait(self._daemon.create_blob(entry["type"], entry["id"], entry.get("domain_id", ""), config))

    def delete(self, req: falcon.Request, query: dict, body: bytes) -> None:
        if "domain_id" in query:
            self._wait(self._daemon.delete_blobs(query["domain_id"], query.get("blob_id")))
        elif "blob_id" in query:
            # nydusd treats a blob-file delete as its own request kind in error texts
            req.context.endpoint = Endpoint("delete", body=False, wrapper="DeleteBlobFile")
            self._wait(self._daemon.delete_blob_file(query["blob_id"]))
        else:
            raise bodies.bad_request()


class NydusMiddleware:
    """Request framing nydusd's HTTP library does: methods, content type, size, headers, logs."""

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        req.context.started = time.perf_counter()
        if req.method not in KNOWN_METHODS:
            raise BodyError(f"Invalid HTTP Method: {req.method}")
        if req.content_type:
            media = req.content_type.split(";", 1)[0].strip().lower()
            if media not in ACCEPTED_CONTENT_TYPES:
                raise BodyError(f"Invalid header. Reason: unsupported content type {req.content_type}")
        length = req.content_length or 0
        if length > MAX_BODY:
            raise BodyError(
                f"Request payload with size {length} is larger than the limit of {MAX_BODY} "
                "allowed by server."
            )

    def process_response(
        self, req: falcon.Request, resp: falcon.Response, resource: object, req_succeeded: bool
    ) -> None:
        del resource, req_succeeded
        resp.set_header("Server", "Nydus API")
        if resp.status == falcon.HTTP_204 or resp.status_code == 204:
            resp.text = None
            resp.data = None
            resp.content_type = None
        if logger.isEnabledFor(logging.INFO):
            elapsed = (time.perf_counter() - req.context.started) * 1000
            size = len(resp.text.encode()) if resp.text else 0
            logger.info(
                "API %s %s %s %.2fms %dB", req.method, req.relative_uri, resp.status_code, elapsed, size
            )


def create_app(daemon: Any, *, timeout: float = API_TIMEOUT) -> falcon.App:
    """Build the WSGI app serving nydusd's routes over a `Daemon` proxy."""

    def wait(future: Any) -> Any:
        return future.get(timeout=timeout)

    app = falcon.App(middleware=[NydusMiddleware()], media_type=falcon.MEDIA_JSON)
    errors.install(app)
    routes = {
        "/api/v1/daemon": DaemonResource(daemon, wait, v2=False),
        "/api/v1/daemon/events": EventsResource(daemon, wait),
        "/api/v1/daemon/backend": BackendInfoResource(daemon, wait),
        "/api/v1/daemon/start": ActionResource(daemon, wait, action="do_start", wrapper="Configure"),
        "/api/v1/daemon/exit": ActionResource(daemon, wait, action="do_exit", wrapper="Configure"),
        "/api/v1/daemon/fuse/sendfd": ActionResource(daemon, wait, action="do_send_fd", wrapper="Upgrade"),
        "/api/v1/daemon/fuse/takeover": ActionResource(daemon, wait, action="do_takeover", wrapper="Upgrade"),
        "/api/v1/mount": MountResource(daemon, wait),
        "/api/v1/metrics": MetricsResource(daemon, wait, kind="global", wrapper="GlobalMetrics"),
        "/api/v1/metrics/files": MetricsResource(daemon, wait, kind="files", wrapper="FsFilesMetrics"),
        "/api/v1/metrics/pattern": MetricsResource(daemon, wait, kind="pattern", wrapper="Pattern"),
        "/api/v1/metrics/backend": MetricsResource(daemon, wait, kind="backend", wrapper="BackendMetrics"),
        "/api/v1/metrics/blobcache": MetricsResource(
            daemon, wait, kind="blobcache", wrapper="BlobcacheMetrics"
        ),
        "/api/v1/metrics/inflight": InflightResource(daemon, wait),
        "/api/v1/config": ConfigResource(daemon, wait),
        "/api/v2/daemon": DaemonResource(daemon, wait, v2=True),
        "/api/v2/blobs": BlobsResource(daemon, wait),
    }
    for path, resource in routes.items():
        app.add_route(path, resource)
    return app
