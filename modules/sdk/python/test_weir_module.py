"""Tests for weir_module.py: real module processes spoken to over real sockets.

Run from this directory with ``python3 -m unittest -v``. The HTTP client and the fake
runtime here are written independently of the SDK, so the SDK is checked against the
protocol (docs/module-protocol.md) rather than against itself. Every wait is bounded so
a hang fails the test instead of stalling the run.
"""

import http.client
import os
import re
import shutil
import signal
import socket
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import http.server

import pyarrow as pa

import weir_module

HERE = os.path.dirname(os.path.abspath(__file__))
ECHO = os.path.join(HERE, "examples", "echo.py")
SCALE = os.path.join(HERE, "examples", "scale.py")
CONTROL = os.path.join(HERE, "testdata", "control_module.py")
SOURCE = os.path.join(HERE, "testdata", "source_module.py")
SINK = os.path.join(HERE, "testdata", "sink_module.py")

ARROW = "application/vnd.apache.arrow.stream"
TIMEOUT = 10.0  # upper bound on any single wait
LOG_LINE = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR) weir_module\[[^\]]+\]: "
)


# --------------------------------------------------------------------------------------
# Helpers: an independent HTTP client over Unix sockets, Arrow bodies, module processes


class UnixConnection(http.client.HTTPConnection):
    """http.client over an AF_UNIX socket."""

    def __init__(self, path, timeout=TIMEOUT):
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self.path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def encode(*batches, schema=None):
    """Arrow IPC stream bytes, built with pyarrow directly (not the SDK)."""
    schema = schema or batches[0].schema
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, schema) as writer:
        for batch in batches:
            writer.write_batch(batch)
    return sink.getvalue().to_pybytes()


def decode(body):
    """(schema, batches) of an Arrow IPC stream body, with pyarrow directly."""
    reader = pa.ipc.open_stream(body)
    return reader.schema, list(reader)


def command_batch(command):
    return pa.record_batch([pa.array([command], pa.string())], names=["command"])


def sample_batch():
    """A batch with the awkward column kinds: nulls, strings, dictionary, timestamps."""
    return pa.record_batch(
        [
            pa.array(["a", "b", None], pa.string()),
            pa.array([1.5, None, -3.25], pa.float64()),
            pa.array([1, 2, 3], pa.int64()),
            pa.array(["x", "y", "x"]).dictionary_encode(),
            pa.array([0, 1000, 2000], pa.timestamp("ms")),
        ],
        names=["device", "value", "count", "zone", "ts"],
    )


