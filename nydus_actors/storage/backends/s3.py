"""The `s3` backend: path-style S3 objects `<bucket>/<prefix><blob_id>`, SigV4-signed by botocore (§7.5).

nydusd names this backend `oss` in its metrics, so `backend_type` says so too.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from urllib.parse import quote, urlsplit

from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from urllib3.connectionpool import HTTPConnectionPool
from urllib3.exceptions import HTTPError
from urllib3.response import BaseHTTPResponse

from nydus_actors.storage.backends.http_proxy import RangedHttpBackend, pool_manager, status_temporary

logger = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "s3.amazonaws.com"
#: Enough of an error body to hold S3's `<Code>` and `<Message>`.
ERROR_BODY_LIMIT = 4096
_XML_FIELD = re.compile(r"<(Code|Message|BucketName)>([^<]*)</\1>")


class S3Backend(RangedHttpBackend):
    """Reads blobs from an S3-compatible object store with `HEAD` and ranged `GET`.

    Requests are signed with AWS SigV4 when `access_key_id` or `access_key_secret` is set and sent
    anonymously otherwise.

    Args:
        backend_id: the id the metrics are keyed by.
        settings: the `s3` section from `FsConfig.backend()`.
        on_failure: called with one line when a read fails for good.
    """

    backend_type = "oss"

    def __init__(
        self, backend_id: str, settings: dict, *, on_failure: Callable[[str], None] | None = None
    ) -> None:
        super().__init__(backend_id, settings, on_failure=on_failure)
        endpoint = str(settings.get("endpoint") or DEFAULT_ENDPOINT).rstrip("/")
        # An endpoint written as a URL brings its own scheme; nydusd would glue a second one in front.
        base = endpoint if "://" in endpoint else f"{settings.get('scheme') or 'https'}://{endpoint}"
        self._base = base
        self._host = urlsplit(base).netloc
        self._bucket = str(settings.get("bucket_name", ""))
        self._prefix = str(settings.get("object_prefix", ""))
        self._region = str(settings.get("region", ""))
        key_id = str(settings.get("access_key_id", ""))
        secret = str(settings.get("access_key_secret", ""))
        self._credentials = Credentials(key_id, secret) if key_id or secret else None
        self._manager = pool_manager(settings)
        self._pool: HTTPConnectionPool = self._manager.connection_from_url(base)
        logger.debug(
            "s3 backend %s reads blobs from %s/%s/%s (%s)",
            backend_id,
            base,
            self._bucket,
            self._prefix,
            "signed" if self._credentials else "anonymous",
        )

    def _target(self, blob_id: str) -> str:
        # S3 canonical URIs keep `/` and `~`; everything else outside the unreserved set is escaped once.
        return "/" + quote(f"{self._bucket}/{self._prefix}{blob_id}", safe="/~")

    def _prepare(
        self, method: str, blob_id: str, headers: dict[str, str]
    ) -> tuple[HTTPConnectionPool, str, dict[str, str]]:
        target = self._target(blob_id)
        # Sign exactly the Host urllib3 will send, so the canonical request matches on the server.
        headers = {"Host": self._host, **headers}
        if self._credentials is None:
            return self._pool, target, headers
        request = AWSRequest(method=method, url=self._base + target, headers=headers)
        # S3SigV4Auth is SigV4Auth for S3: no path normalization, x-amz-content-sha256 of the empty body.
        S3SigV4Auth(self._credentials, "s3", self._region).add_auth(request)
        return self._pool, target, dict(request.headers.items())

    def _where(self, blob_id: str) -> str:
        return f"{self._base}/{self._bucket} (key {self._prefix}{blob_id})"

    def _status_cause(self, resp: BaseHTTPResponse) -> tuple[str, bool]:
        cause = f"HTTP {resp.status} {resp.reason or ''}".rstrip()
        try:
            body = resp.read(ERROR_BODY_LIMIT).decode("utf-8", "replace")
        except (HTTPError, OSError):
            body = ""
        fields = dict(_XML_FIELD.findall(body))
        code = fields.get("Code") or resp.headers.get("x-amz-error-code", "")
        if code:
            cause += f" {code}"
        if fields.get("Message"):
            cause += f": {fields['Message']}"
        elif resp.status == 404 and not code:
            # HEAD errors carry no body, so S3 cannot say whether the bucket or the key is missing.
            cause += f" (no such bucket {self._bucket!r} or no such key)"
        return cause, status_temporary(resp.status) or code in ("RequestTimeout", "SlowDown")

    def close(self) -> None:
        """Close the pooled connections."""
        self._pool.close()
        self._manager.clear()
