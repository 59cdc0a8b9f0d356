#!/usr/bin/python3
"""A client no one here wrote: Python grpcio against `tandem serve` (run by ctest).

Starts a server on a free loopback port (in its own process group, always stopped), then calls
ModelInfo, Generate, GenerateStream and grpc.health.v1 Check, and checks the status codes of a
bad request and of a missing bearer token.

usage: python_client_test.py TANDEM_BINARY STUBS_DIR MAKE_TINY_CHECKPOINT
"""
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import unittest

TANDEM, STUBS, MAKER = sys.argv[1:4]
sys.path.insert(0, STUBS)
import grpc  # noqa: E402
import tandem_pb2 as pb  # noqa: E402
import tandem_pb2_grpc as pb_grpc  # noqa: E402
import health_pb2  # noqa: E402  (grpc.health.v1)
import health_pb2_grpc  # noqa: E402


class Server:
    def __init__(self, model_dir, log_path, extra=()):
        self.log_path = log_path
        self.log = open(log_path, "w")
        self.process = subprocess.Popen(
            [TANDEM, "serve", "--model", model_dir, "--port", "0", "--threads", "1"] + list(extra),
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 60
        while time.time() < deadline:
            m = re.search(r"listening on (127\.0\.0\.1:\d+)", open(log_path).read())
            if m:
                self.address = m.group(1)
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("server did not start: " + open(log_path).read())

    def stop(self):
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.log.close()
        return self.process.returncode


class PythonClientTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        model = os.path.join(cls.tmp.name, "model")
        subprocess.run([MAKER, model], check=True)
        token_file = os.path.join(cls.tmp.name, "token")
        with open(token_file, "w") as f:
            f.write("py-token\n")
        cls.server = Server(model, os.path.join(cls.tmp.name, "serve.log"),
                            ["--auth-token-file", token_file])
        cls.channel = grpc.insecure_channel(cls.server.address)
        cls.stub = pb_grpc.GenerationStub(cls.channel)
        cls.auth = [("authorization", "Bearer py-token")]

    @classmethod
    def tearDownClass(cls):
        cls.channel.close()
        code = cls.server.stop()
        cls.tmp.cleanup()
        assert code == 0, f"server exited {code}"

    def test_health_check_is_serving(self):
        health = health_pb2_grpc.HealthStub(self.channel)
        r = health.Check(health_pb2.HealthCheckRequest(), timeout=5)
        self.assertEqual(r.status, health_pb2.HealthCheckResponse.SERVING)

    def test_model_info(self):
        info = self.stub.ModelInfo(pb.ModelInfoRequest(), metadata=self.auth, timeout=5)
        self.assertEqual(info.family, "gpt2")
        self.assertEqual(info.max_seq_len, 1024)
        self.assertGreater(info.vocab_size, 256)
        self.assertEqual(info.model, "model")

    def test_generate_and_stream_agree(self):
        request = pb.GenerateRequest(prompt="The quick brown fox", max_tokens=12)
        request.sampling.temperature = 0.0
        whole = self.stub.Generate(request, metadata=self.auth, timeout=30)
        self.assertEqual(len(whole.token_ids), whole.usage.completion_tokens)
        self.assertGreater(whole.usage.prompt_tokens, 0)
        tokens, text, last = [], "", None
        for message in self.stub.GenerateStream(request, metadata=self.auth, timeout=30):
            tokens += list(message.token_ids)
            text += message.text
            last = message
        self.assertEqual(tokens, list(whole.token_ids))
        self.assertEqual(text, whole.text)
        self.assertEqual(last.finish_reason, whole.finish_reason)
        self.assertNotEqual(last.finish_reason, pb.FINISH_REASON_UNSPECIFIED)

    def test_bad_request_and_missing_token(self):
        bad = pb.GenerateRequest(prompt="hi", max_tokens=4)
        bad.sampling.top_p = 1.5
        with self.assertRaises(grpc.RpcError) as e:
            self.stub.Generate(bad, metadata=self.auth, timeout=10)
        self.assertEqual(e.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)
        self.assertIn("top_p", e.exception.details())
        with self.assertRaises(grpc.RpcError) as e:
            self.stub.Generate(pb.GenerateRequest(prompt="hi"), timeout=10)
        self.assertEqual(e.exception.code(), grpc.StatusCode.UNAUTHENTICATED)


if __name__ == "__main__":
    unittest.main(argv=[sys.argv[0], "-v"])
