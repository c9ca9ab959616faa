"""server_pool.py: OpenAI-compatible servers, as a client (eval.py --server) and as popsd's sampler
(rollout_server=URL[,URL...]): rollouts on other GPUs or nodes while training runs here.

    python -m vllm.entrypoints.openai.api_server --model Qwen/Qwen3-8B --enable-lora --max-lora-rank 64 \
        --logprobs-mode raw_logprobs --generation-config vllm --port 8000     # VLLM_ALLOW_RUNTIME_LORA_UPDATING=True
    python popsd.py --recipe single_gpu rollout_server=http://gpu1:8000,http://gpu2:8000

After every optimizer step rank 0 writes the student's adapter to rollout_adapter_dir/popsd-RUN-step-N (a
folder the servers can read: by default inside the run folder, right when they share this disk), loads
it on every server (/v1/load_lora_adapter) and unloads the previous one. RUN is a hash of the run folder
and a nonce of the session: no name is ever used for two adapters. Each prompt goes as token ids to
/v1/completions naming the step's adapter, with every sampling parameter explicit (a server fills what a
request leaves out from the model's generation_config: Qwen3 ships top_k 20) and its own seed per sample;
requests are spread over the servers, `rollout_concurrency` in flight per server, and a request that
fails on one server is retried on the others. A reply must name the step's adapter and carry the
completion's token ids and raw log-probs, or the step stops with a clear error.
"""
import concurrent.futures
import contextlib
import http.client
import json
import secrets
import shutil
import socket
import threading
import time
import urllib.parse
from pathlib import Path

