"""engines/: how the student's completions ŷ are sampled. One interface, five engines, one chooser.

Every engine is a class with
    generate(prompts, *, n, max_new_tokens, temperature, top_p, top_k, seeds, on_batch=None) ->
    rollout.Rollout
        n completions per prompt (token ids, prompts × n rows); seeds[i] is prompt i's seed (sample j: + j);
        on_batch(k) is called as k more sequences are done (progress)
    sync(model, step)   the adapter after `step` optimizer steps becomes the one that samples (an engine that
                        holds its own copy of the weights gets it; one sampling the training model has nothing
                        to do)
    close()
    reports_logprobs    whether its Rollouts carry the engine's log-prob of each sampled token

    engine           file            samples with                                config
    dynamic, static  hf.py           HF generate on the training model           rollout_engine=dynamic|static
                                     (the default: dynamic)
    graph            graph.py        a static KV cache, each step a CUDA graph   rollout_engine=graph
                                     (the toy recipes', run eagerly on a CPU)
    vllm             vllm_engine.py  vLLM in-process, a LoRA adapter per step    rollout_engine=vllm
    server pool      server_pool.py  vLLM servers over HTTP (client: client.py)  rollout_server=URL,...

`make_sampler` picks the one the config names: the loop (popsd.py) never branches on which. Heavy engines are
imported only when chosen. Every engine samples from exactly the distribution the config describes (no model
folder's sampling settings apply: tests/test_graph_engine.py, tests/test_engines.py).

Seeds. The loop and every evaluation give each prompt a seed (request_seed: the run's seed, the step or the
benchmark, the prompt's place in the whole batch). HF generate and the graph sampler draw each row's tokens
from its own seed (sampling.py), so their samples do not depend on the rank, the other prompts in the batch,
the generation batch size or the call order (tests/test_sampling.py), and the two give the same samples from
the same seeds (tests/test_graph_engine.py). vLLM, in-process or served, takes the same seeds with its own
generator: a server pool's samples do not depend on which server answers. Across engines the numerics and
generators differ, so one seed gives each engine other samples.
"""
import hashlib
from pathlib import Path

import torch

from plumbing.data import PopsdError
from plumbing.models import model_positions


def request_seed(seed: int, step: int | str, index: int) -> int:
    """The seed of one prompt's requests at one step (or in one evaluation, named; sample j uses + j): from
    the run's seed, the step and the prompt's place in the whole batch, so not from the rank or the server
    that samples it (what each engine makes of it: this module's docstring)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{step}:{index}".encode()).digest()[:6], "big")


def make_sampler(cfg, model, tokenizer, path: str, eos: list[int], device, out: Path, rank: int, world: int,
                 warn=print):
    """The engine the config names (see the table above), ready to sample; warn(message) for what it
    reports."""
    if cfg.rollout_server:
        from engines.server_pool import ServerPool
        run_id = hashlib.sha256(str(out.resolve()).encode()).hexdigest()[:8]
        return ServerPool(cfg.rollout_server, tokenizer, eos,
                          Path(cfg.rollout_adapter_dir or out / "rollout_adapters"),
                          cfg.rollout_concurrency, run_id, rank, warn=warn, probe_timeout=cfg.server_timeout,
                          ahead=cfg.rollout_ahead)
    if cfg.rollout_engine in ("graph", "vllm") and world > 1:
        raise PopsdError(f"rollout_engine={cfg.rollout_engine} samples in one process from its whole "
                         "weights: under torchrun sample with rollout_engine=dynamic (sample_gathered) or "
                         "rollout_server=URL,...")
    if cfg.rollout_engine == "vllm":
        from engines.vllm_engine import VLLMEngine
        longest = cfg.max_prompt_len + max(cfg.max_new_tokens,
                                           cfg.eval_max_new_tokens if cfg.eval_every else 0)
        return VLLMEngine(cfg, path, tokenizer, eos, device,
                          max_model_len=min(longest, model_positions(model)))
    if cfg.rollout_engine == "graph":
        from engines.graph import GraphSampler
        return GraphSampler(model, tokenizer, batch_size=graph_rows(cfg, model, device)[0], device=device,
                            eos_ids=eos, keep_rows=cfg.graph_keep_rows)
    from engines.hf import HFSampler
    return HFSampler(model, tokenizer, engine=cfg.rollout_engine, batch_size=cfg.gen_batch_size,
                     device=device, eos_ids=eos, gather=cfg.sample_gathered)


def graph_rows(cfg, model, device) -> tuple[int, str]:
    """rollout_engine=graph: rows per batch whose static KV caches fit graph_kv_gb (0: a quarter of the GPU's
    free memory, 8 GiB on a CPU), and the start-up table's line."""
    from engines.graph import plan
    longest = cfg.max_prompt_len + max(cfg.max_new_tokens, cfg.eval_max_new_tokens if cfg.eval_every else 0)
    budget = cfg.graph_kv_gb * 2 ** 30 if cfg.graph_kv_gb else \
        0.25 * torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 8 * 2 ** 30
    return plan(model, cfg.gen_batch_size, longest, budget, cfg.graph_keep_rows)
