"""engines/hf.py: HF generate on the training model itself (rollout_engine=dynamic | static).

    dynamic   the KV cache grown step by step (HF's default)
    static    a preallocated KV cache (cache_implementation="static"): the same samples, faster when small

The training model samples, LoRA active: always on-policy, nothing to sync. Its random numbers come from
torch's generator (seeded per run, saved in checkpoints); it reports no log-probs. The worlds (worlds/) sample
their measurements with `generate` too.
"""
import contextlib

import torch

from plumbing import distributed as D
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
             logits_processor=None, gather=True) -> Rollout:
    """n completions per prompt ([B = prompts × n]), KV cache on, batched with left padding.

    Under torchrun (FSDP) every rank runs the same number of decoding steps (synced_gpus): a sharded
    forward is a collective, so a rank that is done keeps stepping until all are. With gather (the
    default) the sharded weights are all-gathered once per call, not at every step (distributed.gathered).
    """
    pad_id = tokenizer.pad_token_id
    if temperature == 0:  # greedy (eval.py --temperature 0)
        do_sample, temperature, top_p, top_k = False, 1.0, 1.0, 0
    rows = [p for p in prompts for _ in range(n)]  # [B]
    model.eval()  # gradient checkpointing only acts in train mode, so the KV cache stays on
    extra = {"cache_implementation": "static"} if engine == "static" else {}
    tokens = []
    # FSDP: the weights all-gathered once, not at every step; no model-folder sampling setting applies
    with D.gathered(model) if gather else contextlib.nullcontext(), neutral_generation_config(model):
        for i in range(0, len(rows), batch_size):
            ids, attn = pad_left(rows[i:i + batch_size], pad_id)  # [b, P]
            out = model.generate(input_ids=ids.to(device), attention_mask=attn.to(device),
                                 do_sample=do_sample, temperature=temperature, top_p=top_p, top_k=top_k,
                                 max_new_tokens=max_new_tokens, eos_token_id=eos_ids, pad_token_id=pad_id,
                                 use_cache=True, min_new_tokens=min_new_tokens,
                                 synced_gpus=torch.distributed.is_initialized(),
                                 logits_processor=logits_processor, **extra)  # [b, P + T_i]
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
        """seeds: unused (torch's generator, seeded per run, draws every sample)."""
        return generate(self.model, self.tokenizer, prompts, n=n, max_new_tokens=max_new_tokens,
                        temperature=temperature, top_p=top_p, top_k=top_k, eos_ids=self.eos_ids,
                        batch_size=self.batch_size, device=self.device, on_batch=on_batch, engine=self.engine,
                        gather=self.gather)

    def close(self):
        pass
