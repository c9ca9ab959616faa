"""A stand-in for a vLLM OpenAI server with runtime LoRA, on loopback, for the server pool's fault tests (the
real vLLM CPU server, tests/test_engines.py, is too slow to fail at will, and its timing too loose).

It answers /health, /v1/models, /v1/load_lora_adapter, /v1/unload_lora_adapter and /v1/completions as vLLM
does for popsd's requests, with one difference that makes it a sharp test: a completion is a function of the
adapter that answers (the sha256 of its weights file, read at load), the prompt and the seed, so a request
answered with another adapter gives other tokens, and one naming an adapter the server does not hold gets
vLLM's 404 ("The model ... does not exist."). Its log-probs are made up (-1 per token): runs against it set
sampler_gap_warn and sampler_gap_stop out of the way. Faults on demand: delay (seconds per completion), down()
and up() (connections refused, then served again on the same port, its adapters kept), forget() (a restart:
every adapter lost), fail_after (completions answered 500 from the n-th on).
"""
import hashlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from conftest import free_port


def _toy_ids():
    from worlds import common
    tok = common.build_tokenizer()
    return [tok.convert_tokens_to_ids(str(d)) for d in range(10)], tok.eos_token_id


DIGITS, EOS = _toy_ids()  # the toy tokenizer's "0"-"9" and its <|im_end|>


class StandInServer:
    def __init__(self, delay: float = 0.0, fail_after: int | None = None):
        self.port, self.delay, self.fail_after = free_port(), delay, fail_after
        self.url = f"http://127.0.0.1:{self.port}"
        self.adapters: dict[str, str] = {}  # name → digest of its weights
        self.completions, self.answered, self.lock = 0, [], threading.Lock()  # answered: (adapter, seed)
        self.http = None

    def __enter__(self):
        self.up()
        return self

    def __exit__(self, *exc):
        self.down()

    def up(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def reply(self, code: int, body):
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                try:
                    self.wfile.write(data)
                except OSError:  # the client aborted the request
                    pass

            def do_GET(self):
                if self.path == "/health":
                    return self.reply(200, {})
                if self.path == "/v1/models":
                    return self.reply(200, {"data": [{"id": n} for n in ["toy", *server.adapters]]})
                self.reply(404, {"error": "no such route"})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path == "/v1/load_lora_adapter":
                    weights = Path(body["lora_path"]) / "adapter_model.safetensors"
                    server.adapters[body["lora_name"]] = hashlib.sha256(weights.read_bytes()).hexdigest()
                    return self.reply(200, {})
                if self.path == "/v1/unload_lora_adapter":
                    server.adapters.pop(body["lora_name"], None)
                    return self.reply(200, {})
                if self.path == "/v1/completions":
                    return self.reply(*server.complete(body))
                self.reply(404, {"error": "no such route"})

        self.http = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.http.daemon_threads = True
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def down(self):
        if self.http is not None:
            self.http.shutdown()
            self.http.server_close()
            self.http = None

    def forget(self):
        """A restart: the server is back with no adapter loaded."""
        self.adapters.clear()

    def complete(self, body: dict) -> tuple[int, dict]:
        name = body["model"]
        with self.lock:
            self.completions += 1
            n = self.completions
        if self.fail_after is not None and n > self.fail_after:
            return 500, {"error": "stand-in failure"}
        digest = self.adapters.get(name)
        if digest is None:
            return 404, {"error": {"message": f"The model `{name}` does not exist.", "code": 404}}
        time.sleep(self.delay)
        seed = body["seed"]
        h = hashlib.sha256(f"{digest}:{body['prompt']}:{seed}".encode()).digest()
        ids = [DIGITS[b % 10] for b in h[:4 + h[4] % 8]] + [EOS]
        with self.lock:
            self.answered.append((name, seed))
        choice = {"token_ids": ids, "logprobs": {"token_logprobs": [-1.0] * len(ids)}, "text": "",
                  "finish_reason": "stop"}
        return 200, {"model": name, "choices": [choice], "usage": {"completion_tokens": len(ids)}}
