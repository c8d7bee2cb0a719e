"""Python SDK for Weir modules (module protocol version 1).

A Weir *module* is an operator that runs outside the ``weir`` process. The runtime and
the module exchange Apache Arrow record batches over plain HTTP/1.1, on a Unix socket by
default and on TCP as a fallback; ``docs/module-protocol.md`` is the specification this
file implements. With this SDK a module is just a Python function from a batch to
batches::

    import weir_module

    def double(batch):
        return batch  # any pyarrow.RecordBatch(es) in the declared output schema

    weir_module.serve_transform(double)

Public API:

* :func:`serve_transform` -- answer ``POST /v1/batches`` with the batches a function
  returns, until SIGTERM/SIGINT.
* :func:`serve_sink` -- the same for a function whose output is ignored (answers an
  empty ``200``).
* :func:`run_source` -- push every batch a generator yields to the runtime, retrying
  ``503`` and broken connections, while serving ``GET /v1/health``.
* :func:`set_healthy` / :func:`is_healthy` -- what ``GET /v1/health`` answers.
* :class:`BadBatch` -- raise it from a module function to reject a batch for good
  (``400``: the runtime dead-letters it instead of retrying).
* :class:`BatchRejected` -- raised by :func:`run_source` when the runtime answers ``4xx``.
* :class:`ConfigError` -- the ``WEIR_*`` environment is missing or contradictory.
* :func:`read_stream` / :func:`write_stream` -- Arrow IPC stream bodies to and from bytes.

The only dependencies are the Python standard library and ``pyarrow``, so the file can
be copied next to a module and run wherever pyarrow is installed (written for Python
3.9+, tested on 3.11). Logs go to stderr, one line per event, so a supervisor that
captures stderr line by line (the runtime, Docker) never splits an entry.
"""

from __future__ import annotations

import http.client
import http.server
import inspect
import logging
import os
import signal
import socket
import socketserver
import stat
import sys
import threading
import time
import traceback
from typing import Any, Callable, Iterable, Optional, Union

import pyarrow as pa

__all__ = [
    "ARROW_STREAM_CONTENT_TYPE",
    "BadBatch",
    "BatchRejected",
    "ConfigError",
    "is_healthy",
    "read_stream",
    "run_source",
    "serve_sink",
    "serve_transform",
    "set_healthy",
    "write_stream",
]

PROTOCOL_VERSION = 1
ARROW_STREAM_CONTENT_TYPE = "application/vnd.apache.arrow.stream"
_TEXT_CONTENT_TYPE = "text/plain; charset=utf-8"

#: Upper bound on a request body. A peer that announces more gets ``413`` instead of
#: making the module allocate it; edge batches are far smaller.
DEFAULT_MAX_BODY_BYTES = 256 * 1024 * 1024
# The most of the runtime's answer to a push that is read (it is a short text).
_MAX_ANSWER_BYTES = 64 * 1024

_ROLES = ("source", "transform", "sink")

log = logging.getLogger("weir_module")


# --------------------------------------------------------------------------------------
# Errors


class BadBatch(Exception):
    """Raise from a module function when the batch itself is bad and will never succeed.

    The module answers ``400`` with ``str(exc)`` as the text body; the runtime sends the
    batch to the module's ``dead_letter`` output with that reason and does not retry it.
    Any other exception answers ``500`` and the runtime retries the same batch.
    """


class BatchRejected(Exception):
    """The runtime answered a source push with ``4xx``: the batch will never be taken.

    Typically the batch does not match the schema declared for the module in the
    pipeline. Retrying cannot help, so :func:`run_source` stops and raises this.
    """

    def __init__(self, status: int, reason: str, batch_id: int):
        super().__init__(f"runtime rejected batch {batch_id} with {status}: {reason}")
        self.status = status
        self.reason = reason
        self.batch_id = batch_id


class ConfigError(Exception):
    """The ``WEIR_*`` environment variables are missing, contradictory or malformed."""


class _PeerGone(Exception):
    """The peer closed or broke the connection before a complete request arrived."""


class _HttpError(Exception):
    """An HTTP-level problem with a request, answered with ``status`` and ``message``."""

    def __init__(self, status: int, message: str, close: bool = False):
        super().__init__(message)
        self.status = status
        self.message = message
        self.close = close


# --------------------------------------------------------------------------------------
# Logging: one line per entry on stderr


class _OneLineFormatter(logging.Formatter):
    """Formats a record on one line: newlines in messages would split a log entry."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return text.replace("\\", "\\\\").replace("\r", "\\r").replace("\n", "\\n")


def _configure_logging(module_name: str) -> None:
    """Sends the SDK's log to stderr unless the application configured logging itself."""
    if log.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        _OneLineFormatter(
            f"%(asctime)s %(levelname)s weir_module[{module_name}]: %(message)s"
        )
    )
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def _describe_exception(exc: BaseException) -> str:
    """``Type: message (at file:line in function)``, so a one-line log says what and where."""
    text = f"{type(exc).__name__}: {exc}"
    frames = traceback.extract_tb(exc.__traceback__)
    if frames:
        last = frames[-1]
        text += f" (at {os.path.basename(last.filename)}:{last.lineno} in {last.name})"
    return text


