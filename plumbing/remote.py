"""remote.py: evaluation through any OpenAI-compatible server (vLLM, SGLang, `transformers serve`).

    vllm serve Qwen/Qwen3-8B --enable-lora --lora-modules popsd=runs/X/adapter --max-lora-rank 64
    python eval.py --server http://localhost:8000 --served-model popsd --adapter runs/X/adapter --bench aime24

popsd builds each prompt exactly as the HF path does (student template, chat template, thinking mode) and
sends it to /v1/completions as token ids, or as text where the server only takes text (`transformers
serve`); the server's count of prompt tokens is checked against popsd's. Every sampling parameter is
sent (top_k -1 when off: a server fills what is left out from the model's generation_config). One
request per sample, each with its own seed (servers differ on `n`), `--concurrency` at a time, retried
with backoff when the connection fails. The client (engines/client.py) takes URL or URL/v1. Each question is
graded and appended to out/partial.jsonl as soon as its samples are in: an interrupted evaluation resumes from
there with the same settings.
"""
import concurrent.futures
import json
from pathlib import Path

from engines import request_seed
from engines.client import Server, ServerError, watched
from plumbing.data import PopsdError


def read_partial(partial: Path, benches: dict, grade, warn) -> dict:
    """The questions an interrupted evaluation finished, each re-graded here (a verdict in the file is never
    trusted) and checked to be this evaluation's question; a torn last line (a kill mid-write) is dropped."""
    lines, done = partial.read_text().splitlines(), {}
    for k, line in enumerate(lines, 1):
        try:
            rec = json.loads(line)
            name, i, samples = rec["bench"], int(rec["index"]), rec["samples"]
            q, gold = benches[name][i]
            if (rec["question"], rec["gold"]) != (q, gold) or \
                    not all(isinstance(s["completion"], str) for s in samples):
                raise ValueError("another question or answer than this benchmark's")
        except (ValueError, KeyError, IndexError, TypeError) as e:
            if k == len(lines) and isinstance(e, json.JSONDecodeError):
                warn(f"[yellow]warning: {partial} line {k} is cut short (an interrupted write): "
                     "dropped, redone[/]")
                break
            raise PopsdError(f"{partial} line {k} is not a finished question of this evaluation ({e}): use "
                             "another --out, or delete it") from None
        samples = [{key: s[key] for key in ("completion", "tokens", "truncated")} for s in samples]
        grade(samples, q, gold)
        done[(name, i)] = {"bench": name, "index": i, "question": q, "gold": gold, "samples": samples}
    partial.write_text("".join(json.dumps(r) + "\n" for r in done.values()))  # as read back, torn line gone
    return done


def evaluate_remote(server: Server, tokenizer, benches: dict, prompts: dict, *, n: int, seed: int,
                    params: dict, out: Path, settings: dict, grade, concurrency: int, progress):
    """Like eval.evaluate, through the server: returns records per bench, graded by `grade(samples, q, gold)`.
    prompts[name] holds each question's prompt token ids. Finished questions go to out/partial.jsonl."""
    out.mkdir(parents=True, exist_ok=True)
    partial, saved = out / "partial.jsonl", out / "partial_settings.json"
    done = {}
    if partial.exists():
        if not saved.exists() or json.loads(saved.read_text()) != settings:
            raise PopsdError(f"{partial} holds an evaluation with other settings (or questions, or adapter): "
                             "use another --out, or delete it")
        done = read_partial(partial, benches, grade, progress.console.print)
        progress.console.print(f"resuming: {len(done)} questions already done in {partial}")
    saved.write_text(json.dumps(settings))
    todo = [(name, i) for name, rows in benches.items() for i in range(len(rows)) if (name, i) not in done]
    task = progress.add_task("server", total=len(todo) * n)
    with open(partial,
              "a") as log, concurrent.futures.ThreadPoolExecutor(concurrency) as pool, watched([server]):
        futures = {pool.submit(server.complete, prompts[name][i], tokenizer.decode(prompts[name][i]),
                               request_seed(seed, f"eval:{name}", i) + j, params): (name, i, j)
                   for name, i in todo for j in range(n)}  # eval.evaluate's seeds: engines sample the same
        got = {}
        try:
            for fut in concurrent.futures.as_completed(futures):
                name, i, j = futures[fut]
                try:
                    c = fut.result()
                except ServerError as e:
                    raise PopsdError(f"the server at {server.url} refused a request ({e}); the questions "
                                     f"done so far are in {partial}, a rerun resumes after them") from None
                tokens = c["tokens"] if c["tokens"] is not None else len(tokenizer(
                    c["text"], add_special_tokens=False)["input_ids"])  # a reply without usage: counted here
                got.setdefault((name, i), {})[j] = {"completion": c["text"], "tokens": tokens,
                                                    "truncated": c["truncated"]}
                progress.advance(task)
                if len(got[(name, i)]) == n:  # a whole question: graded here, on the main thread, and kept
                    q, gold = benches[name][i]
                    parts = got.pop((name, i))
                    samples = [parts[k] for k in range(n)]
                    grade(samples, q, gold)
                    done[(name, i)] = {"bench": name, "index": i, "question": q, "gold": gold,
                                       "samples": samples}
                    log.write(json.dumps(done[(name, i)]) + "\n")
                    log.flush()
        # Ctrl-C or an error: stop sending, end the requests in flight, keep what is done
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            server.abort("the evaluation was stopped")
            raise
    progress.remove_task(task)
    if server.openai_only:
        progress.console.print(f"note: the server at {server.url} takes only OpenAI's sampling fields: "
                               "top_k, min_p and repetition_penalty were left to its own defaults (the "
                               "model's generation_config)")
    if server.prompt_mismatch:
        progress.console.print(f"[yellow]warning: for {server.prompt_mismatch} prompts sent as text, the "
                               "server counted a different number of prompt tokens than popsd's chat "
                               "template gives[/]")
    return {name: [done[(name, i)] for i in range(len(rows))] for name, rows in benches.items()}