import distributed as D
from checkpoints import save_adapter, trainable_state
from data import PopsdError
from rollout import pack


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
        TimeoutError when the server stays silent for `timeout` seconds, ConnectionAbortedError once aborted."""
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
                conn.request(method, parts.path + path, body=data, headers={"Content-Type": "application/json"})
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
        """GET (no body) or POST JSON, answered within `timeout` (default request_timeout); a connection that does
        not open and 5xx answers are retried with exponential backoff, a server that stays silent is not."""
        data = None if body is None else json.dumps(body).encode()
        tries = self.retries if retries is None else retries
        wait = self.request_timeout if timeout is None else timeout
        for attempt in range(tries):
            try:
                status, raw = self._send("GET" if data is None else "POST", path, data, wait)
            except ConnectionAbortedError as e:
                raise Unavailable(str(e)) from None
            except TimeoutError:
                raise Unavailable(f"the server at {self.url} accepted the connection but answered nothing to {path} "
                                 f"within {wait:.0f} s: is it hung, or still starting?") from None
            except ConnectionError as e:
                if attempt == tries - 1:
                    raise Unavailable(f"could not reach the server at {self.url} ({e}): is it running, and is this "
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
            raise PopsdError(f"the server at {self.url} failed to list its models at /v1/models ({e}); {hint}") from None
        models = listed.get("data") if isinstance(listed, dict) else None
        if not isinstance(models, list) or not all(isinstance(m, dict) and isinstance(m.get("id"), str) for m in models):
            raise PopsdError(f"the server at {self.url} answered /v1/models with {str(listed)[:120]!r}, not OpenAI's "
                             f"{{\"data\": [{{\"id\": ...}}]}}; {hint}")
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
                        raise PopsdError(f"the server at {self.url} does not take top_k; evaluate with --top-k 0 "
                                         "there (it then samples with its own defaults for top_k and min_p)") from None
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

    def loop():
        while not stop.wait(min(15.0, max(0.5, min(s.probe_timeout for s in servers) / 2))):
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
    return {"max_tokens": params["max_new_tokens"], "temperature": params["temperature"], "top_p": params["top_p"],
            "top_k": params["top_k"] or -1, "min_p": 0.0, "repetition_penalty": 1.0, "presence_penalty": 0.0,
            "frequency_penalty": 0.0}


class ServerPool:
    """popsd's sampler on a pool of vLLM servers (see the module docstring)."""
    reports_logprobs = True

    def __init__(self, urls: str, tokenizer, eos_ids: list[int], adapter_dir: Path, concurrency: int,
                 run_id: str, rank: int = 0, retries: int = 2, warn=print, probe_timeout: float = 30.0):
        self.servers = [Server(u, retries=retries, probe_timeout=probe_timeout) for u in urls.split(",") if u.strip()]
        self.tokenizer, self.eos_ids, self.rank, self.concurrency = tokenizer, eos_ids, rank, concurrency
        self.warn = warn
        self.adapter_dir, self.name, self.lock = Path(adapter_dir).resolve(), None, threading.Lock()
        # in every adapter name: a hash of the run folder (runs sharing a server never answer with each other's
        # adapter) and a nonce of this session, rank 0's on every rank: vLLM keys its prefix cache on the adapter's
        # name and path, and unloading an adapter keeps its blocks, so a rerun into the same folder would otherwise
        # be answered from KV computed by the previous run's adapter of the same step
        self.run = f"{run_id}-{D.gather(secrets.token_hex(4))[0]}"
        problems = []
        for s in self.servers:  # a clear error now rather than after the first step's work
            try:
                s.served()
            except PopsdError as e:
                problems.append(str(e))
        if len(problems) == len(self.servers):
            raise PopsdError(f"no rollout server answered: {problems[0]}")
        for p in problems:  # still tried at every step: it may come up later
            warn(f"warning: {p}")
        self.alive = list(self.servers)

    def sync(self, model, step: int):
        """Rank 0 writes the adapter after `step` optimizer steps, loads it on every server and unloads the last
        one; every rank (FSDP gathers the adapter) then learns which servers took it (a collective: a barrier)."""
        weights = trainable_state(model)
        name, previous = f"popsd-{self.run}-step-{step}", self.name
        alive = list(self.servers)
        if self.rank == 0:
            folder = self.adapter_dir / name
            shutil.rmtree(folder, ignore_errors=True)
            save_adapter(model, weights, folder)
            for s in self.servers:
                s.revive()  # a server dropped last step is asked again: it may be back
                try:
                    self.load(s, name, folder)
                except Unavailable as e:
                    self.warn(f"warning: step {step}: {e}; sampling on the others")
                    alive.remove(s)
            if not alive:
                raise PopsdError(f"no rollout server took the adapter {name}: start them (docs/engines.md), then resume=true")
            if previous and previous != name:
                self.unload(previous)
        alive = D.gather([self.servers.index(s) for s in alive])[0]  # rank 0's view, on every rank
        self.name, self.alive = name, [self.servers[i] for i in alive]

    def load(self, server: Server, name: str, folder: Path):
        try:
            server.probe("/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(folder),
                                                   "load_inplace": True})  # a crashed try's leftover is replaced
        except ServerError as e:
            hint = (" (start it with --enable-lora, --max-lora-rank >= lora_r and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True;"
                    f" it must be able to read {folder})")
            raise PopsdError(f"the server at {server.url} did not load the adapter {name}: {e}{hint}") from None

    def generate(self, prompts: list[list[int]], *, n, max_new_tokens, temperature, top_p, top_k, seeds,
                 on_batch=None):
        """n completions per prompt, [B = prompts × n] as rollout.generate, plus the log-probs [B, T]."""
        if self.name is None:
            raise PopsdError("the server pool has no adapter yet: sync(model, step) comes before sampling")
        body = {"model": self.name, "n": 1, "logprobs": 0, "return_token_ids": True, "stop_token_ids": self.eos_ids,
                "skip_special_tokens": False} | sampling_body(dict(max_new_tokens=max_new_tokens, top_k=top_k,
                                                                  temperature=temperature, top_p=top_p))
        jobs = [(i, j) for i in range(len(prompts)) for j in range(n)]
        results = {}
        workers = max(1, self.concurrency * len(self.servers))
        with concurrent.futures.ThreadPoolExecutor(workers) as pool, watched(self.alive):
            futures = {pool.submit(self.complete, k, body | {"prompt": prompts[i], "seed": seeds[i] + j}): (i, j)
                       for k, (i, j) in enumerate(jobs)}
            try:
                for fut in concurrent.futures.as_completed(futures):
                    results[futures[fut]] = fut.result()
                    if on_batch:
                        on_batch(1)
            except BaseException:  # an error, Ctrl-C or SIGTERM: stop sending and end the requests in flight
                pool.shutdown(wait=False, cancel_futures=True)
                for s in self.servers:
                    s.abort("sampling was stopped")  # sync() revives them
                raise
        tokens = [results[job][0] for job in jobs]
        return pack(tokens, [results[job][1] for job in jobs], self.tokenizer, self.eos_ids)

    def complete(self, k: int, body: dict) -> tuple[list[int], list[float]]:
        """One completion from the k-th server in turn; a server that fails is dropped for this step and the
        request goes to the next one."""
        errors = []
        while True:
            with self.lock:
                if not self.alive:
                    raise PopsdError(f"no rollout server answered ({'; '.join(errors[-3:])}): start them (docs/engines.md), "
                                     "then resume=true")
                server = self.alive[k % len(self.alive)]
            try:
                out = server.request("/v1/completions", body)
            except (PopsdError, ServerError) as e:
                if isinstance(e, ServerError) and e.code < 500:
                    raise PopsdError(f"the server at {server.url} refused a rollout request ({e})") from None
                errors.append(str(e))
                with self.lock:
                    if server in self.alive:
                        self.alive.remove(server)
                        self.warn(f"warning: {e}; its requests go to the other servers for the rest of this step")
                continue
            return parse_completion(out, body["model"], server.url)

    def unload(self, name: str):
        """An adapter off every server (one that restarted or died no longer has it) and off the disk."""
        for s in self.servers:
            try:
                s.probe("/v1/unload_lora_adapter", {"lora_name": name}, retries=1)
            except (ServerError, PopsdError):
                pass
        shutil.rmtree(self.adapter_dir / name, ignore_errors=True)

    def close(self):
        if self.rank == 0 and self.name:
            self.unload(self.name)


def parse_completion(out: dict, name: str, url: str) -> tuple[list[int], list[float]]:
    """(token ids, raw log-probs) of a /v1/completions reply, checked to come from the adapter `name`."""
    if out.get("model") != name:
        raise PopsdError(f"the server at {url} answered as {out.get('model')!r}, not the step's adapter {name!r}")
    choice = out["choices"][0]
    ids = choice.get("token_ids")
    if ids is None:
        raise PopsdError(f"the server at {url} returned no token ids (return_token_ids): popsd needs a vLLM server "
                         "recent enough to return them (0.10.2 or later)")
    lp = (choice.get("logprobs") or {}).get("token_logprobs")
    if lp is None or len(lp) != len(ids):
        raise PopsdError(f"the server at {url} returned no log-probs of the sampled tokens (logprobs=0)")
    return list(ids), [float(x) for x in lp]
