"""A real S3 API on loopback for the storage tests: moto's standalone server, in a process of
its own, plus an independent check of presigned URLs.

What moto checks (moto 5.2, tried here): by default nothing: any signature, expired or not,
is accepted. With IAM authentication on (`POST /moto-api/reset-auth`), header-signed requests
are verified against IAM access keys, but a presigned (query-signed) GET fails with a 500
(moto reads only the Authorization header). So the tests check presigned URLs themselves with
botocore's SigV4 implementation (AWS's own, independent of obstore, which made them).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import httpx

REGION = "us-east-1"
ACCESS_KEY = "AKIAIMAGEGATETEST"
SECRET_KEY = "imagegate-test-secret"


@dataclass(frozen=True)
class S3Server:
    endpoint: str

    def bucket(self) -> str:
        """A fresh, empty bucket: tests share the server, never a bucket."""
        name = f"test-{uuid.uuid4().hex[:16]}"
        httpx.put(f"{self.endpoint}/{name}", timeout=10).raise_for_status()
        return name

    def make_public(self, bucket: str) -> None:
        """Let anyone GET its objects, as a bucket behind a CDN (or public) is."""
        policy = {
            "Version": "2012-10-17",
            "Statement": [
                {
                    "Effect": "Allow",
                    "Principal": "*",
                    "Action": "s3:GetObject",
                    "Resource": f"arn:aws:s3:::{bucket}/*",
                }
            ],
        }
        response = httpx.put(
            f"{self.endpoint}/{bucket}?policy", content=json.dumps(policy), timeout=10
        )
        response.raise_for_status()

    def iam_key(self) -> tuple[str, str]:
        """An IAM user allowed s3:* and an access key of it: (key id, secret)."""
        import boto3

        iam = boto3.client(
            "iam",
            endpoint_url=self.endpoint,
            region_name=REGION,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
        )
        user = f"u{uuid.uuid4().hex[:12]}"
        iam.create_user(UserName=user)
        policy = {
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
        }
        iam.put_user_policy(UserName=user, PolicyName="s3", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName=user)["AccessKey"]
        return key["AccessKeyId"], key["SecretAccessKey"]

    def require_signatures(self) -> None:
        """From now on this server verifies every header-signed request (not presigned ones)."""
        response = httpx.post(f"{self.endpoint}/moto-api/reset-auth", content=b"0", timeout=10)
        response.raise_for_status()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def moto_server() -> Iterator[S3Server]:
    """moto's S3 server on 127.0.0.1, stopped on exit."""
    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=_die_with_parent if sys.platform == "linux" else None,
    )
    server = S3Server(f"http://127.0.0.1:{port}")
    try:
        _wait_until_up(server.endpoint, process)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _die_with_parent() -> None:
    """The server stops by itself even when the test process is killed (no finalizer runs)."""
    pr_set_pdeathsig = 1
    ctypes.CDLL(None).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _wait_until_up(endpoint: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"moto's server exited with {process.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            httpx.get(f"{endpoint}/moto-api/data.json", timeout=1)
            return
        time.sleep(0.1)
    raise RuntimeError("moto's server did not start within 30 s")


# ---------------------------------------------------------------- presigned URLs


def presign_verdict(url: str, secret: str = SECRET_KEY, *, now: datetime | None = None) -> str:
    """What S3 answers a presigned GET, decided as S3 does: "expired" past X-Amz-Date +
    X-Amz-Expires, "bad signature" when the signature is not the SigV4 signature of the rest
    of the URL under `secret`, else "ok"."""
    from botocore.auth import S3SigV4QueryAuth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    parts = urlsplit(url)
    params = parse_qsl(parts.query, keep_blank_values=True)
    query = dict(params)
    signed_at = datetime.strptime(query["X-Amz-Date"], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    if signed_at + timedelta(seconds=int(query["X-Amz-Expires"])) < (now or datetime.now(UTC)):
        return "expired"
    key_id, _, region, _, _ = query["X-Amz-Credential"].split("/")
    unsigned = [(k, v) for k, v in params if k != "X-Amz-Signature"]
    request = AWSRequest(method="GET", url=urlunsplit(parts._replace(query=urlencode(unsigned))))
    request.context["timestamp"] = query["X-Amz-Date"]
    auth = S3SigV4QueryAuth(
        Credentials(key_id, secret), "s3", region, expires=int(query["X-Amz-Expires"])
    )
    expected = auth.signature(
        auth.string_to_sign(request, auth.canonical_request(request)), request
    )
    return "ok" if expected == query.get("X-Amz-Signature") else "bad signature"