# --------------------------------------------------------------------------------------
# Arrow IPC stream bodies


def read_stream(data: Union[bytes, bytearray, memoryview]) -> list[pa.RecordBatch]:
    """Decodes an Arrow IPC stream body into its record batches.

    An empty body decodes to ``[]`` (the protocol allows it for "nothing"). Every batch is
    fully validated, because the bytes come from another process and a corrupt offset
    buffer must become an error here rather than a crash in later compute.

    Raises ``ValueError`` saying what is wrong when ``data`` is not a valid stream.
    """
    return _read_stream_with_schema(data)[1]


def _read_stream_with_schema(
    data: Union[bytes, bytearray, memoryview],
) -> tuple[Optional[pa.Schema], list[pa.RecordBatch]]:
    """Like :func:`read_stream`, and also returns the schema (``None`` for an empty body)."""
    if len(data) == 0:
        return None, []
    try:
        reader = pa.ipc.open_stream(pa.py_buffer(data))
        schema = reader.schema
        batches = []
        for index, batch in enumerate(reader):
            try:
                batch.validate(full=True)
            except Exception as exc:  # pyarrow raises ArrowInvalid; be safe on any error
                raise ValueError(f"record batch {index} is invalid: {exc}") from exc
            batches.append(batch)
    except ValueError as exc:
        raise ValueError(
            f"not a valid Arrow IPC stream ({len(data)} bytes): {exc}"
        ) from exc
    except Exception as exc:  # any other pyarrow failure on foreign bytes
        raise ValueError(
            f"not a valid Arrow IPC stream ({len(data)} bytes): "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    return schema, batches


def write_stream(
    schema: Optional[pa.Schema], batches: Iterable[pa.RecordBatch] = ()
) -> bytes:
    """Encodes batches as an uncompressed Arrow IPC stream body.

    ``schema`` may be ``None`` to take the first batch's schema. With a schema and no
    batches the result is a valid stream meaning "no rows"; with neither it is ``b""``
    (the empty body the protocol allows). Every batch must have ``schema`` (metadata
    aside): one stream carries one schema, so a mismatch raises ``ValueError``.
    """
    batches = list(batches)
    if schema is None:
        if not batches:
            return b""
        schema = batches[0].schema
    sink = pa.BufferOutputStream()
    # The protocol forbids compression: both peers are on one host.
    options = pa.ipc.IpcWriteOptions(compression=None)
    with pa.ipc.new_stream(sink, schema, options=options) as writer:
        for index, batch in enumerate(batches):
            if not isinstance(batch, pa.RecordBatch):
                raise TypeError(
                    f"batch {index} is a {type(batch).__name__}, not a pyarrow.RecordBatch"
                )
            if not batch.schema.equals(schema, check_metadata=False):
                raise ValueError(
                    f"batch {index} has schema ({_schema_summary(batch.schema)}) but the "
                    f"stream has schema ({_schema_summary(schema)})"
                )
            writer.write_batch(batch)
    return sink.getvalue().to_pybytes()


def _schema_summary(schema: pa.Schema) -> str:
    return ", ".join(f"{field.name}: {field.type}" for field in schema)


def _single_batch(schema: pa.Schema, batches: list[pa.RecordBatch]) -> pa.RecordBatch:
    """The one batch a request carries: a 0-row batch for a schema-only body, the
    concatenation if a peer sent several."""
    if len(batches) == 1:
        return batches[0]
    if not batches:
        return pa.RecordBatch.from_pylist([], schema=schema)
    try:
        return pa.Table.from_batches(batches, schema=schema).combine_chunks().to_batches()[0]
    except Exception as exc:
        raise ValueError(
            f"body holds {len(batches)} record batches that cannot be combined into one: {exc}"
        ) from exc


def _collect_output(result: Any) -> tuple[Optional[pa.Schema], list[pa.RecordBatch]]:
    """Normalizes what a transform function returned to ``(schema, batches)``.

    Accepts ``None``, a ``RecordBatch``, a ``Table``, or an iterable of those.
    """
    if result is None:
        return None, []
    if isinstance(result, pa.RecordBatch):
        return result.schema, [result]
    if isinstance(result, pa.Table):
        return result.schema, result.to_batches()
    if isinstance(result, (str, bytes, bytearray, dict)) or not hasattr(result, "__iter__"):
        raise TypeError(
            "a transform must return a pyarrow.RecordBatch, a pyarrow.Table, an iterable "
            f"of those, or None; it returned a {type(result).__name__}"
        )
    schema: Optional[pa.Schema] = None
    batches: list[pa.RecordBatch] = []
    for index, item in enumerate(result):
        if isinstance(item, pa.RecordBatch):
            item_schema, item_batches = item.schema, [item]
        elif isinstance(item, pa.Table):
            item_schema, item_batches = item.schema, item.to_batches()
        else:
            raise TypeError(
                f"item {index} the transform produced is a {type(item).__name__}, "
                "not a pyarrow.RecordBatch or pyarrow.Table"
            )
        if schema is None:
            schema = item_schema
        elif not item_schema.equals(schema, check_metadata=False):
            raise ValueError(
                f"the transform produced batches with different schemas: item {index} has "
                f"({_schema_summary(item_schema)}), the first had ({_schema_summary(schema)})"
            )
        batches.extend(item_batches)
    return schema, batches


# --------------------------------------------------------------------------------------
# Health


_health_lock = threading.Lock()
_healthy = True


def set_healthy(healthy: bool) -> None:
    """Sets what ``GET /v1/health`` answers: ``200`` when healthy, ``503`` when not.

    A module calls this when it is alive but cannot do its work (a lost device, a full
    disk). The runtime stops sending batches after ``health.retries`` failed checks in a
    row and restarts the module per its ``restart`` policy. Safe from any thread.
    """
    global _healthy
    with _health_lock:
        _healthy = bool(healthy)


def is_healthy() -> bool:
    """What :func:`set_healthy` last set (``True`` at start)."""
    with _health_lock:
        return _healthy


# --------------------------------------------------------------------------------------
# Environment


class _Endpoint:
    """A Unix socket path or a TCP ``(host, port)``, as read from the environment."""

    def __init__(self, unix_path: Optional[str] = None, tcp: Optional[tuple[str, int]] = None):
        self.unix_path = unix_path
        self.tcp = tcp

    def __str__(self) -> str:
        if self.unix_path is not None:
            return f"unix:{self.unix_path}"
        return f"tcp:{_format_host_port(*self.tcp)}"


def _format_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _parse_host_port(value: str, variable: str) -> tuple[str, int]:
    """Parses ``host:port`` or ``[v6-host]:port``."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not host:
        raise ConfigError(f"{variable}={value!r} is not host:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigError(f"{variable}={value!r}: port {port_text!r} is not a number") from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"{variable}={value!r}: port {port} is out of range")
    return host, port


def _endpoint_from_env(socket_var: str, addr_var: str, what: str) -> _Endpoint:
    """Reads exactly one of a socket variable and an address variable."""
    socket_path = os.environ.get(socket_var) or None
    addr = os.environ.get(addr_var) or None
    if socket_path and addr:
        raise ConfigError(
            f"both {socket_var} and {addr_var} are set; the {what} needs exactly one"
        )
    if socket_path:
        return _Endpoint(unix_path=socket_path)
    if addr:
        return _Endpoint(tcp=_parse_host_port(addr, addr_var))
    raise ConfigError(
        f"neither {socket_var} nor {addr_var} is set; the {what} needs one "
        "(is this module being started by the Weir runtime?)"
    )


def _module_name() -> str:
    return os.environ.get("WEIR_MODULE_NAME") or os.path.basename(sys.argv[0] or "module")


def _check_role(expected: str) -> None:
    """Warns when the runtime started the module in a role the code does not serve."""
    role = os.environ.get("WEIR_MODULE_ROLE")
    if role and role not in _ROLES:
        log.warning("WEIR_MODULE_ROLE has unknown value %r", role)
    elif role and role != expected:
        log.warning(
            "WEIR_MODULE_ROLE is %r but this module runs as a %s; check the pipeline",
            role,
            expected,
        )


# --------------------------------------------------------------------------------------
# HTTP server


# Signature of the internal batch handler: (batch, batch_id, attempt) -> response body.
_BatchHandler = Callable[[pa.RecordBatch, int, int], bytes]


class _RequestHandler(http.server.BaseHTTPRequestHandler):
    """Serves ``GET /v1/health`` and ``POST /v1/batches`` with HTTP/1.1 keep-alive."""

    protocol_version = "HTTP/1.1"  # keep-alive: the runtime reuses one connection
    server_version = f"weir-module-python/{PROTOCOL_VERSION}"
    server: "_ServerMixin"

    # -- logging: BaseHTTPRequestHandler writes to stderr itself and assumes a tuple
    #    client address, which a Unix socket peer ('' from accept) is not.

    def address_string(self) -> str:
        if isinstance(self.client_address, tuple) and self.client_address:
            return str(self.client_address[0])
        return "unix-peer"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib name)
        log.warning("%s: %s", self.address_string(), format % args)

    def log_request(self, code: Any = "-", size: Any = "-") -> None:
        code_value = getattr(code, "value", code)
        log.debug('"%s" %s %s', self.requestline, code_value, size)

    # -- connection bookkeeping, so a stop can wait for answers and close idle sockets

    def setup(self) -> None:
        super().setup()
        self.server.track_connection(self.connection, add=True)

    def finish(self) -> None:
        try:
            super().finish()
        except OSError:
            pass  # the peer is gone; nothing left to flush
        finally:
            self.server.track_connection(self.connection, add=False)

    # -- endpoints

    def do_GET(self) -> None:
        if self._path() == "/v1/health":
            self._serve_health()
        elif self._path() == "/v1/batches":
            self._drain_body()
            self._send_text(405, "use POST for /v1/batches", extra={"Allow": "POST"})
        else:
            self._drain_body()
            self._send_text(404, f"no such endpoint: {self._path()}")

    def do_POST(self) -> None:
        if self._path() == "/v1/batches" and self.server.batch_handler is not None:
            self._serve_batch()
        elif self._path() == "/v1/batches":
            self._drain_body()
            self._send_text(404, "this is a source module; it does not accept batches")
        elif self._path() == "/v1/health":
            self._drain_body()
            self._send_text(405, "use GET for /v1/health", extra={"Allow": "GET"})
        else:
            self._drain_body()
            self._send_text(404, f"no such endpoint: {self._path()}")

    def _method_not_allowed(self) -> None:
        """Answers other methods with 405 after reading their body, keeping the stream in sync."""
        self._drain_body()
        allowed = "GET" if self._path() == "/v1/health" else "POST"
        self._send_text(405, f"{self.command} is not supported on {self._path()}",
                        extra={"Allow": allowed})

    do_PUT = do_DELETE = do_PATCH = _method_not_allowed

    def _path(self) -> str:
        return self.path.split("?", 1)[0]

    def _serve_health(self) -> None:
        self._drain_body()
        if self.server.stopping:
            self._send_text(503, "stopping")
        elif is_healthy():
            self._send_text(200, "ok")
        else:
            self._send_text(503, "unhealthy")

    def _serve_batch(self) -> None:
        if not self.server.begin_request():
            self.close_connection = True
            self._send_text(503, "module is stopping; retry the batch later")
            return
        try:
            self._serve_batch_in_progress()
        finally:
            self.server.end_request()

    def _serve_batch_in_progress(self) -> None:
        try:
            # The body first: answering before reading it would desynchronise keep-alive.
            body = self._read_body()
            batch_id = self._decimal_header("Weir-Batch-Id", required=True)
            attempt = self._decimal_header("Weir-Attempt", required=False) or 1
        except _PeerGone as exc:
            log.warning("connection dropped while reading a batch: %s", exc)
            self.close_connection = True
            return
        except _HttpError as exc:
            log.warning("rejected a request with %d: %s", exc.status, exc.message)
            if exc.close:
                self.close_connection = True
            self._send_text(exc.status, exc.message)
            return

        try:
            schema, batches = _read_stream_with_schema(body)
            if schema is None:
                raise ValueError("empty body; expected an Arrow IPC stream with one record batch")
            batch = _single_batch(schema, batches)
        except ValueError as exc:
            message = f"batch {batch_id}: {exc}"
            log.warning("400 %s", message)
            self._send_text(400, message)
            return

        try:
            response = self.server.batch_handler(batch, batch_id, attempt)
        except BadBatch as exc:
            message = str(exc) or f"batch {batch_id} rejected by the module"
            log.warning("400 bad batch %d (attempt %d): %s", batch_id, attempt, message)
            self._send_text(400, message)
            return
        except Exception as exc:
            described = _describe_exception(exc)
            log.error("500 batch %d (attempt %d) failed: %s", batch_id, attempt, described)
            self._send_text(500, f"batch {batch_id} failed: {described}")
            return
        log.debug("200 batch %d (attempt %d): %d bytes", batch_id, attempt, len(response))
        self._send(200, response, ARROW_STREAM_CONTENT_TYPE if response else None)

    def _decimal_header(self, name: str, required: bool) -> Optional[int]:
        value = self.headers.get(name)
        if value is None:
            if required:
                raise _HttpError(400, f"missing {name} header")
            return None
        value = value.strip()
        if not value.isascii() or not value.isdigit():
            raise _HttpError(400, f"{name} header {value!r} is not a decimal number")
        return int(value)

    def _read_body(self) -> bytes:
        """Reads the request body (``Content-Length`` or chunked), bounded in size."""
        limit = self.server.max_body_bytes
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._read_chunked(limit)
        length_text = self.headers.get("Content-Length")
        if length_text is None:
            raise _HttpError(411, "Content-Length or chunked Transfer-Encoding required",
                             close=True)
        length_text = length_text.strip()
        if not length_text.isascii() or not length_text.isdigit():
            raise _HttpError(400, f"Content-Length {length_text!r} is not a number", close=True)
        length = int(length_text)
        if length > limit:
            raise _HttpError(413, f"body of {length} bytes exceeds the limit of {limit}",
                             close=True)
        return self._read_exact(length)

    def _read_exact(self, length: int) -> bytes:
        try:
            data = self.rfile.read(length)
        except OSError as exc:
            raise _PeerGone(f"read failed: {exc}") from exc
        if len(data) < length:
            raise _PeerGone(f"body ended after {len(data)} of {length} bytes")
        return data

    def _read_line(self) -> bytes:
        try:
            line = self.rfile.readline(1024)
        except OSError as exc:
            raise _PeerGone(f"read failed: {exc}") from exc
        if not line.endswith(b"\n"):
            if len(line) >= 1024:
                raise _HttpError(400, "chunk header line too long", close=True)
            raise _PeerGone("connection closed inside a chunked body")
        return line

    def _read_chunked(self, limit: int) -> bytes:
        parts = []
        total = 0
        while True:
            size_text = self._read_line().split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise _HttpError(400, f"bad chunk size {size_text[:32]!r}", close=True) from None
            if size < 0:
                raise _HttpError(400, "negative chunk size", close=True)
            if size == 0:
                while self._read_line().strip():  # trailers, up to the blank line
                    pass
                return b"".join(parts)
            total += size
            if total > limit:
                raise _HttpError(413, f"chunked body exceeds the limit of {limit} bytes",
                                 close=True)
            parts.append(self._read_exact(size))
            if self._read_line().strip():
                raise _HttpError(400, "chunk not followed by CRLF", close=True)

    def _drain_body(self) -> None:
        """Discards a body a request should not have had, or closes after answering."""
        length_text = (self.headers.get("Content-Length") or "0").strip()
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            return
        if length_text.isascii() and length_text.isdigit() and int(length_text) <= 65536:
            try:
                self._read_exact(int(length_text))
                return
            except _PeerGone:
                pass
        self.close_connection = True

    def _send_text(self, status: int, text: str, extra: Optional[dict] = None) -> None:
        self._send(status, text.encode("utf-8", "replace"), _TEXT_CONTENT_TYPE, extra)

    def _send(
        self,
        status: int,
        body: bytes,
        content_type: Optional[str],
        extra: Optional[dict] = None,
    ) -> None:
        try:
            self.send_response(status)
            if content_type:
                self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for name, value in (extra or {}).items():
                self.send_header(name, value)
            if self.server.stopping:
                # Answer the request in progress, then let the runtime reconnect to the
                # module's successor.
                self.close_connection = True
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            if body:  # a zero-byte send to a peer that already left would raise EPIPE
                self.wfile.write(body)
            self.wfile.flush()
        except OSError as exc:
            log.warning("could not send the %d answer: the peer is gone (%s)", status, exc)
            self.close_connection = True


class _ServerMixin:
    """State shared by the Unix and TCP servers: the handler, stop flag, live requests."""

    daemon_threads = True  # idle keep-alive connections must not keep the process alive
    batch_handler: Optional[_BatchHandler]
    max_body_bytes: int

    def init_state(self, batch_handler: Optional[_BatchHandler], max_body_bytes: int) -> None:
        self.batch_handler = batch_handler
        self.max_body_bytes = max_body_bytes
        self.stopping = False
        self._state = threading.Condition()
        self._busy = 0
        self._connections: set[socket.socket] = set()

    def track_connection(self, connection: socket.socket, add: bool) -> None:
        with self._state:
            if add:
                self._connections.add(connection)
            else:
                self._connections.discard(connection)

    def begin_request(self) -> bool:
        """Marks a batch request in progress; ``False`` once stopping (no new work)."""
        with self._state:
            if self.stopping:
                return False
            self._busy += 1
            return True

    def end_request(self) -> None:
        with self._state:
            self._busy -= 1
            self._state.notify_all()

    def begin_stop(self) -> None:
        with self._state:
            self.stopping = True

    def wait_idle(self, timeout: Optional[float] = None) -> bool:
        """Waits until no batch request is in progress."""
        with self._state:
            return self._state.wait_for(lambda: self._busy == 0, timeout)

    def close_connections(self) -> None:
        """Shuts idle keep-alive connections so their threads see EOF and end."""
        with self._state:
            connections = list(self._connections)
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def handle_error(self, request: Any, client_address: Any) -> None:
        # socketserver's default prints a multi-line traceback; keep the log one line.
        log.error("error serving a connection: %s", _describe_exception(sys.exc_info()[1]))


def _admits(peer_uid: int, dir_mode: int, dir_uid: int, own_uid: int) -> bool:
    """Whether a peer of ``peer_uid`` may call a module whose socket is in a directory of
    ``dir_mode`` owned by ``dir_uid``: root, the directory's owner and the module's own user
    always may; anyone may when the directory lets anyone in. The Rust SDK's rule too."""
    return bool(dir_mode & 0o002) or peer_uid in (0, dir_uid, own_uid)


class _UnixServer(_ServerMixin, socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """A threading HTTP server on a Unix socket (``http.server`` only ships TCP ones)."""

    def verify_request(self, request: Any, client_address: Any) -> bool:
        # The peer's credentials, as the kernel saw them at connect (struct ucred).
        try:
            creds = request.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
            peer_uid = int.from_bytes(creds[4:8], sys.byteorder)
            directory = os.stat(os.path.dirname(self.server_address) or ".")
        except OSError as exc:
            log.warning("cannot read a connection's peer: %s", exc)
            return False
        if _admits(peer_uid, directory.st_mode, directory.st_uid, os.geteuid()):
            return True
        log.warning(
            "refused a connection from uid %d: neither root, the socket directory's owner "
            "nor this module's user",
            peer_uid,
        )
        return False

    def server_bind(self) -> None:
        _remove_stale_socket(self.server_address)
        super().server_bind()
        # The runtime gives the module a directory of its own (0700), which already keeps
        # other users away; the socket is the module's alone too. Only where the runtime
        # could not make the directory private (it is world-writable and sticky) must the
        # socket let a runtime of another user connect.
        try:
            shared = os.stat(os.path.dirname(self.server_address) or ".").st_mode & 0o002
            os.chmod(self.server_address, 0o666 if shared else 0o600)
        except OSError as exc:
            log.warning("could not chmod %s: %s", self.server_address, exc)
        self.bound_inode = os.stat(self.server_address).st_ino

    def remove_socket_file(self) -> None:
        """Unlinks the socket file, unless something else has replaced it since."""
        try:
            if os.stat(self.server_address).st_ino == self.bound_inode:
                os.unlink(self.server_address)
        except OSError:
            pass


class _TcpServer(_ServerMixin, socketserver.ThreadingMixIn, socketserver.TCPServer):
    """A threading HTTP server on TCP (without ``HTTPServer``'s slow reverse DNS)."""

    allow_reuse_address = True

    def remove_socket_file(self) -> None:
        pass


class _Tcp6Server(_TcpServer):
    address_family = socket.AF_INET6


def _remove_stale_socket(path: str) -> None:
    """Removes a socket file left by a previous run, refusing to delete anything else."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ConfigError(f"WEIR_MODULE_SOCKET={path} exists and is not a socket; not removing it")
    os.unlink(path)
    log.info("removed stale socket file %s", path)


def _make_server(
    endpoint: _Endpoint, batch_handler: Optional[_BatchHandler], max_body_bytes: int
) -> Union[_UnixServer, _TcpServer]:
    """Binds the module's socket or port (requests are served once serve_forever runs)."""
    server: Union[_UnixServer, _TcpServer]
    try:
        if endpoint.unix_path is not None:
            server = _UnixServer(endpoint.unix_path, _RequestHandler)
        else:
            host, port = endpoint.tcp
            server_class = _Tcp6Server if ":" in host else _TcpServer
            server = server_class((host, port), _RequestHandler)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {endpoint}: {exc}") from exc
    server.init_state(batch_handler, max_body_bytes)
    return server


class _RunningServer:
    """A module HTTP server serving in a background thread, with an orderly stop."""

    def __init__(self, endpoint: _Endpoint, batch_handler: Optional[_BatchHandler],
                 max_body_bytes: int):
        self.endpoint = endpoint
        self.server = _make_server(endpoint, batch_handler, max_body_bytes)
        self.thread = threading.Thread(
            target=self.server.serve_forever,
            kwargs={"poll_interval": 0.1},
            name="weir-module-http",
            daemon=True,
        )
        self.thread.start()

    def stop(self) -> None:
        """Refuses new batches, waits for the one in progress, then closes everything."""
        self.server.begin_stop()
        self.server.shutdown()  # no new connections
        self.server.server_close()
        self.server.remove_socket_file()
        self.server.wait_idle()
        self.server.close_connections()


def _install_stop_signals(on_stop: Callable[[int], None]) -> dict:
    """Routes SIGTERM and SIGINT to ``on_stop``; returns the previous handlers."""
    previous = {}
    for signum in (signal.SIGTERM, signal.SIGINT):
        previous[signum] = signal.signal(signum, lambda number, frame: on_stop(number))
    return previous


def _restore_signals(previous: dict) -> None:
    for signum, handler in previous.items():
        signal.signal(signum, handler)


def _adapt_function(fn: Callable, what: str) -> Callable[[pa.RecordBatch, int], Any]:
    """Returns ``fn`` as ``(batch, batch_id)``, accepting functions that take only ``batch``."""
    if not callable(fn):
        raise TypeError(f"{what} must be callable, got a {type(fn).__name__}")
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # some builtins have no signature: pass both
        return fn
    try:
        signature.bind(None, 0)
        return fn
    except TypeError:
        pass
    try:
        signature.bind(None)
    except TypeError:
        raise TypeError(
            f"{what} {getattr(fn, '__name__', fn)!r} must accept (batch) or (batch, batch_id); "
            f"its signature is {signature}"
        ) from None
    return lambda batch, batch_id: fn(batch)


def _serve(role: str, fn: Callable, max_body_bytes: int) -> None:
    """Shared body of :func:`serve_transform` and :func:`serve_sink`."""
    _configure_logging(_module_name())
    call = _adapt_function(fn, f"the {role} function")
    call_lock = threading.Lock()

    def handle(batch: pa.RecordBatch, batch_id: int, attempt: int) -> bytes:
        # One call at a time: the runtime sends one batch at a time anyway, and this lets
        # module functions keep state without locks. Health checks do not take this lock,
        # so a slow batch does not make the module look dead.
        with call_lock:
            result = call(batch, batch_id)
        if role == "sink":
            return b""
        schema, batches = _collect_output(result)
        return write_stream(schema, batches)

    try:
        _check_role(role)
        endpoint = _endpoint_from_env("WEIR_MODULE_SOCKET", "WEIR_MODULE_ADDR", "module")
        stop_requested = threading.Event()

        def on_stop(signum: int) -> None:
            if stop_requested.is_set():
                log.warning("second %s: exiting without waiting", signal.Signals(signum).name)
                os._exit(1)
            log.info("%s received: finishing the batch in progress", signal.Signals(signum).name)
            stop_requested.set()

        previous = _install_stop_signals(on_stop)
        running = _RunningServer(endpoint, handle, max_body_bytes)
    except ConfigError as exc:
        log.error("cannot start: %s", exc)
        sys.exit(2)
    log.info("serving %s on %s (pid %d)", role, endpoint, os.getpid())
    try:
        while not stop_requested.wait(0.5):
            pass
    finally:
        running.stop()
        _restore_signals(previous)
    log.info("stopped")


def serve_transform(fn: Callable, *, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> None:
    """Serves a transform module until SIGTERM or SIGINT.

    ``fn(batch)`` or ``fn(batch, batch_id)`` receives each input batch as a
    ``pyarrow.RecordBatch`` (a 0-row one when the runtime sends a schema-only stream)
    and the ``Weir-Batch-Id``, which is the same on every attempt of a batch. It returns
    the batches that batch became: a ``RecordBatch``, a ``Table``, an iterable of those
    (all in one schema, the output schema declared in the pipeline) or ``None`` for
    nothing. Raising :class:`BadBatch` answers ``400`` (dead-lettered, not retried); any
    other exception answers ``500`` (retried) and the module keeps serving.

    Listens on ``WEIR_MODULE_SOCKET`` (removing a stale socket file first) or
    ``WEIR_MODULE_ADDR``. On SIGTERM/SIGINT it stops taking batches, answers the one in
    progress and returns, so a script that ends with this call exits 0. A second signal
    exits at once with status 1. Exits with status 2 when the environment is unusable.
    """
    _serve("transform", fn, max_body_bytes)


def serve_sink(fn: Callable, *, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> None:
    """Serves a sink module until SIGTERM or SIGINT.

    Like :func:`serve_transform`, but ``fn``'s return value is ignored and every
    successful batch is answered with an empty ``200``. Use ``batch_id`` to make side
    effects happen once: a batch is delivered at least once.
    """
    _serve("sink", fn, max_body_bytes)


# --------------------------------------------------------------------------------------
# Source modules: push to the runtime


class _UnixHTTPConnection(http.client.HTTPConnection):
    """``http.client`` over a Unix socket: connect() is the only transport difference."""

    def __init__(self, path: str, timeout: Optional[float]):
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self.unix_path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


def _connect_to(endpoint: _Endpoint, timeout: Optional[float]) -> http.client.HTTPConnection:
    if endpoint.unix_path is not None:
        return _UnixHTTPConnection(endpoint.unix_path, timeout)
    host, port = endpoint.tcp
    return http.client.HTTPConnection(host, port, timeout=timeout)


class _SourceStop(BaseException):
    """Raised from the signal handler into a blocked source generator to end it."""


class _Pusher:
    """Posts batches to the runtime on one keep-alive connection, with retries."""

    def __init__(self, endpoint: _Endpoint, timeout: Optional[float], retry_initial: float,
                 retry_max: float, max_attempts: Optional[int], stop: threading.Event):
        self.endpoint = endpoint
        self.timeout = timeout
        self.retry_initial = retry_initial
        self.retry_max = retry_max
        self.max_attempts = max_attempts
        self.stop = stop
        self.connection: Optional[http.client.HTTPConnection] = None

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()
            self.connection = None

    def push(self, batch_id: int, body: bytes) -> bool:
        """Pushes one body until the runtime takes it; ``False`` if stopped first.

        Retries ``503`` (and other ``5xx``) and broken connections with exponential
        backoff; raises :class:`BatchRejected` on ``4xx``.
        """
        delay = self.retry_initial
        attempt = 0
        while True:
            attempt += 1
            problem = self._post_once(batch_id, attempt, body)
            if problem is None:
                return True
            if self.max_attempts is not None and attempt >= self.max_attempts:
                raise ConnectionError(
                    f"runtime at {self.endpoint} did not take batch {batch_id} after "
                    f"{attempt} attempts; last problem: {problem}"
                )
            log.warning("batch %d attempt %d: %s; retrying in %.2fs",
                        batch_id, attempt, problem, delay)
            if self.stop.wait(delay):
                log.warning("stopping: batch %d was not delivered", batch_id)
                return False
            delay = min(delay * 2, self.retry_max)

    def _post_once(self, batch_id: int, attempt: int, body: bytes) -> Optional[str]:
        """One POST; ``None`` on ``200``, else a description of the retryable problem."""
        if self.connection is None:
            self.connection = _connect_to(self.endpoint, self.timeout)
        try:
            self.connection.request(
                "POST",
                "/v1/batches",
                body=body,
                headers={
                    "Content-Type": ARROW_STREAM_CONTENT_TYPE,
                    "Weir-Batch-Id": str(batch_id),
                    "Weir-Attempt": str(attempt),
                },
            )
            response = self.connection.getresponse()
            # The runtime answers a push with a short text; more is not read.
            answer = response.read(_MAX_ANSWER_BYTES)
            if response.read(1):
                response.close()
                self.close()
        except (OSError, http.client.HTTPException) as exc:
            self.close()  # reconnect on the next attempt
            return f"cannot reach the runtime at {self.endpoint}: {type(exc).__name__}: {exc}"
        if response.will_close:
            self.close()
        reason = answer.decode("utf-8", "replace").strip()
        if 200 <= response.status < 300:
            return None
        if 400 <= response.status < 500:
            raise BatchRejected(response.status, reason or response.reason, batch_id)
        if response.status >= 500:
            return f"runtime answered {response.status}: {reason or response.reason}"
        raise ConnectionError(
            f"runtime at {self.endpoint} answered an unexpected {response.status} "
            f"to batch {batch_id}: {reason}"
        )


def run_source(
    source: Union[Callable[[], Iterable[Any]], Iterable[Any]],
    *,
    timeout: Optional[float] = 30.0,
    retry_initial: float = 0.05,
    retry_max: float = 2.0,
    max_attempts: Optional[int] = None,
) -> int:
    """Runs a source module: pushes every batch ``source`` yields to the runtime.

    ``source`` is a generator function (called with no arguments) or any iterable; each
    item is a ``pyarrow.RecordBatch`` (pushed as one stream body) or a ``pyarrow.Table``
    (each of its batches pushed). Each push carries a ``Weir-Batch-Id`` that stays the same
    on retries and grows by one per batch, starting from a per-process value (the current
    time in microseconds) so ids from a restarted module never repeat earlier ones.

    A push is retried on ``503``, other ``5xx`` and broken connections with exponential
    backoff from ``retry_initial`` to ``retry_max`` seconds, up to ``max_attempts``
    (``None``: until stopped). ``timeout`` bounds one HTTP exchange. A ``4xx`` raises
    :class:`BatchRejected`. Meanwhile ``GET /v1/health`` is served on
    ``WEIR_MODULE_SOCKET``/``WEIR_MODULE_ADDR`` in a background thread.

    On SIGTERM/SIGINT the push in progress is finished (its retries end), a generator
    blocked waiting for data is interrupted and closed, and the function returns.
    Returns the number of batches the runtime took. When the iterable ends, it returns
    too; what the runtime makes of a source that exits is up to its restart policy.
    """
    _configure_logging(_module_name())
    try:
        _check_role("source")
        module_endpoint = _endpoint_from_env("WEIR_MODULE_SOCKET", "WEIR_MODULE_ADDR", "module")
        runtime_endpoint = _endpoint_from_env(
            "WEIR_RUNTIME_SOCKET", "WEIR_RUNTIME_ADDR", "source module's runtime endpoint"
        )
        health = _RunningServer(module_endpoint, None, 0)
    except ConfigError as exc:
        log.error("cannot start: %s", exc)
        sys.exit(2)

    stop = threading.Event()
    interruptible = False  # True only while waiting in the user's generator

    def on_stop(signum: int) -> None:
        name = signal.Signals(signum).name
        if stop.is_set():
            log.warning("second %s: exiting without waiting", name)
            os._exit(1)
        log.info("%s received: stopping after the batch in progress", name)
        stop.set()
        if interruptible:
            raise _SourceStop()

    previous = _install_stop_signals(on_stop)
    pusher = _Pusher(runtime_endpoint, timeout, retry_initial, retry_max, max_attempts, stop)
    next_id = time.time_ns() // 1000
    taken = 0
    log.info("source serving health on %s, pushing to %s", module_endpoint, runtime_endpoint)
    iterator = None
    try:
        iterator = iter(source() if callable(source) else source)
        while not stop.is_set():
            try:
                interruptible = True
                if stop.is_set():
                    break
                item = next(iterator)
                interruptible = False
            except (StopIteration, _SourceStop):
                break
            finally:
                interruptible = False
            if isinstance(item, pa.Table):
                batches = item.to_batches()
            elif isinstance(item, pa.RecordBatch):
                batches = [item]
            else:
                raise TypeError(
                    f"the source yielded a {type(item).__name__}; it must yield "
                    "pyarrow.RecordBatch or pyarrow.Table"
                )
            for batch in batches:
                body = write_stream(batch.schema, [batch])
                if not pusher.push(next_id, body):
                    break
                log.debug("batch %d taken (%d rows)", next_id, batch.num_rows)
                next_id += 1
                taken += 1
    except _SourceStop:
        pass  # a signal landed just as the generator returned; the stop flag is set
    except Exception as exc:
        log.error("source stopped: %s", _describe_exception(exc))
        raise
    finally:
        if iterator is not None and hasattr(iterator, "close"):
            try:
                iterator.close()  # runs the generator's finally blocks
            except Exception as exc:
                log.warning("closing the source generator failed: %s", _describe_exception(exc))
        pusher.close()
        health.stop()
        _restore_signals(previous)
    log.info("source stopped after %d batches", taken)
    return taken
