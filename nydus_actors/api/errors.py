"""The one place where errors become HTTP statuses and nydusd error bodies.

A nydusd error message nests the route's variant, the API layer and the error
kind, e.g. `Mount(MountFilesystem(Other("object or filesystem already exists")))`
(reference §1.6). Resources name the first two per method (`Endpoint`); the
error classes of `exceptions.py` render the kind.
"""

from __future__ import annotations

import json
import logging

import falcon
import pykka

from nydus_actors.api.bodies import BAD_REQUEST, BodyError
from nydus_actors.exceptions import (
    NoCounter,
    NotReady,
    NydusError,
    OtherError,
    ResponsePayloadType,
    UnexpectedEvent,
    Unsupported,
)

logger = logging.getLogger(__name__)

CODE = "UNDEFINED"

#: Status by error class; the first class in an error's MRO that is listed wins.
STATUS_BY_ERROR: dict[type[NydusError], str] = {
    NotReady: falcon.HTTP_503,
    Unsupported: falcon.HTTP_501,
    UnexpectedEvent: falcon.HTTP_400,
    NoCounter: falcon.HTTP_404,
    NydusError: falcon.HTTP_500,
}


def status_of(error: NydusError) -> str:
    """Return the HTTP status nydusd gives this error (`translate_status_code`)."""
    for cls in type(error).__mro__:
        if cls in STATUS_BY_ERROR:
            return STATUS_BY_ERROR[cls]
    return falcon.HTTP_500


def render(wrapper: str, layer: str, error: NydusError) -> str:
    """Return the nested Debug text of an operation error on a route."""
    if isinstance(error, ResponsePayloadType):
        return f"{wrapper}(ResponsePayloadType)"
    if isinstance(error, NoCounter):
        return f"{wrapper}(Metrics({error.debug()}))"
    if layer == "Metrics":
        return f"{wrapper}(Metrics(Daemon({error.debug()})))"
    return f"{wrapper}({layer}({error.debug()}))"


def set_error(resp: falcon.Response, status: str, message: str) -> None:
    """Write a nydusd error reply."""
    resp.status = status
    resp.content_type = falcon.MEDIA_JSON
    resp.text = json.dumps({"code": CODE, "message": message})


def _endpoint_names(req: falcon.Request) -> tuple[str, str]:
    endpoint = getattr(req.context, "endpoint", None)
    if endpoint is None:
        return "Configure", "DaemonAbnormal"
    return endpoint.wrapper, endpoint.layer


def handle_nydus_error(req: falcon.Request, resp: falcon.Response, ex: NydusError, params: dict) -> None:
    """Map an operation error to its status and nested message."""
    del params
    wrapper, layer = _endpoint_names(req)
    set_error(resp, status_of(ex), render(wrapper, layer, ex))


def handle_body_error(req: falcon.Request, resp: falcon.Response, ex: BodyError, params: dict) -> None:
    """Handler-level errors (method, body, query) are always 400."""
    del req, params
    set_error(resp, falcon.HTTP_400, ex.message)


def handle_actor_error(req: falcon.Request, resp: falcon.Response, ex: Exception, params: dict) -> None:
    """An actor that did not answer in time, or is gone, means not ready (503)."""
    del params
    wrapper, layer = _endpoint_names(req)
    logger.error("no answer from the daemon for %s %s: %r", req.method, req.path, ex)
    set_error(resp, falcon.HTTP_503, render(wrapper, layer, NotReady()))


def handle_http_error(req: falcon.Request, resp: falcon.Response, ex: falcon.HTTPError, params: dict) -> None:
    """Falcon's routing errors in nydusd's words: 404 `NoRoute`, 400 `BadRequest`."""
    del req, params
    if isinstance(ex, falcon.HTTPNotFound):
        set_error(resp, falcon.HTTP_404, "NoRoute")
    elif isinstance(ex, falcon.HTTPMethodNotAllowed):
        set_error(resp, falcon.HTTP_400, BAD_REQUEST)
    else:
        set_error(resp, ex.status, ex.title if ex.description is None else ex.description)


def handle_unexpected(req: falcon.Request, resp: falcon.Response, ex: Exception, params: dict) -> None:
    """A bug: log it and answer 500 without taking the daemon down."""
    del params
    logger.exception("failed to handle %s %s", req.method, req.path)
    wrapper, layer = _endpoint_names(req)
    set_error(resp, falcon.HTTP_500, render(wrapper, layer, OtherError(f"internal error: {ex!r}")))


def install(app: falcon.App) -> None:
    """Register the handlers; falcon picks the most specific class."""
    app.add_error_handler(Exception, handle_unexpected)
    app.add_error_handler(falcon.HTTPError, handle_http_error)
    app.add_error_handler(BodyError, handle_body_error)
    app.add_error_handler(NydusError, handle_nydus_error)
    app.add_error_handler(pykka.Timeout, handle_actor_error)
    app.add_error_handler(pykka.ActorDeadError, handle_actor_error)
