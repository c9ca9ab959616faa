import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

# One torch thread per process, this one and every subprocess a test starts (before torch is imported): the
# suite runs two workers side by side (pytest -n 2) on models small enough that a second thread buys nothing.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test reaches the hub; read by huggingface_hub at import
# rich's width in this process and its children, unless a test sets one
os.environ.setdefault("COLUMNS", "200")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """The tiny recipe's random-init Qwen3 and tokenizer, built once for the session."""
    from plumbing import data
    import rollout
    rows = [json.loads(line) for line in (ROOT / "data/toy_math.jsonl").read_text().splitlines()]
    texts = [t for r in rows for t in (r["problem"], r["solution"])] + [
        rollout.STUDENT_TEMPLATE, rollout.TEACHER_TEMPLATE, rollout.REFONLY_TEMPLATE]
    return data.build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", texts, seed=0)


@pytest.fixture(scope="session")
def tiny(tiny_dir):
    """(tokenizer, peft model) of the tiny model, fp32 on CPU, LoRA r8."""
    from plumbing import models
    from plumbing.config import make_config
    cfg = make_config("tiny", ["out_dir=unused"])
    return models.load_model(cfg, models.pick_device("cpu"), str(tiny_dir))


def run_main(main, args, cwd=ROOT) -> subprocess.CompletedProcess:
    """A command's main(argv) run in this process from `cwd`, as `subprocess.run` would report it (exit code,
    output): for tests where a separate process is not the point (each one imports torch and transformers
    anew, ~10 s on a 2-core machine)."""
    out = io.StringIO()
    with contextlib.chdir(cwd), contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else int(e.code is not None)
    return subprocess.CompletedProcess(args, code, out.getvalue(), "")


def train_world_recipe(recipe: str, out: Path, check, steps: int,
                       eval_limit: int) -> subprocess.CompletedProcess:
    """A world's recipe for a few steps on the sketch reference, evaluated at 0 and `steps`; asserts that it
    ran and that every stored verdict is the world's checker's verdict on the stored completion."""
    cmd = [sys.executable, str(ROOT / "popsd.py"), "--recipe", recipe, f"out_dir={out}", f"steps={steps}",
           f"eval_every={steps}", f"eval_limit={eval_limit}", "batch_size=4", "micro_batch_size=4",
           "reference_field=sketch"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval/test/caught_frac" in r] == [0, steps]
    recs = [json.loads(x) for x in (out / f"eval/step_{steps:06d}/samples.jsonl").read_text().splitlines()]
    for r in recs:
        s = r["samples"][0]
        assert s["check"] == check(r["question"],
                                   s["completion"]).__dict__ and s["correct"] == s["check"]["correct"]
    return proc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(cmd: list[str], env: dict, port: int, log: Path, name: str, wait_s: int = 180):
    """Runs a server command (its output to `log`: a full pipe would stall it) until /health answers; yields
    its URL; always stops it. A server that exits or does not come up fails the test with its log's end."""
    url = f"http://127.0.0.1:{port}"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
        try:
            deadline = time.monotonic() + wait_s
            while True:
                try:
                    with urllib.request.urlopen(url + "/health", timeout=1):
                        break
                except OSError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        why = "exited" if proc.poll() is not None else f"did not come up in {wait_s} s"
                        pytest.fail(f"{name} {why}:\n" + log.read_text()[-3000:])
                    time.sleep(0.5)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


class StallingProxy:
    """A TCP proxy on loopback in front of a real server: it forwards every byte until `stall_after` requests
    to /v1/completions have gone through it, then goes silent as a stopped or wedged server does: connections
    still accepted (the kernel does that), nothing forwarded either way, also on the connections already open.
    upstream None: silent from the start. Use as a context manager; its url is what popsd is given."""

    def __init__(self, upstream: str | None = None, stall_after: int = 0):
        import threading
        import urllib.parse
        self.upstream = urllib.parse.urlsplit(upstream) if upstream else None
        self.stall_after = stall_after
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.completions, self.held, self.stalled, self.closing = 0, [], threading.Event(), False
        if upstream is None:
            self.stalled.set()
        self.thread = threading.Thread(target=self._accept, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.closing = True
        self.sock.close()
        for c in self.held:
            c.close()

    def _accept(self):
        import threading
        while not self.closing:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(client)
            if self.stalled.is_set():
                continue  # held: never read, never answered
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client):
        import threading
        try:
            first = client.recv(65536)  # the request line comes first
        except OSError:
            return
        if b"/v1/completions" in first.split(b"\r\n", 1)[0]:
            self.completions += 1
            if self.completions > self.stall_after:
                self.stalled.set()
        if self.stalled.is_set():
            return
        upstream = socket.create_connection((self.upstream.hostname, self.upstream.port))
        self.held.append(upstream)
        upstream.sendall(first)
        threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()
        self._pump(client, upstream)

    def _pump(self, src, dst):
        try:
            while not self.stalled.is_set() and (data := src.recv(65536)):
                if not self.stalled.is_set():
                    dst.sendall(data)
        except OSError:
            pass