def free_tcp_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def clean_env(**extra):
    """The current environment without WEIR_* variables, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WEIR_")}
    env.update({k: str(v) for k, v in extra.items()})
    return env


class Module:
    """A module subprocess with its stderr captured to a file."""

    def __init__(self, test, script, env, cwd=None):
        self.test = test
        self.stderr_path = os.path.join(test.tmp, f"stderr-{len(test.modules)}.log")
        self.stdout_path = os.path.join(test.tmp, f"stdout-{len(test.modules)}.log")
        self.socket_path = env.get("WEIR_MODULE_SOCKET")
        self.addr = env.get("WEIR_MODULE_ADDR")
        with open(self.stderr_path, "wb") as err, open(self.stdout_path, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, script], env=env, stdout=out, stderr=err, cwd=cwd or test.tmp
            )
        test.modules.append(self)

    def stderr(self):
        with open(self.stderr_path, encoding="utf-8", errors="replace") as err:
            return err.read()

    def stdout(self):
        with open(self.stdout_path, encoding="utf-8", errors="replace") as out:
            return out.read()

    def connect(self):
        if self.socket_path:
            return UnixConnection(self.socket_path)
        host, port = self.addr.rsplit(":", 1)
        return http.client.HTTPConnection(host, int(port), timeout=TIMEOUT)

    def get(self, path, conn=None):
        """(status, body) of a GET on a fresh connection or ``conn``."""
        own = conn is None
        conn = conn or self.connect()
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            if own:
                conn.close()

    def wait_for_health(self, expect=200):
        """Polls GET /v1/health until it answers ``expect``; fails on exit or timeout."""
        deadline = time.monotonic() + TIMEOUT
        last = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.test.fail(
                    f"module exited with {self.proc.returncode} before becoming ready; "
                    f"stderr:\n{self.stderr()}"
                )
            try:
                status, _ = self.get("/v1/health")
                if status == expect:
                    return
                last = f"status {status}"
            except OSError as exc:
                last = repr(exc)
            time.sleep(0.05)
        self.test.fail(f"module health never answered {expect} (last: {last}); "
                       f"stderr:\n{self.stderr()}")

    def post(self, body, batch_id=1, attempt=1, conn=None, headers=None):
        """(response, body) of POST /v1/batches."""
        own = conn is None
        conn = conn or self.connect()
        all_headers = {"Content-Type": ARROW}
        if batch_id is not None:
            all_headers["Weir-Batch-Id"] = str(batch_id)
        if attempt is not None:
            all_headers["Weir-Attempt"] = str(attempt)
        all_headers.update(headers or {})
        try:
            conn.request("POST", "/v1/batches", body=body, headers=all_headers)
            response = conn.getresponse()
            return response, response.read()
        finally:
            if own:
                conn.close()

    def stop(self, sig=signal.SIGTERM):
        """Sends ``sig`` and returns the exit code (fails if it does not exit in time)."""
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            self.test.fail(f"module did not exit within {TIMEOUT}s of {sig.name}; "
                           f"stderr:\n{self.stderr()}")

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(TIMEOUT)


class ModuleTestCase(unittest.TestCase):
    def setUp(self):
        # Short path: Unix socket paths are limited to ~107 bytes.
        self.tmp = tempfile.mkdtemp(prefix="weir-py-")
        self.modules = []
        self.addCleanup(shutil.rmtree, self.tmp, ignore_errors=True)
        self.addCleanup(self._kill_modules)

    def _kill_modules(self):
        for module in self.modules:
            module.kill()

    def start(self, script, transport="unix", **env):
        """Starts ``script`` as a module listening on a temp socket (or a free TCP port)."""
        if transport == "unix":
            env["WEIR_MODULE_SOCKET"] = os.path.join(self.tmp, f"m{len(self.modules)}.sock")
        else:
            env["WEIR_MODULE_ADDR"] = f"127.0.0.1:{free_tcp_port()}"
        env.setdefault("WEIR_MODULE_NAME", "test-module")
        env.setdefault("WEIR_MODULE_ROLE", "transform")
        return Module(self, script, clean_env(**env))

    def assert_log_lines(self, module):
        """Every stderr line is one SDK log entry (no tracebacks, no split messages)."""
        text = module.stderr()
        self.assertTrue(text, "module wrote no log at all")
        for line in text.splitlines():
            self.assertRegex(line, LOG_LINE, f"stderr line is not a one-line log entry:\n{text}")


class PeerCheckTests(ModuleTestCase):
    def test_root_the_owner_and_the_module_get_in_and_others_only_through_an_open_directory(self):
        private, open_ = 0o040700, 0o041777
        for peer in (0, 1000, 2000):
            self.assertTrue(weir_module._admits(peer, private, 1000, 2000), peer)
        self.assertFalse(weir_module._admits(3000, private, 1000, 2000))
        self.assertFalse(weir_module._admits(3000, 0o040755, 1000, 2000))
        self.assertTrue(weir_module._admits(3000, open_, 1000, 2000))

    @unittest.skipUnless(os.geteuid() == 0 and shutil.which("setpriv"), "needs root and setpriv")
    def test_a_connection_from_another_user_is_dropped_unanswered(self):
        # A directory others may enter but not write: only the credentials check stands
        # between another user and the module once the socket is opened to all.
        os.chmod(self.tmp, 0o755)
        module = self.start(ECHO)
        module.wait_for_health()
        os.chmod(module.socket_path, 0o777)
        ask = (
            "import socket,sys\n"
            "s=socket.socket(socket.AF_UNIX)\n"
            "s.connect(sys.argv[1])\n"
            "try:\n"
            " s.sendall(b'GET /v1/health HTTP/1.1\\r\\nHost: weir\\r\\n\\r\\n')\n"
            " print(s.recv(4096).decode().split('\\r\\n')[0])\n"
            "except OSError:\n"
            " pass\n"
        )

        def ask_as(uid):
            # Debian's Python: a pyenv one may live where the other user cannot read.
            command = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
            command += ["/usr/bin/python3", "-c", ask, module.socket_path]
            return subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip()

        self.assertEqual(ask_as(0), "HTTP/1.1 200 OK")
        self.assertEqual(ask_as(65534), "", "a user who is neither root nor the owner was answered")


# --------------------------------------------------------------------------------------
# IPC helpers (in process)


class StreamHelperTests(unittest.TestCase):
    def test_round_trip_keeps_values_types_and_dictionaries(self):
        batch = sample_batch()
        body = weir_module.write_stream(batch.schema, [batch, batch])
        self.assertEqual(decode(body)[0], batch.schema)  # readable by plain pyarrow
        batches = weir_module.read_stream(body)
        self.assertEqual(len(batches), 2)
        for got in batches:
            self.assertTrue(got.equals(batch))
            self.assertTrue(pa.types.is_dictionary(got.schema.field("zone").type))

    def test_schema_only_stream_means_no_rows(self):
        schema = pa.schema([("value", pa.float64())])
        body = weir_module.write_stream(schema, [])
        self.assertGreater(len(body), 0, "a known schema must still produce a stream")
        got_schema, got_batches = decode(body)
        self.assertEqual(got_schema, schema)
        self.assertEqual(got_batches, [])
        self.assertEqual(weir_module.read_stream(body), [])

    def test_schema_taken_from_first_batch_and_empty_without_any(self):
        batch = sample_batch()
        self.assertEqual(decode(weir_module.write_stream(None, [batch]))[0], batch.schema)
        self.assertEqual(weir_module.write_stream(None, []), b"")
        self.assertEqual(weir_module.read_stream(b""), [])

    def test_mismatched_schema_is_refused(self):
        other = pa.record_batch([pa.array([1])], names=["n"])
        with self.assertRaisesRegex(ValueError, r"batch 0 has schema \(n: int64\)"):
            weir_module.write_stream(sample_batch().schema, [other])

    def test_garbage_and_truncated_streams_raise_value_error(self):
        with self.assertRaisesRegex(ValueError, "not a valid Arrow IPC stream"):
            weir_module.read_stream(b"definitely not arrow")
        body = encode(sample_batch())
        with self.assertRaisesRegex(ValueError, "not a valid Arrow IPC stream"):
            weir_module.read_stream(body[: len(body) // 2])

    def test_health_flag(self):
        self.addCleanup(weir_module.set_healthy, True)
        self.assertTrue(weir_module.is_healthy())
        weir_module.set_healthy(False)
        self.assertFalse(weir_module.is_healthy())


# --------------------------------------------------------------------------------------
# Transform and sink modules


class TransformTests(ModuleTestCase):
    def test_echo_over_unix_socket_returns_the_batch_on_one_keepalive_connection(self):
        module = self.start(ECHO)
        module.wait_for_health()
        # The test's directory is private (as the runtime makes it): so is the socket.
        directory_mode = os.stat(os.path.dirname(module.socket_path)).st_mode
        expected = 0o666 if directory_mode & 0o002 else 0o600
        self.assertEqual(os.stat(module.socket_path).st_mode & 0o777, expected)
        batch = sample_batch()
        conn = module.connect()
        self.addCleanup(conn.close)
        for batch_id in (1, 2):
            response, body = module.post(encode(batch), batch_id=batch_id, conn=conn)
            self.assertEqual(response.status, 200, body)
            self.assertEqual(response.getheader("Content-Type"), ARROW)
            schema, batches = decode(body)
            self.assertEqual(schema, batch.schema)
            self.assertEqual(len(batches), 1)
            self.assertTrue(batches[0].equals(batch))
        self.assertEqual(module.stop(), 0)
        self.assert_log_lines(module)

    def test_echo_over_tcp(self):
        module = self.start(ECHO, transport="tcp")
        module.wait_for_health()
        batch = sample_batch()
        response, body = module.post(encode(batch), batch_id=7)
        self.assertEqual(response.status, 200, body)
        self.assertTrue(decode(body)[1][0].equals(batch))
        self.assertEqual(module.stop(), 0)

    def test_scale_multiplies_the_configured_column_in_python(self):
        module = self.start(SCALE, SCALE_COLUMN="reading", SCALE_FACTOR="3")
        module.wait_for_health()
        batch = pa.record_batch(
            [pa.array([1.0, -2.5, None]), pa.array([1.0, 2.0, 3.0]), pa.array(["a", "b", "c"])],
            names=["reading", "value", "name"],
        )
        response, body = module.post(encode(batch), batch_id=3)
        self.assertEqual(response.status, 200, body)
        out = decode(body)[1][0]
        self.assertEqual(out.column(0).to_pylist(), [3.0, -7.5, None])
        self.assertEqual(out.column(1).to_pylist(), [1.0, 2.0, 3.0], "only SCALE_COLUMN changes")
        self.assertEqual(out.column(2).to_pylist(), ["a", "b", "c"])

    def test_scale_defaults_to_value_times_two_and_rejects_a_missing_column(self):
        module = self.start(SCALE)
        module.wait_for_health()
        response, body = module.post(encode(pa.record_batch([pa.array([0.5, 4.0])],
                                                            names=["value"])))
        self.assertEqual(response.status, 200, body)
        self.assertEqual(decode(body)[1][0].column(0).to_pylist(), [1.0, 8.0])

        response, body = module.post(encode(pa.record_batch([pa.array([1.0])], names=["other"])))
        self.assertEqual(response.status, 400)
        self.assertIn("column 'value' is missing", body.decode())

        response, body = module.post(encode(pa.record_batch([pa.array([1])], names=["value"])))
        self.assertEqual(response.status, 400)
        self.assertIn("is int64, expected double", body.decode())

    def test_garbage_body_is_400_and_the_module_keeps_serving(self):
        module = self.start(ECHO)
        module.wait_for_health()
        conn = module.connect()
        self.addCleanup(conn.close)
        response, body = module.post(b"\x00\xffnot an arrow stream\x01" * 7, batch_id=9, conn=conn)
        self.assertEqual(response.status, 400)
        self.assertTrue(response.getheader("Content-Type").startswith("text/plain"))
        self.assertIn("batch 9", body.decode())
        self.assertIn("not a valid Arrow IPC stream", body.decode())
        # A truncated stream too.
        whole = encode(sample_batch())
        response, body = module.post(whole[:-20], batch_id=10, conn=conn)
        self.assertEqual(response.status, 400, body)
        # Same connection and a new one still work.
        response, body = module.post(encode(sample_batch()), batch_id=11, conn=conn)
        self.assertEqual(response.status, 200, body)
        self.assertEqual(module.get("/v1/health")[0], 200)
        self.assertIsNone(module.proc.poll(), "the module must still be running")

    def test_empty_body_and_missing_or_bad_headers_are_400_and_keepalive_survives(self):
        module = self.start(ECHO)
        module.wait_for_health()
        conn = module.connect()
        self.addCleanup(conn.close)
        body = encode(sample_batch())
        response, text = module.post(b"", conn=conn)
        self.assertEqual(response.status, 400)
        self.assertIn("empty body", text.decode())
        response, text = module.post(body, batch_id=None, conn=conn)
        self.assertEqual(response.status, 400)
        self.assertIn("missing Weir-Batch-Id", text.decode())
        response, text = module.post(body, batch_id="12abc", conn=conn)
        self.assertEqual(response.status, 400)
        self.assertIn("not a decimal number", text.decode())
        # The rejected requests' bodies were consumed: the connection is still in sync.
        response, text = module.post(body, batch_id=13, conn=conn)
        self.assertEqual(response.status, 200, text)
        self.assertTrue(decode(text)[1][0].equals(sample_batch()))

    def test_schema_only_and_multi_batch_bodies_call_the_function_once(self):
        module = self.start(ECHO)
        module.wait_for_health()
        batch = sample_batch()
        response, body = module.post(encode(schema=batch.schema))
        self.assertEqual(response.status, 200, body)
        schema, batches = decode(body)
        self.assertEqual(schema, batch.schema)
        self.assertEqual(sum(b.num_rows for b in batches), 0)

        response, body = module.post(encode(batch, batch))
        self.assertEqual(response.status, 200, body)
        batches = decode(body)[1]
        self.assertEqual(len(batches), 1, "two input batches are one call, one output")
        self.assertEqual(batches[0].num_rows, 6)

    def test_chunked_request_body(self):
        module = self.start(ECHO)
        module.wait_for_health()
        body = encode(sample_batch())
        conn = module.connect()
        self.addCleanup(conn.close)
        chunks = iter([body[:10], body[10:100], body[100:]])
        conn.request("POST", "/v1/batches", body=chunks, encode_chunked=True,
                     headers={"Weir-Batch-Id": "4", "Transfer-Encoding": "chunked"})
        response = conn.getresponse()
        text = response.read()
        self.assertEqual(response.status, 200, text)
        self.assertTrue(decode(text)[1][0].equals(sample_batch()))

    def test_control_answers_batch_id_500_400_empty_and_many(self):
        module = self.start(CONTROL)
        module.wait_for_health()
        conn = module.connect()
        self.addCleanup(conn.close)

        response, body = module.post(encode(command_batch("echo")), batch_id=42, attempt=3,
                                     conn=conn)
        self.assertEqual(response.status, 200, body)
        self.assertEqual(decode(body)[1][0].column(0).to_pylist(), [42])

        response, body = module.post(encode(command_batch("fail")), batch_id=43, conn=conn)
        self.assertEqual(response.status, 500)
        text = body.decode()
        self.assertIn("batch 43 failed: RuntimeError: boom on purpose", text)
        self.assertIn("control_module.py:", text, "the error says where it happened")

        response, body = module.post(encode(command_batch("bad")), batch_id=44, conn=conn)
        self.assertEqual(response.status, 400)
        self.assertEqual(body.decode(), "bad on purpose in batch 44")

        response, body = module.post(encode(command_batch("empty")), batch_id=45, conn=conn)
        self.assertEqual(response.status, 200)
        self.assertEqual(body, b"")

        response, body = module.post(encode(command_batch("many")), batch_id=46, conn=conn)
        self.assertEqual(response.status, 200)
        self.assertEqual([b.column(0).to_pylist() for b in decode(body)[1]], [[46], [46]])

        response, body = module.post(encode(command_batch("mixed")), batch_id=47, conn=conn)
        self.assertEqual(response.status, 500)
        self.assertIn("different schemas", body.decode())

        response, body = module.post(encode(command_batch("wrongtype")), batch_id=48, conn=conn)
        self.assertEqual(response.status, 500)
        self.assertIn("it returned a str", body.decode())

        # Still serving after every failure, on the same connection.
        response, body = module.post(encode(command_batch("echo")), batch_id=49, conn=conn)
        self.assertEqual(response.status, 200, body)
        self.assertEqual(decode(body)[1][0].column(0).to_pylist(), [49])
        self.assertEqual(module.stop(), 0)
        self.assert_log_lines(module)  # the two-line exception message stayed one line
        self.assertIn("boom on purpose\\nsecond line", module.stderr())

    def test_oversized_body_is_413_without_reading_it(self):
        module = self.start(ECHO)
        module.wait_for_health()
        conn = module.connect()
        self.addCleanup(conn.close)
        conn.request("POST", "/v1/batches", body=b"",
                     headers={"Weir-Batch-Id": "1", "Content-Length": str(10**12)})
        response = conn.getresponse()
        body = response.read()
        self.assertEqual(response.status, 413)
        self.assertIn("exceeds the limit", body.decode())
        self.assertEqual(response.getheader("Connection"), "close")
        self.assertEqual(module.get("/v1/health")[0], 200)

    def test_sink_runs_the_function_and_answers_an_empty_200(self):
        out = os.path.join(self.tmp, "sink.txt")
        module = self.start(SINK, WEIR_MODULE_ROLE="sink", SINK_OUT=out)
        module.wait_for_health()
        conn = module.connect()
        self.addCleanup(conn.close)
        for batch_id, values in ((5, [1.0, 2.0]), (6, [10.0, 20.0, 30.0])):
            batch = pa.record_batch([pa.array(values)], names=["value"])
            response, body = module.post(encode(batch), batch_id=batch_id, conn=conn)
            self.assertEqual(response.status, 200, body)
            self.assertEqual(body, b"", "a sink answers an empty body")
        with open(out) as f:
            self.assertEqual(f.read(), "5 2 3.0\n6 3 60.0\n")
        response, body = module.post(encode(command_batch("no value column")), batch_id=7)
        self.assertEqual(response.status, 500, "a sink's exception is a module failure")
        self.assertEqual(module.stop(), 0)
        self.assert_log_lines(module)
        self.assertNotIn("WEIR_MODULE_ROLE", module.stderr(), "role matched: no warning")

    def test_role_mismatch_is_logged(self):
        module = self.start(ECHO, WEIR_MODULE_ROLE="sink")
        module.wait_for_health()
        self.assertIn("WEIR_MODULE_ROLE is 'sink' but this module runs as a transform",
                      module.stderr())

    def test_unknown_endpoints(self):
        module = self.start(ECHO)
        module.wait_for_health()
        self.assertEqual(module.get("/v1/nope")[0], 404)
        self.assertEqual(module.get("/v1/batches")[0], 405)
        conn = module.connect()
        self.addCleanup(conn.close)
        conn.request("PUT", "/v1/batches", body=b"x")
        response = conn.getresponse()
        response.read()
        self.assertEqual(response.status, 405)
        self.assertEqual(response.getheader("Allow"), "POST")
        self.assertEqual(module.get("/v1/health", conn=conn)[0], 200, "connection still usable")


class HealthTests(ModuleTestCase):
    def test_set_unhealthy_makes_health_503_and_back(self):
        module = self.start(CONTROL)
        module.wait_for_health()
        response, body = module.post(encode(command_batch("unhealthy")))
        self.assertEqual(response.status, 200, body)
        status, text = module.get("/v1/health")
        self.assertEqual((status, text), (503, b"unhealthy"))
        response, body = module.post(encode(command_batch("healthy")))
        self.assertEqual(response.status, 200, body)
        self.assertEqual(module.get("/v1/health"), (200, b"ok"))

    def test_module_can_start_unhealthy(self):
        module = self.start(CONTROL, CONTROL_START_UNHEALTHY="1")
        module.wait_for_health(expect=503)

    def test_health_answers_while_a_slow_batch_is_in_progress(self):
        started = os.path.join(self.tmp, "started")
        module = self.start(CONTROL, CONTROL_STARTED_FILE=started)
        module.wait_for_health()
        result = {}

        def slow_post():
            result["status"] = module.post(encode(command_batch("sleep:2")))[0].status

        poster = threading.Thread(target=slow_post, daemon=True)
        poster.start()
        wait_for_file(self, started)
        began = time.monotonic()
        self.assertEqual(module.get("/v1/health")[0], 200)
        self.assertLess(time.monotonic() - began, 1.0, "health must not wait for the batch")
        poster.join(TIMEOUT)
        self.assertEqual(result.get("status"), 200)


class LifecycleTests(ModuleTestCase):
    def test_sigterm_while_idle_with_open_keepalive_connection_exits_0(self):
        module = self.start(ECHO)
        module.wait_for_health()
        conn = module.connect()
        self.addCleanup(conn.close)
        self.assertEqual(module.get("/v1/health", conn=conn)[0], 200)  # keep it open
        self.assertEqual(module.stop(), 0)
        self.assertFalse(os.path.exists(module.socket_path), "socket file must be removed")
        self.assertIn("stopped", module.stderr())
        self.assert_log_lines(module)

    def test_sigint_exits_0(self):
        module = self.start(ECHO, transport="tcp")
        module.wait_for_health()
        self.assertEqual(module.stop(signal.SIGINT), 0)

    def test_sigterm_finishes_the_batch_in_progress(self):
        started = os.path.join(self.tmp, "started")
        module = self.start(CONTROL, CONTROL_STARTED_FILE=started)
        module.wait_for_health()
        conn = module.connect()
        self.addCleanup(conn.close)
        conn.request("POST", "/v1/batches", body=encode(command_batch("sleep:1")),
                     headers={"Weir-Batch-Id": "77", "Weir-Attempt": "1"})
        wait_for_file(self, started)
        module.proc.send_signal(signal.SIGTERM)
        response = conn.getresponse()
        body = response.read()
        self.assertEqual(response.status, 200, body)
        self.assertEqual(decode(body)[1][0].column(0).to_pylist(), [77])
        self.assertEqual(response.getheader("Connection"), "close")
        self.assertEqual(module.proc.wait(TIMEOUT), 0)

    def test_stale_socket_file_is_replaced(self):
        path = os.path.join(self.tmp, "stale.sock")
        stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stale.bind(path)
        stale.close()  # leaves the file behind, as a crashed module would
        self.assertTrue(os.path.exists(path))
        module = Module(self, ECHO, clean_env(WEIR_MODULE_SOCKET=path))
        module.wait_for_health()
        response, body = module.post(encode(sample_batch()))
        self.assertEqual(response.status, 200, body)

    def test_refuses_to_delete_a_regular_file_at_the_socket_path(self):
        path = os.path.join(self.tmp, "not-a-socket")
        with open(path, "w") as f:
            f.write("precious")
        module = Module(self, ECHO, clean_env(WEIR_MODULE_SOCKET=path))
        self.assertEqual(module.proc.wait(TIMEOUT), 2)
        self.assertIn("exists and is not a socket", module.stderr())
        with open(path) as f:
            self.assertEqual(f.read(), "precious")

    def test_missing_or_contradictory_environment_exits_2_with_a_reason(self):
        module = Module(self, ECHO, clean_env())
        self.assertEqual(module.proc.wait(TIMEOUT), 2)
        self.assertIn("neither WEIR_MODULE_SOCKET nor WEIR_MODULE_ADDR is set", module.stderr())
        module = Module(self, ECHO, clean_env(WEIR_MODULE_SOCKET=os.path.join(self.tmp, "a"),
                                              WEIR_MODULE_ADDR="127.0.0.1:1"))
        self.assertEqual(module.proc.wait(TIMEOUT), 2)
        self.assertIn("both WEIR_MODULE_SOCKET and WEIR_MODULE_ADDR are set", module.stderr())
        module = Module(self, ECHO, clean_env(WEIR_MODULE_ADDR="127.0.0.1:http"))
        self.assertEqual(module.proc.wait(TIMEOUT), 2)
        self.assertIn("is not a number", module.stderr())


def wait_for_file(test, path):
    deadline = time.monotonic() + TIMEOUT
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            test.fail(f"{path} never appeared")
        time.sleep(0.02)


# --------------------------------------------------------------------------------------
# Source modules against a fake runtime


class FakeRuntime:
    """A minimal runtime endpoint: records pushes and answers from a script of statuses.

    ``statuses`` are used one per request, then 200 forever. While ``hold`` is set, every
    request is answered 503 instead (a pipeline that is not taking batches).
    """

    def __init__(self, test, path=None, tcp=False, statuses=(), reject_text="schema mismatch"):
        self.requests = []  # (headers dict, body bytes)
        self.statuses = list(statuses)
        self.reject_text = reject_text
        self.hold = threading.Event()
        self.lock = threading.Lock()
        runtime = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def address_string(self):
                return "peer"

            def log_message(self, *args):
                pass

            def do_POST(self):
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length)
                with runtime.lock:
                    runtime.requests.append(({k.lower(): v for k, v in self.headers.items()},
                                              body))
                    if runtime.hold.is_set():
                        status = 503
                    elif runtime.statuses:
                        status = runtime.statuses.pop(0)
                    else:
                        status = 200
                text = {200: b"", 503: b"shutting down", 400: runtime.reject_text.encode()}[status]
                self.send_response(status)
                self.send_header("Content-Length", str(len(text)))
                self.end_headers()
                if text:
                    self.wfile.write(text)

        if tcp:
            class Server(socketserver.ThreadingMixIn, socketserver.TCPServer):
                daemon_threads = True
                allow_reuse_address = True
            self.server = Server(("127.0.0.1", 0), Handler)
            self.env = {"WEIR_RUNTIME_ADDR": "127.0.0.1:%d" % self.server.server_address[1]}
        else:
            class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
                daemon_threads = True
            self.server = Server(path, Handler)
            self.env = {"WEIR_RUNTIME_SOCKET": path}
        thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                  daemon=True)
        thread.start()
        test.addCleanup(self.server.server_close)
        test.addCleanup(self.server.shutdown)

    def snapshot(self):
        with self.lock:
            return list(self.requests)


def expected_source_batch(i):
    return pa.record_batch(
        [pa.array([i, i], pa.int64()), pa.array([i / 2, -float(i)], pa.float64())],
        names=["seq", "value"],
    )


class SourceTests(ModuleTestCase):
    def start_source(self, runtime_env, transport="unix", **env):
        env.update(runtime_env)
        env["WEIR_MODULE_ROLE"] = "source"
        return self.start(SOURCE, transport=transport, **env)

    def assert_delivered(self, requests, count):
        """The runtime got batches 0..count-1 in order, with consistent Weir headers."""
        taken = {}
        for headers, body in requests:
            self.assertEqual(headers.get("content-type"), ARROW)
            self.assertRegex(headers.get("weir-batch-id", ""), r"^\d+$")
            batch_id = int(headers["weir-batch-id"])
            schema, batches = decode(body)
            self.assertEqual(len(batches), 1)
            seq = batches[0].column(0)[0].as_py()
            self.assertTrue(batches[0].equals(expected_source_batch(seq)))
            self.assertEqual(taken.setdefault(seq, batch_id), batch_id,
                             "a retry must carry the same Weir-Batch-Id")
        self.assertEqual(sorted(taken), list(range(count)))
        ids = [taken[seq] for seq in range(count)]
        self.assertEqual(ids, list(range(ids[0], ids[0] + count)), "ids grow by one per batch")

    def test_pushes_every_batch_and_retries_a_503_with_the_same_batch_id(self):
        runtime = FakeRuntime(self, path=os.path.join(self.tmp, "runtime.sock"), statuses=[503])
        module = self.start_source(runtime.env, SOURCE_BATCHES="3")
        self.assertEqual(module.proc.wait(TIMEOUT), 0, module.stderr())
        requests = runtime.snapshot()
        self.assertEqual(len(requests), 4, "three batches plus one retry")
        first, retry = requests[0][0], requests[1][0]
        self.assertEqual(first["weir-batch-id"], retry["weir-batch-id"])
        self.assertEqual((first.get("weir-attempt"), retry.get("weir-attempt")), ("1", "2"))
        self.assertEqual(requests[1][1], requests[0][1], "the retry resends the same body")
        self.assert_delivered(requests, 3)
        self.assertIn("taken 3", module.stdout())
        self.assertFalse(os.path.exists(module.socket_path), "health socket removed at the end")
        self.assert_log_lines(module)

    def test_retries_until_the_runtime_socket_appears(self):
        path = os.path.join(self.tmp, "late.sock")
        module = self.start_source({"WEIR_RUNTIME_SOCKET": path}, SOURCE_BATCHES="2")
        module.wait_for_health()
        time.sleep(0.3)  # several failed connection attempts
        self.assertIsNone(module.proc.poll(), "a missing runtime is retried, not fatal")
        runtime = FakeRuntime(self, path=path)
        self.assertEqual(module.proc.wait(TIMEOUT), 0, module.stderr())
        self.assert_delivered(runtime.snapshot(), 2)
        self.assertIn("cannot reach the runtime", module.stderr())

    def test_health_is_served_while_pushing_over_tcp(self):
        runtime = FakeRuntime(self, tcp=True)
        runtime.hold.set()  # the pipeline is not taking batches yet
        module = self.start_source(runtime.env, transport="tcp", SOURCE_BATCHES="2")
        module.wait_for_health()
        deadline = time.monotonic() + TIMEOUT
        while len(runtime.snapshot()) < 2:  # it is retrying the held batch
            self.assertLess(time.monotonic(), deadline, "source never retried")
            time.sleep(0.02)
        self.assertEqual(module.get("/v1/health"), (200, b"ok"))
        self.assertEqual(module.post(b"x")[0].status, 404, "a source takes no batches")
        runtime.hold.clear()
        self.assertEqual(module.proc.wait(TIMEOUT), 0, module.stderr())
        self.assert_delivered(runtime.snapshot(), 2)

    def test_400_from_the_runtime_stops_the_source_with_the_reason(self):
        runtime = FakeRuntime(self, path=os.path.join(self.tmp, "runtime.sock"), statuses=[400],
                              reject_text="column seq: expected utf8")
        module = self.start_source(runtime.env, SOURCE_BATCHES="3")
        code = module.proc.wait(TIMEOUT)
        self.assertNotEqual(code, 0)
        self.assertEqual(len(runtime.snapshot()), 1, "a rejected batch is not retried")
        self.assertIn("BatchRejected", module.stderr())
        self.assertIn("with 400: column seq: expected utf8", module.stderr())

    def test_sigterm_interrupts_a_blocked_generator_and_exits_0(self):
        runtime = FakeRuntime(self, path=os.path.join(self.tmp, "runtime.sock"))
        closed = os.path.join(self.tmp, "closed")
        module = self.start_source(runtime.env, SOURCE_BATCHES="1", SOURCE_BLOCK="1",
                                   SOURCE_CLOSED_FILE=closed)
        module.wait_for_health()
        deadline = time.monotonic() + TIMEOUT
        while not runtime.snapshot():
            self.assertLess(time.monotonic(), deadline, "source never pushed")
            time.sleep(0.02)
        time.sleep(0.1)  # the generator is now blocked
        self.assertEqual(module.stop(), 0, module.stderr())
        self.assertTrue(os.path.exists(closed), "the generator's finally must have run")
        self.assertIn("taken 1", module.stdout())

    def test_sigterm_ends_retries_against_a_runtime_that_never_takes(self):
        runtime = FakeRuntime(self, path=os.path.join(self.tmp, "runtime.sock"))
        runtime.hold.set()
        module = self.start_source(runtime.env, SOURCE_BATCHES="3")
        module.wait_for_health()
        deadline = time.monotonic() + TIMEOUT
        while len(runtime.snapshot()) < 3:
            self.assertLess(time.monotonic(), deadline, "source never retried")
            time.sleep(0.02)
        self.assertEqual(module.stop(), 0, module.stderr())
        self.assertIn("taken 0", module.stdout())
        self.assertIn("was not delivered", module.stderr())


if __name__ == "__main__":
    unittest.main()
