"""engines/client.py: a client of OpenAI-compatible servers (vLLM, SGLang, `transformers serve`), standard
library only, shared by eval.py --server (plumbing/remote.py) and the server pool (server_pool.py).

Every sampling parameter is sent explicitly (sampling_body): a server fills what a request leaves out from the
model's generation_config (Qwen3: top_k 20). A server that is down, or that accepts connections but never
answers, is bounded: see Server and watched.
"""
import contextlib
import http.client
import json
import socket
import threading
import time
import urllib.parse

from plumbing.data import PopsdError


def base_url(url: str) -> str:
    """http://host:port from http://host:port, .../ or .../v1: the client adds /v1/... itself."""
    url = url.strip().rstrip("/")
    return url[:-3].rstrip("/") if url.endswith("/v1") else url


class Unavailable(PopsdError):
    """A server that did not answer: unreachable, silent past its bound, or aborted by the watchdog."""


class ServerError(Exception):
    def __init__(self, code: int, detail: str):
        super().__init__(f"HTTP {code}: {detail}")
        self.code, self.detail = code, detail


class Server:
    """A thin client of one server's /v1 API, standard library only. Bounds keep a dead or wedged server from
    hanging popsd: a connection must open within connect_timeout seconds and a probe (/v1/models, /health, an
    adapter load) be answered within probe_timeout; a completion, sent whole when it is done, may take up to
    request_timeout, while `watched` probes /health meanwhile and aborts the requests of a server that stops
    answering (a process that accepts connections but never replies: stopped, wedged, swapping)."""

    def __init__(self, url: str, model: str | None = None, retries: int = 5, probe_timeout: float = 30.0,
                 request_timeout: float = 3600.0, connect_timeout: float = 10.0):
        self.url, self.model, self.retries = base_url(url), model, retries
        self.probe_timeout, self.request_timeout = probe_timeout, request_timeout
        self.connect_timeout = min(connect_timeout, probe_timeout)
        self.send_ids = True  # token-id prompts until the server says it takes text only
        self.openai_only = False  # a server that refuses vLLM's sampling fields (transformers serve)
        self.prompt_mismatch = 0  # text prompts the server tokenized differently from popsd
        self.lock, self.open, self.gone = threading.Lock(), set(), None  # connections in flight; why aborted

    def _send(self, method: str, path: str, data: bytes | None, timeout: float) -> tuple[int, bytes]:
        """One HTTP exchange: (status, body). Raises ConnectionError when no connection opens (or it breaks),
        TimeoutError when the server stays silent for `timeout` seconds, ConnectionAbortedError once
        aborted."""
        parts = urllib.parse.urlsplit(self.url)
        kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        conn = kind(parts.hostname, parts.port, timeout=self.connect_timeout)
        try:
            try:
                conn.connect()
            except OSError as e:
                raise ConnectionError(getattr(e, "strerror", None) or str(e) or type(e).__name__) from None
            conn.sock.settimeout(timeout)
            with self.lock:
                if self.gone:
                    raise ConnectionAbortedError(self.gone)
                self.open.add(conn)
            try:
                conn.request(method, parts.path + path, body=data,
                             headers={"Content-Type": "application/json"})
                reply = conn.getresponse()
                return reply.status, reply.read()
            except TimeoutError:
                raise
            except OSError as e:  # reset, refused mid-way, or shut down by abort()
                with self.lock:
                    if self.gone:
                        raise ConnectionAbortedError(self.gone) from None
                raise ConnectionError(str(e) or type(e).__name__) from None
            except http.client.HTTPException as e:  # the server closed the connection without a reply
                raise ConnectionError(str(e) or type(e).__name__) from None
        finally:
            with self.lock:
                self.open.discard(conn)
            conn.close()

    def request(self, path: str, body: dict | None = None, retries: int | None = None,
                timeout: float | None = None) -> dict:
        """GET (no body) or POST JSON, answered within `timeout` (default request_timeout); a connection that
        does not open and 5xx answers are retried with exponential backoff, a server that stays silent is
        not."""
        data = None if body is None else json.dumps(body).encode()
        tries = self.retries if retries is None else retries
        wait = self.request_timeout if timeout is None else timeout
        for attempt in range(tries):
            try:
                status, raw = self._send("GET" if data is None else "POST", path, data, wait)
            except ConnectionAbortedError as e:
                raise Unavailable(str(e)) from None
            except TimeoutError:
                raise Unavailable(f"the server at {self.url} accepted the connection but answered "
                                  f"nothing to {path} "
                                 f"within {wait:.0f} s: is it hung, or still starting?") from None
            except ConnectionError as e:
                if attempt == tries - 1:
                    raise Unavailable(f"could not reach the server at {self.url} ({e}): is it "
                                      "running, and is this "
                                     "its address (e.g. http://localhost:8000)?") from None
            else:
                if status < 400:
                    return json.loads(raw) if raw.strip().startswith((b"{", b"[")) else {"text": raw.decode()}
                if status < 500 or attempt == tries - 1:
                    raise ServerError(status, raw.decode(errors="replace")[:500])
            time.sleep(min(2 ** attempt, 30))

    def probe(self, path: str, body: dict | None = None, retries: int = 2) -> dict:
        """A request a live server answers at once (a model list, a health check, an adapter load)."""
        return self.request(path, body, retries=retries, timeout=self.probe_timeout)

    def abort(self, why: str):
        """Every request in flight fails now, and later ones at once, with `why`; revive() undoes it."""
        with self.lock:
            self.gone = why
            for conn in self.open:
                try:
                    conn.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def revive(self):
        self.gone = None


    def served(self) -> list[str]:
        hint = "is it an OpenAI-compatible server, and is this its address (e.g. http://localhost:8000)?"
        try:
            listed = self.probe("/v1/models")
        except ServerError as e:
            raise PopsdError(
                f"the server at {self.url} failed to list its models at /v1/models ({e}); {hint}") from None
        models = listed.get("data") if isinstance(listed, dict) else None
        if not isinstance(models, list) or not all(isinstance(m, dict) and isinstance(m.get("id"), str)
                                                   for m in models):
            raise PopsdError(f"the server at {self.url} answered /v1/models with {str(listed)[:120]!r}, not "
                             f"OpenAI's {{\"data\": [{{\"id\": ...}}]}}; {hint}")
        return [m["id"] for m in models]

    def check_model(self):
        """A clear error, before any work, when the server is unreachable or does not serve --served-model."""
        served = self.served()
        if self.model not in served:
            raise PopsdError(f"the server at {self.url} does not serve {self.model!r}; it serves: "
                             f"{', '.join(served) or 'nothing'} (pass one of them as --served-model)")

    def complete(self, ids: list[int], text: str, seed: int, params: dict) -> dict:
        """One completion for eval.py: {"text", "tokens", "truncated"}."""
        body = {"model": self.model, "seed": seed, "n": 1} | sampling_body(params)
        out = None
        while out is None:
            if self.openai_only:
                body = {k: v for k, v in body.items() if k not in VLLM_FIELDS}
            as_ids = self.send_ids  # what this request sends (other threads may learn first)
            try:
                out = self.request("/v1/completions", body | {"prompt": ids if as_ids else text})
            except ServerError as e:
                if e.code in (400, 422) and "prompt" in e.detail and as_ids:
                    self.send_ids = False  # this server takes text: popsd's chat-templated prompt, decoded
                elif e.code in (400, 422) and "top_k" in e.detail and "top_k" in body:
                    if params["top_k"]:
                        raise PopsdError(f"the server at {self.url} does not take top_k; evaluate with "
                                         "--top-k 0 there (it then samples with its own defaults for "
                                         "top_k and min_p)") from None
                    self.openai_only = True  # top_k, min_p, repetition_penalty: left to the server's defaults
                else:
                    raise
        if not as_ids and out.get("usage", {}).get("prompt_tokens", len(ids)) != len(ids):
            self.prompt_mismatch += 1
        choice = out["choices"][0]
        tokens = (out.get("usage") or {}).get("completion_tokens")
        if tokens is None and choice.get("token_ids") is not None:
            tokens = len(choice["token_ids"])
        return {"text": choice["text"], "tokens": tokens,  # None: the caller counts the text's tokens
                "truncated": choice.get("finish_reason") == "length"}


