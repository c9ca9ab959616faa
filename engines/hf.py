"""engines/hf.py: HF generate on the training model itself (rollout_engine=dynamic | static).

    dynamic   the KV cache grown step by step (HF's default)
    static    a preallocated KV cache (cache_implementation="static"): the same samples, faster when small

The training model samples, LoRA active: always on-policy, nothing to sync. With seeds (the loop's and
every evaluation's), each row's tokens are drawn from its own seed (engines/sampling.py): HF generate runs its
greedy step on the token a seeded logits processor chose. Without (the worlds' measurements and pre-training,
worlds/), HF's own sampler draws from torch's generator. It reports no log-probs.
"""
import contextlib

import torch
from transformers import LogitsProcessorList

from engines.sampling import SeededSampling, row_seeds
from plumbing import distributed
from rollout import Rollout, from_tokens, pad_left


@contextlib.contextmanager
def neutral_generation_config(model):
    """HF generate fills every setting a call leaves unset from the model folder's generation_config.json
    (repetition_penalty, no_repeat_ngram_size, min_p, bad words, ...), which no other engine reads. For the
    call, the model's config holds only its EOS and pad ids: generate samples from exactly the distribution
    the arguments describe (temperature, top-p, top-k), as the graph engine and vLLM do."""
    causal = model.get_base_model() if hasattr(model, "get_base_model") else model
    shipped = causal.generation_config
    causal.generation_config = type(shipped)(eos_token_id=shipped.eos_token_id,
                                             pad_token_id=shipped.pad_token_id)
    try:
        yield
    finally:
        causal.generation_config = shipped


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[int]], *, n, max_new_tokens, temperature, top_p, top_k,
             eos_ids, batch_size, device, on_batch=None, min_new_tokens=0, engine="dynamic", do_sample=True,
             logits_processor=None, gather=True, seeds=None) -> Rollout:
    """n completions per prompt ([B = prompts × n]), KV cache on, batched with left padding. seeds
    [prompts]: each row drawn from its own (sample j: seeds[i] + j, engines/sampling.py); None: torch's
    generator, through HF's sampler.

    Under torchrun (FSDP) every rank runs the same number of decoding steps (synced_gpus): a sharded
    forward is a collective, so a rank that is done keeps stepping until all are. With gather (the
    default) the sharded weights are all-gathered once per call, not at every step (distributed.gathered).
    """
    pad_id = tokenizer.pad_token_id
    if temperature == 0:  # greedy (eval.py --temperature 0)
        do_sample, temperature, top_p, top_k = False, 1.0, 1.0, 0
    rows = [p for p in prompts for _ in range(n)]  # [B]
    seeded = do_sample and seeds is not None
    every_row = row_seeds(seeds, len(prompts), n, device) if seeded else None  # [B]
    model.eval()  # gradient checkpointing only acts in train mode, so the KV cache stays on
    extra = {"cache_implementation": "static"} if engine == "static" else {}
    tokens = []
    # FSDP: the weights all-gathered once, not at every step; no model-folder sampling setting applies
    gathered = distributed.gathered(model) if gather else contextlib.nullcontext()
    with gathered, neutral_generation_config(model):
        for i in range(0, len(rows), batch_size):
            ids, attn = pad_left(rows[i:i + batch_size], pad_id)  # [b, P]
            processors, sampling = list(logits_processor or []), {}
            if seeded:  # the draw is the seeded processor's, last; HF's greedy step takes its token
                processors.append(SeededSampling(every_row[i:i + batch_size], ids.shape[1], temperature,
                                                 top_k, top_p))
            else:
                sampling = dict(do_sample=do_sample, temperature=temperature, top_p=top_p, top_k=top_k)
            out = model.generate(input_ids=ids.to(device), attention_mask=attn.to(device), **sampling,
                                 max_new_tokens=max_new_tokens, eos_token_id=eos_ids, pad_token_id=pad_id,
                                 use_cache=True, min_new_tokens=min_new_tokens,
                                 synced_gpus=torch.distributed.is_initialized(),
                                 logits_processor=LogitsProcessorList(processors), **extra)  # [b, P + T_i]
            tokens += out[:, ids.shape[1]:].tolist()  # [b] rows of T_i ids, pad after EOS
            if on_batch:
                on_batch(len(ids))  # progress: sequences done
    return from_tokens(tokens, None, tokenizer, eos_ids)


class HFSampler:
    """rollout_engine=dynamic | static: `generate` on the training model (see the module docstring)."""
    reports_logprobs = False

    def __init__(self, model, tokenizer, *, engine: str, batch_size: int, device, eos_ids: list[int],
                 gather=True):
        self.model, self.tokenizer, self.eos_ids, self.device = model, tokenizer, eos_ids, device
        self.engine, self.batch_size, self.gather = engine, batch_size, gather

    def sync(self, model, step: int):
        pass  # the training model's own weights

    def generate(self, prompts, *, n, max_new_tokens, temperature, top_p, top_k, seeds=None, on_batch=None):
        """seeds: prompt i's seed (sample j: + j); each row's tokens come from its own (sampling.py)."""
        return generate(self.model, self.tokenizer, prompts, n=n, max_new_tokens=max_new_tokens,
                        temperature=temperature, top_p=top_p, top_k=top_k, eos_ids=self.eos_ids,
                        batch_size=self.batch_size, device=self.device, on_batch=on_batch, engine=self.engine,
                        gather=self.gather, seeds=seeds)

    def close(self):
        pass
