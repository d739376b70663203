"""The S3 driver's clients (``storage/s3.py``): boto3's, with timeouts and retries of their own.

Timeouts (botocore's own are 60 s to connect and 60 s per read, which a hung store -- its
connections accepted, nothing answered -- made every request wait out, retries on top): the driver
has four clients, each with botocore's ``standard`` retries (a connection error, a timeout or a
5xx tried again after a jittered pause of at most a few hundred milliseconds):

* :data:`SMALL` (connect 3 s, read 3 s, 2 attempts): HEAD, LIST, DELETE, the start and abort of a
  multipart upload, and every GET until its answer's headers -- a hung store is reported (``503``)
  within about 6 s.  A GET's body then reads with :data:`BODY_READ` (20 s) per socket read: a large
  object streams for as long as it takes, cut only when the store sends nothing for 20 s;
* :data:`SEND` (connect 5 s, read 20 s, 2 attempts): what sends bytes (a ``PutObject``, an
  ``UploadPart``), which the store answers as soon as it has the last byte -- a hung store is reported
  within about 40 s (with :data:`TRANSFER`'s, a push upload's chunk waited 3 minutes for its ``503``);
* :data:`TRANSFER` (connect 5 s, read 60 s, 3 attempts): what the store answers only once done (a
  multipart upload's completion, a server-side copy of up to 5 GiB in one ``CopyObject``, the metadata
  rewrite of ``touch``);
* :data:`PROBE` (connect 2 s, read 2 s, 1 attempt): ``/readyz``'s HEAD of the bucket, within a
  probe's usual 5 s timeout.

Once a request timed out, and neither another request nor a HEAD of the bucket made then got an
answer since it was sent, the store is taken as hung: the clients'
:class:`~mirror.storage.s3breaker.Breaker` fails requests at once, but for one every few seconds and
the probe, until the store answers (``storage/s3breaker.py``).

The connect timeout also bounds each block of a request body being sent (urllib3 sends with it).

:func:`settings_problem` reads, in an error, what the ``storage.s3`` settings got wrong (credentials
the store refuses, a bucket that does not exist), in words that name the bucket, the endpoint and the
settings to check, never any part of a key.

Keys read from files (``storage.s3.accesskey_file``, ``secretkey_file``: Docker and Kubernetes secrets)
are read again every :data:`KEY_FILES_REREAD` seconds while the mirror runs (botocore's refreshable
credentials): keys rotated there are taken without a restart.  A file that cannot be read then (being
replaced) leaves the keys last read in use.
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any

import boto3
import boto3.session
import botocore.session
from botocore.config import Config
from botocore.credentials import CredentialProvider, RefreshableCredentials
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionError as SdkConnectionError,
    NoCredentialsError,
    SSLError,
)
from botocore.utils import determine_content_length

from ..observe.serverdir import handed_over
from .driver import StoreSetupError
from .s3breaker import Breaker

if TYPE_CHECKING:
    from .s3options import S3Options


def _no_expect_for_nothing(request: Any, **_: Any) -> None:
    """Send an empty object without ``Expect: 100-continue``: a server that answers such a PUT at once
    (SeaweedFS does) leaves botocore's connection to wait out its read timeout on the next request
    (what botocore's ``BOTO_EXPERIMENTAL__NO_EMPTY_CONTINUE`` does, without an environment variable)."""
    if determine_content_length(request.body) == 0 and "Expect" in request.headers:
        del request.headers["Expect"]


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Seconds one kind of request may wait to connect and per socket read, and its attempts in all."""

    connect: float
    read: float
    attempts: int


#: HEAD, LIST, DELETE, a multipart upload's start and abort, a GET to its headers.
SMALL = Timeouts(connect=3.0, read=3.0, attempts=2)
#: A PutObject or an UploadPart: answered once the store has the last byte.
SEND = Timeouts(connect=5.0, read=20.0, attempts=2)
#: A completion or a server-side copy: answered only once done.
TRANSFER = Timeouts(connect=5.0, read=60.0, attempts=3)
#: ``/readyz``'s HEAD of the bucket.
PROBE = Timeouts(connect=2.0, read=2.0, attempts=1)
#: Seconds one socket read of a GET's body may wait (the request itself is :data:`SMALL`'s).
BODY_READ = 20.0
#: Seconds between two reads of the key files (``storage.s3.accesskey_file``, ``secretkey_file``).
KEY_FILES_REREAD = 30.0
#: The life given to the keys read from files: they are read again long before it ends.
_KEYS_LIFE = 3600.0

log = logging.getLogger("mirror.storage.s3")


def make_client(session: boto3.session.Session, options: S3Options, timeouts: Timeouts = TRANSFER) -> Any:
    """A boto3 S3 client of *session* for *options* (path-style addressing when ``forcepathstyle``)
    with *timeouts*."""
    files = options.key_files != (None, None)  # the session's credentials, read from them again and again
    client = session.client(
        "s3", endpoint_url=options.regionendpoint or None, region_name=options.region,
        aws_access_key_id=None if files else options.accesskey or None,
        aws_secret_access_key=None if files else options.secretkey or None,
        config=Config(s3={"addressing_style": "path" if options.forcepathstyle else "auto"},
                      signature_version="s3v4", max_pool_connections=64,
                      connect_timeout=timeouts.connect, read_timeout=timeouts.read,
                      retries={"mode": "standard", "total_max_attempts": timeouts.attempts},
                      request_checksum_calculation="when_required", response_checksum_validation="when_required"))
    client.meta.events.register("before-sign.s3.PutObject", _no_expect_for_nothing)
    return client


def make_clients(options: S3Options) -> tuple[Any, Any, Any, Any]:
    """The driver's clients: transfers, small requests, ``/readyz``'s probe, and sends (see the module
    docstring).

    With the keys set (``storage.s3.accesskey``), the SDK's profile (``AWS_PROFILE``) is not read: a
    stale one left in the environment does not matter.  Raises :class:`StoreSetupError` if the SDK
    cannot make them (a profile that does not exist, a config file it cannot parse)."""
    try:
        # session_vars: where the SDK finds its profile; none, when the keys are given here.
        unprofiled = {"profile": (None, None, None, None)} if options.accesskey else None
        core = botocore.session.Session(session_vars=unprofiled)
        if options.key_files != (None, None):
            core.get_component("credential_provider").insert_before("env", _KeyFiles(options))
        session = boto3.session.Session(botocore_session=core)
        clients = (make_client(session, options, TRANSFER), make_client(session, options, SMALL),
                   make_client(session, options, PROBE), make_client(session, options, SEND))
    except BotoCoreError as exc:
        raise StoreSetupError(
            f"the AWS SDK cannot make a client for bucket {options.bucket!r}: {exc}: check AWS_PROFILE,"
            " AWS_CONFIG_FILE and AWS_SHARED_CREDENTIALS_FILE (or set storage.s3.accesskey and storage.s3.secretkey,"
            " and the SDK's profile is not read)") from None
    breaker = Breaker(_endpoint(options), lambda: clients[2].head_bucket(Bucket=options.bucket))
    for client in clients:
        breaker.attach(client, probe=client is clients[2])
    return clients


class _KeyFiles(CredentialProvider):  # type: ignore[misc]
    """The keys of ``storage.s3.accesskey_file`` and ``secretkey_file`` (either may be given inline
    instead), read again every :data:`KEY_FILES_REREAD` seconds."""

    METHOD = CANONICAL_NAME = "storage-s3-key-files"

    def __init__(self, options: S3Options) -> None:
        super().__init__()
        self._options = options
        self._last = (options.accesskey, options.secretkey)
        self._said = False

    def load(self) -> RefreshableCredentials:
        return RefreshableCredentials.create_from_metadata(
            self._metadata(*self._last), self._reread, self.METHOD,
            advisory_timeout=_KEYS_LIFE - KEY_FILES_REREAD, mandatory_timeout=0)

    def _reread(self) -> dict[str, Any]:
        try:
            keys = tuple(path.read_text().strip() if path else given
                         for path, given in zip(self._options.key_files, self._last, strict=True))
        except (OSError, UnicodeDecodeError) as exc:
            keys = ()
            problem = getattr(exc, "strerror", None) or str(exc)
        else:
            problem = "a file is empty"
        if len(keys) == 2 and all(keys):
            self._last, self._said = (keys[0], keys[1]), False
        elif not self._said:  # (being replaced, perhaps): the keys last read stay in use
            self._said = True
            log.warning("cannot read storage.s3's key files again (%s): the keys last read stay in use", problem)
        return self._metadata(*self._last)

    @staticmethod
    def _metadata(key: str, secret: str) -> dict[str, Any]:
        expiry = datetime.fromtimestamp(time.time() + _KEYS_LIFE, UTC)
        return {"access_key": key, "secret_key": secret, "token": None, "expiry_time": expiry.isoformat()}


#: S3 error codes of credentials the store refuses: an unknown key, a signature made with another
#: secret, a key that may not do this, a session token not (or no longer) valid; "403" is the bare
#: status of an answer without a body (a HEAD's).
CREDENTIALS_REFUSED = frozenset({"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "InvalidToken",
                                 "ExpiredToken", "RequestTimeTooSkewed", "403"})
#: Seconds a signed request may be off the store's clock (AWS Signature Version 4: 15 minutes).
MAX_SIGNED_SKEW = 900
#: The settings of the keys (either pair), and where the AWS SDK looks when neither is set.
_KEY_SETTINGS = ("storage.s3.accesskey and storage.s3.secretkey (or the files storage.s3.accesskey_file and"
                 " storage.s3.secretkey_file name; MIRROR_STORAGE_S3_* variables override the configuration file,"
                 " but not for mirror migrate, which reads its two files alone)")
_SDK_CHAIN = ("AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE and its ~/.aws/credentials, or the"
              " instance's role")


def _endpoint(options: S3Options) -> str:
    """Where the store's requests go, as messages name it: ``storage.s3.regionendpoint``, else the AWS
    SDK's own setting of it in the environment (botocore's ``AWS_ENDPOINT_URL_S3``, ``AWS_ENDPOINT_URL``)."""
    found = options.regionendpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return found or f"AWS S3 in {options.region}"


def _endpoint_setting(options: S3Options) -> str:
    """The setting :func:`_endpoint` found the endpoint in."""
    if options.regionendpoint:
        return "storage.s3.regionendpoint"
    if found := next((name for name in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL") if os.environ.get(name)), None):
        return f"{found} (the AWS SDK's; storage.s3.regionendpoint, if set, comes first)"
    return "storage.s3.regionendpoint (none is set: AWS S3's) and storage.s3.region"


def unreachable(exc: Exception, options: S3Options) -> str | None:
    """If botocore's *exc* is a failure to connect (refused, timed out, TLS failed: a wrong port or
    scheme, or a store that is down), what it says and which setting of the endpoint to check; else None."""
    if not isinstance(exc, SdkConnectionError):
        return None
    cause = str(getattr(exc, "kwargs", {}).get("error") or exc)
    if isinstance(exc, SSLError):
        found = re.search(r"\[SSL: ([A-Z_]+)\]", cause)
        reason = f"TLS failed: {found.group(1).lower().replace('_', ' ')}" if found else "TLS failed"
    else:
        found = re.search(r"\[Errno -?\d+\] ([^'\")]+)", cause)
        reason = found.group(1).strip().rstrip(".") if found else ("timed out" if "timeout" in cause.lower()
                                                                   else "no connection")
    return (f"cannot connect to {_endpoint(options)} ({reason}): check {_endpoint_setting(options)}: its scheme"
            " (http:// or https://, as the store serves), host and port, and that the store runs there")


def settings_problem(exc: Exception, options: S3Options, what: str) -> str | None:
    """What botocore's *exc* (raised by *what*: ``"HEAD of the bucket"``) says is wrong with the
    ``storage.s3`` settings, or None if it says nothing of them (the store is down, an object is
    missing): credentials refused, a bucket that does not exist, no credentials at all."""
    endpoint = _endpoint(options)
    if isinstance(exc, NoCredentialsError):
        return (f"no credentials for bucket {options.bucket!r} at {endpoint} ({what}): storage.s3.accesskey is not"
                f" set and the AWS SDK found none ({_SDK_CHAIN}): set {_KEY_SETTINGS}")
    if not isinstance(exc, ClientError):
        return None
    code = str(exc.response.get("Error", {}).get("Code"))
    shown = f"HTTP {code}" if code.isdigit() else code  # a bare status: the answer had no body (a HEAD's)
    if code == "NoSuchBucket" or (code in ("404", "NotFound") and exc.operation_name == "HeadBucket"):
        return (f"bucket {options.bucket!r} does not exist at {endpoint} ({shown}, {what}): create it, or correct"
                " storage.s3.bucket (or storage.s3.regionendpoint); the mirror never creates a bucket")
    if code not in CREDENTIALS_REFUSED:
        return None
    skew = answer_skew(exc.response)
    if code == "RequestTimeTooSkewed" or (skew is not None and abs(skew) > MAX_SIGNED_SKEW):
        off = f" {skew:+.0f}s" if skew is not None else ""
        return (f"the object store at {endpoint} refused a request of this host ({shown}, {what}), whose clock is{off}"
                f" off its own: S3 refuses requests signed more than {MAX_SIGNED_SKEW // 60} minutes off its clock;"
                " keep the hosts' clocks synchronized (NTP)")
    named = any(path is not None and not handed_over(path) for path in options.key_files)  # not inline keys'
    files = "" if not named else (
        f" (keys written to those files are taken within {KEY_FILES_REREAD:g} s, without a restart)")
    check = f"check {_KEY_SETTINGS}{files}" if options.accesskey else (
        f"storage.s3.accesskey is not set, so the AWS SDK's own credentials were used: check {_SDK_CHAIN}"
        " (or set storage.s3.accesskey and storage.s3.secretkey)")
    return (f"the object store at {endpoint} refused the credentials for bucket {options.bucket!r} ({shown}, {what}):"
            f" {check}, and that the key may use the bucket")


def answer_skew(response: dict[str, Any]) -> float | None:
    """Seconds this host's clock is ahead of the store's (behind: negative), by the ``Date`` of one of
    its answers (RFC 9110 section 6.6.1; one second's precision), or None if it has none."""
    date = response.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
    try:
        return time.time() - parsedate_to_datetime(date).timestamp() if date else None
    except (TypeError, ValueError):
        return None