@contextlib.contextmanager
def watched(servers: list[Server]):
    """While the block runs, every server with requests in flight must answer /health within its probe_timeout
    (checked every half of it, at most every 15 s); one that does not has its requests aborted with a message
    naming it. An HTTP error is an answer: only silence counts."""
    stop = threading.Event()
    servers = list(servers)  # a snapshot: the caller's list may change meanwhile
    every = min(15.0, max(0.5, min((s.probe_timeout for s in servers), default=30.0) / 2))

    def loop():
        while not stop.wait(every):
            for s in servers:
                if s.open and not s.gone:
                    try:
                        s.probe("/health", retries=1)
                    except Unavailable as e:
                        s.abort(f"the server at {s.url} stopped answering: {e}")
                    except (PopsdError, ServerError):  # it answered, if with an error
                        pass
    threading.Thread(target=loop, daemon=True, name="popsd-watchdog").start()
    try:
        yield
    finally:
        stop.set()


VLLM_FIELDS = ("top_k", "min_p", "repetition_penalty")  # not OpenAI's; vLLM and SGLang take them


def sampling_body(params: dict) -> dict:
    """Every sampling parameter, explicit: what a request leaves out the server takes from the model's
    generation_config (Qwen3: top_k 20, ...). top_k -1 is "off" on every vLLM version (0 too, from 0.10)."""
    return {"max_tokens": params["max_new_tokens"], "temperature": params["temperature"],
            "top_p": params["top_p"], "top_k": params["top_k"] or -1, "min_p": 0.0, "repetition_penalty": 1.0,
            "presence_penalty": 0.0, "frequency_penalty": 0.0}
