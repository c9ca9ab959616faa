"""engines/server_pool.py: a pool of vLLM servers as popsd's sampler (rollout_server=URL[,URL...]): rollouts
on other GPUs or nodes while training runs here (the HTTP client: engines/client.py).

    python -m vllm.entrypoints.openai.api_server --model Qwen/Qwen3-8B --enable-lora --max-lora-rank 64 \
        --logprobs-mode raw_logprobs --generation-config vllm --port 8000
        # with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True in its environment
    python popsd.py --recipe single_gpu rollout_server=http://gpu1:8000,http://gpu2:8000

After every optimizer step rank 0 writes the student's adapter to rollout_adapter_dir/popsd-RUN-step-N (a
folder the servers can read: by default inside the run folder, right when they share this disk), loads
it on every server (/v1/load_lora_adapter) and unloads the previous one (rollout_ahead=1: the one before it,
the previous one still samples the next step). RUN is a hash of the run folder
and a nonce of the session: no name is ever used for two adapters. Each prompt goes as token ids to
/v1/completions naming the step's adapter, with every sampling parameter explicit (a server fills what a
request leaves out from the model's generation_config: Qwen3 ships top_k 20) and its own seed per sample;
requests are spread over the servers, `rollout_concurrency` in flight per server, and a request that
fails on one server is retried on the others. A reply must name the step's adapter and carry the
completion's token ids and raw log-probs, or the step stops with a clear error.
"""
import concurrent.futures
import contextlib
import secrets
import shutil
import threading
from pathlib import Path

from engines.client import Server, ServerError, Unavailable, sampling_body, watched
from plumbing import distributed
from plumbing.checkpoints import save_adapter, trainable_state
from plumbing.data import PopsdError
from rollout import Rollout, from_tokens


