"""remote.py: evaluation through any OpenAI-compatible server (vLLM, SGLang, `transformers serve`).

    vllm serve Qwen/Qwen3-8B --enable-lora --lora-modules popsd=runs/X/adapter --max-lora-rank 64
    python eval.py --server http://localhost:8000 --served-model popsd --adapter runs/X/adapter --bench aime24

popsd builds each prompt exactly as the HF path does (student template, chat template, thinking mode) and
sends it to /v1/completions as token ids, or as text where the server only takes text (`transformers
serve`); the server's count of prompt tokens is checked against popsd's. One request per sample, each
with its own seed (servers differ on `n`), `--concurrency` at a time, retried with backoff when the
connection fails. Each question is graded and appended to out/partial.jsonl as soon as its samples are
in: an interrupted evaluation resumes from there with the same settings.
"""
import concurrent.futures
import json
import time
import urllib.error
import urllib.request
from pathlib import Path

from data import PopsdError


class Server:
    """A thin client of /v1/models and /v1/completions, standard library only."""

    def __init__(self, url: str, model: str, retries: int = 5, timeout: float = 3600):
        self.url, self.model, self.retries, self.timeout = url.rstrip("/"), model, retries, timeout
        self.send_ids = True  # token-id prompts until the server says it takes text only
        self.prompt_mismatch = 0  # text prompts the server tokenized differently from popsd

    def request(self, path: str, body: dict | None = None, retries: int | None = None) -> dict:
        """GET (no body) or POST JSON; connection errors and 5xx answers are retried with exponential backoff."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        for attempt in range(self.retries if retries is None else retries):
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as r:
                    return json.loads(r.read())
            except urllib.error.HTTPError as e:
                detail = e.read().decode(errors="replace")[:500]
                if e.code < 500 or attempt == (self.retries if retries is None else retries) - 1:
                    raise ServerError(e.code, detail) from None
            except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
                if attempt == (self.retries if retries is None else retries) - 1:
                    raise PopsdError(f"could not reach the server at {self.url} ({getattr(e, 'reason', e)}): is it "
                                     "running, and is --server its address (e.g. http://localhost:8000)?") from None
            time.sleep(min(2 ** attempt, 30))

    def check_model(self):
        """A clear error, before any work, when the server is unreachable or does not serve --served-model."""
        served = [m["id"] for m in self.request("/v1/models", retries=2).get("data", [])]
        if self.model not in served:
            raise PopsdError(f"the server at {self.url} does not serve {self.model!r}; it serves: "
                             f"{', '.join(served) or 'nothing'} (pass one of them as --served-model)")

    def complete(self, ids: list[int], text: str, seed: int, params: dict) -> dict:
        """One completion: {"text", "tokens", "truncated"}."""
        body = {"model": self.model, "max_tokens": params["max_new_tokens"], "temperature": params["temperature"],
                "top_p": params["top_p"], "seed": seed, "n": 1}
        if params["top_k"]:
            body["top_k"] = params["top_k"]  # not an OpenAI field: sent only when asked for (vLLM, SGLang take it)
        if self.send_ids:
            try:
                out = self.request("/v1/completions", body | {"prompt": ids})
            except ServerError as e:
                if e.code not in (400, 422) or "prompt" not in e.detail:
                    raise
                self.send_ids = False  # this server takes text: popsd's chat-templated prompt, decoded
        if not self.send_ids:
            out = self.request("/v1/completions", body | {"prompt": text})
            if out.get("usage", {}).get("prompt_tokens", len(ids)) != len(ids):
                self.prompt_mismatch += 1
        choice = out["choices"][0]
        tokens = out.get("usage", {}).get("completion_tokens", 0)
        return {"text": choice["text"], "tokens": tokens, "truncated": choice.get("finish_reason") == "length"}


class ServerError(Exception):
    def __init__(self, code: int, detail: str):
        super().__init__(f"HTTP {code}: {detail}")
        self.code, self.detail = code, detail


def evaluate_remote(server: Server, tokenizer, benches: dict, prompts: dict, *, n: int, seed: int, params: dict,
                    out: Path, settings: dict, grade, concurrency: int, progress):
    """Like eval.evaluate, through the server: returns records per bench, graded by `grade(samples, q, gold)`.
    prompts[name] holds each question's prompt token ids. Finished questions go to out/partial.jsonl."""
    out.mkdir(parents=True, exist_ok=True)
    partial, saved = out / "partial.jsonl", out / "partial_settings.json"
    done = {}
    if partial.exists():
        if not saved.exists() or json.loads(saved.read_text()) != settings:
            raise PopsdError(f"{partial} holds an evaluation with other settings: use another --out, or delete it")
        for line in partial.read_text().splitlines():
            rec = json.loads(line)
            done[(rec["bench"], rec["index"])] = rec
        progress.console.print(f"resuming: {len(done)} questions already done in {partial}")
    saved.write_text(json.dumps(settings))
    todo = [(name, i) for name, rows in benches.items() for i in range(len(rows)) if (name, i) not in done]
    task = progress.add_task("server", total=len(todo) * n)
    with open(partial, "a") as log, concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        futures = {pool.submit(server.complete, prompts[name][i], tokenizer.decode(prompts[name][i]),
                               seed + 1000 * i + j, params): (name, i, j) for name, i in todo for j in range(n)}
        got = {}
        try:
            for fut in concurrent.futures.as_completed(futures):
                name, i, j = futures[fut]
                try:
                    c = fut.result()
                except ServerError as e:
                    raise PopsdError(f"the server at {server.url} refused a request ({e}); the questions done so "
                                     f"far are in {partial}, a rerun resumes after them") from None
                got.setdefault((name, i), {})[j] = {"completion": c["text"], "tokens": c["tokens"],
                                                    "truncated": c["truncated"]}
                progress.advance(task)
                if len(got[(name, i)]) == n:  # a whole question: graded here, on the main thread, and kept
                    q, gold = benches[name][i]
                    parts = got.pop((name, i))
                    samples = [parts[k] for k in range(n)]
                    grade(samples, q, gold)
                    done[(name, i)] = {"bench": name, "index": i, "question": q, "gold": gold, "samples": samples}
                    log.write(json.dumps(done[(name, i)]) + "\n")
                    log.flush()
        except BaseException:  # Ctrl-C or an error: stop sending, keep what is done
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    progress.remove_task(task)
    if server.prompt_mismatch:
        progress.console.print(f"[yellow]warning: for {server.prompt_mismatch} prompts sent as text, the server counted "
                               "a different number of prompt tokens than popsd's chat template gives[/]")
    return {name: [done[(name, i)] for i in range(len(rows))] for name, rows in benches.items()}