class ServerPool:
    """popsd's sampler on a pool of vLLM servers (see the module docstring)."""
    reports_logprobs = True

    def __init__(self, urls: str, tokenizer, eos_ids: list[int], adapter_dir: Path, concurrency: int,
                 run_id: str, rank: int = 0, retries: int = 2, warn=print, probe_timeout: float = 30.0,
                 ahead: int = 0):
        self.servers = [Server(u, retries=retries, probe_timeout=probe_timeout) for u in urls.split(",")
                        if u.strip()]
        self.tokenizer, self.eos_ids, self.rank, self.concurrency = tokenizer, eos_ids, rank, concurrency
        self.warn = warn
        self.adapter_dir, self.name, self.lock = Path(adapter_dir).resolve(), None, threading.Lock()
        self.step, self.loaded, self.keep = None, [], 1 + ahead  # adapters on the servers, oldest first
        self.held = {s: set() for s in self.servers}  # the adapters each server is known to hold
        self.local = threading.local()  # .pin: the adapter a thread's requests name (Ahead pins one)
        # in every adapter name: a hash of the run folder (runs sharing a server never answer with each
        # other's adapter) and a nonce of this session, rank 0's on every rank: vLLM keys its prefix cache on
        # the adapter's name and path, and unloading an adapter keeps its blocks, so a rerun into the same
        # folder would otherwise be answered from KV computed by the previous run's adapter of the same step
        self.run = f"{run_id}-{distributed.gather(secrets.token_hex(4))[0]}"
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

    def folder(self, name: str) -> Path:
        return self.adapter_dir / name

    def adapter_folder(self, step: int) -> Path | None:
        """The folder of the adapter after `step` optimizer steps, while the servers hold it (rank 0)."""
        name = f"popsd-{self.run}-step-{step}"
        return self.folder(name) if name in self.loaded and self.folder(name).is_dir() else None

    def sync(self, model, step: int):
        """Rank 0 writes the adapter after `step` optimizer steps, loads it on every server and unloads the
        one before last (rollout_ahead=1: the one before it still samples the next step); every rank (FSDP
        gathers the adapter) then learns which servers took it (a collective: a barrier)."""
        weights = trainable_state(model)
        self.publish(step, lambda folder: save_adapter(model, weights, folder))

    def publish(self, step: int, write):
        """The adapter after `step` optimizer steps, written into its folder by write(folder) on rank 0,
        loaded on every server that answers; from now on requests name it (but a pinned thread's)."""
        name = f"popsd-{self.run}-step-{step}"
        for s in self.servers:  # every rank: a server this rank's watchdog dropped last step may be back
            s.revive()
        took = []
        if self.rank == 0:
            folder = self.folder(name)
            shutil.rmtree(folder, ignore_errors=True)
            write(folder)
            for s in self.servers:
                try:
                    self.load(s, name, folder)
                    took.append(s)
                except Unavailable as e:
                    self.warn(f"warning: step {step}: {e}; sampling on the others")
            if not took:
                raise PopsdError(f"no rollout server took the adapter {name}: start them (docs/engines.md), "
                                 "then resume=true")
            self.loaded = [n for n in self.loaded if n != name] + [name]
            while len(self.loaded) > self.keep:
                self.unload(self.loaded.pop(0))
        took = distributed.gather([self.servers.index(s) for s in took])[0]  # rank 0's view, on every rank
        with self.lock:  # rollouts sampled ahead may be picking servers meanwhile
            for i in took:
                self.held[self.servers[i]].add(name)
            self.name, self.step = name, step
            self.alive = [self.servers[i] for i in took]

    def load(self, server: Server, name: str, folder: Path):
        try:
            server.probe("/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(folder),
                                                   # a crashed try's leftover is replaced
                                                   "load_inplace": True})
        except ServerError as e:
            hint = (" (start it with --enable-lora, --max-lora-rank >= lora_r and "
                    f"VLLM_ALLOW_RUNTIME_LORA_UPDATING=True; it must be able to read {folder})")
            raise PopsdError(
                f"the server at {server.url} did not load the adapter {name}: {e}{hint}") from None
        with self.lock:
            self.held[server].add(name)

    def pin(self) -> tuple[str, int]:
        """The adapter requests name now, and the steps it had seen: what Ahead pins for its thread."""
        if self.name is None:
            raise PopsdError("the server pool has no adapter yet: sync(model, step) comes before sampling")
        with self.lock:
            return self.name, self.step

    @contextlib.contextmanager
    def pinned(self, pin: tuple[str, int]):
        """This thread's requests name the pinned adapter, whatever sync() loads meanwhile."""
        self.local.pin = pin
        try:
            yield
        finally:
            self.local.pin = None

    def generate(self, prompts: list[list[int]], *, n, max_new_tokens, temperature, top_p, top_k, seeds,
                 on_batch=None) -> Rollout:
        """n completions per prompt ([B = prompts × n] rows) with the log-prob of each sampled token."""
        name, weights_step = getattr(self.local, "pin", None) or self.pin()
        body = {"model": name, "n": 1, "logprobs": 0, "return_token_ids": True,
                "stop_token_ids": self.eos_ids, "skip_special_tokens": False}
        body |= sampling_body({"max_new_tokens": max_new_tokens, "top_k": top_k, "temperature": temperature,
                               "top_p": top_p})
        jobs = [(i, j) for i in range(len(prompts)) for j in range(n)]
        results = {}
        workers = max(1, self.concurrency * len(self.servers))
        with concurrent.futures.ThreadPoolExecutor(workers) as pool, watched(self.servers):
            futures = {pool.submit(self.complete, k,
                                   body | {"prompt": prompts[i], "seed": seeds[i] + j}): (i, j)
                       for k, (i, j) in enumerate(jobs)}
            try:
                for fut in concurrent.futures.as_completed(futures):
                    results[futures[fut]] = fut.result()
                    if on_batch:
                        on_batch(1)
            except BaseException:  # an error, Ctrl-C or SIGTERM: stop sending and end the requests in flight
                pool.shutdown(wait=False, cancel_futures=True)
                self.abort("sampling was stopped")
                raise
        tokens = [results[job][0] for job in jobs]
        rollout = from_tokens(tokens, [results[job][1] for job in jobs], self.tokenizer, self.eos_ids)
        rollout.weights_step = weights_step
        return rollout

    def abort(self, why: str):
        """Every request in flight on every server ends now (sync() and close() revive them)."""
        for s in self.servers:
            s.abort(why)

    def complete(self, k: int, body: dict) -> tuple[list[int], list[float]]:
        """One completion, from the k-th of the servers that hold the request's adapter. A server that fails
        is dropped for this step and the request goes to the next one; a server that answers that it does not
        hold the adapter (it came back, or restarted and lost it) is given it, or passed over."""
        errors, name = [], body["model"]
        while True:
            with self.lock:
                holding = [s for s in self.alive if name in self.held[s]]
                lacking = [s for s in self.alive if name not in self.held[s]]
            if not holding and lacking:  # none holds it: the first that will load it
                self.give(lacking[0], name, errors)
                continue
            if not holding:
                raise PopsdError(f"no rollout server answered ({'; '.join(errors[-3:])}): start them "
                                 "(docs/engines.md), then resume=true")
            server = holding[k % len(holding)]
            try:
                out = server.request("/v1/completions", body)
            except (PopsdError, ServerError) as e:
                if isinstance(e, ServerError) and e.code == 404:  # vLLM: "The model ... does not exist"
                    with self.lock:
                        self.held[server].discard(name)
                    self.give(server, name, errors)
                    continue
                if isinstance(e, ServerError) and e.code < 500:
                    raise PopsdError(f"the server at {server.url} refused a rollout request ({e})") from None
                errors.append(str(e))
                self.drop(server, e)
                continue
            return parse_completion(out, name, server.url)

    def give(self, server: Server, name: str, errors: list):
        """Loads the adapter `name` onto a live server that lacks it, from its folder (still on the shared
        disk); a server that will not take it is dropped for this step."""
        with self.lock:
            if name in self.held[server]:
                return
        try:
            self.load(server, name, self.folder(name))
        except PopsdError as e:  # unreachable, or it refused the load
            errors.append(str(e))
            self.drop(server, e)
            return
        self.warn(f"warning: the server at {server.url} did not hold the adapter {name} (back from a "
                  "failure, or restarted): loaded it again")

    def drop(self, server: Server, why):
        with self.lock:
            if server in self.alive:
                self.alive.remove(server)
                self.warn(f"warning: {why}; its requests go to the other servers for the rest of this step")

    def unload(self, name: str):
        """An adapter off every server (one that restarted or died no longer has it) and off the disk."""
        for s in self.servers:
            try:
                s.probe("/v1/unload_lora_adapter", {"lora_name": name}, retries=1)
            except (ServerError, PopsdError):
                pass
            with self.lock:
                self.held[s].discard(name)
        shutil.rmtree(self.folder(name), ignore_errors=True)

    def close(self):
        for s in self.servers:
            s.revive()  # aborted by a stop: the adapters still come off
        if self.rank == 0:
            for name in self.loaded:
                self.unload(name)


def parse_completion(out: dict, name: str, url: str) -> tuple[list[int], list[float]]:
    """(token ids, raw log-probs) of a /v1/completions reply, checked to come from the adapter `name`."""
    if out.get("model") != name:
        raise PopsdError(f"the server at {url} answered as {out.get('model')!r}, not the step's "
                         f"adapter {name!r}")
    choice = out["choices"][0]
    ids = choice.get("token_ids")
    if ids is None:
        raise PopsdError(f"the server at {url} returned no token ids (return_token_ids): popsd needs a vLLM "
                         "server recent enough to return them (0.10.2 or later)")
    lp = (choice.get("logprobs") or {}).get("token_logprobs")
    if lp is None or len(lp) != len(ids):
        raise PopsdError(f"the server at {url} returned no log-probs of the sampled tokens (logprobs=0)")
    return list(ids), [float(x) for x in lp]
