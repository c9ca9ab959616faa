"""engines/graph.py: sampling by replaying one captured decoding step (rollout_engine=graph).

    python popsd.py --recipe single_gpu rollout_engine=graph      # one GPU: each decoding step a CUDA graph
    python popsd.py --recipe toy rollout_engine=graph             # CPU: the same loop, run eagerly

HF generate issues every kernel of every layer from Python at every decoding step: for Qwen3-8B in nf4 with
LoRA that was ~170 ms a step on an H200, 1% of the decode floor. This engine samples from the training model
itself (LoRA active: on-policy, nothing to sync) with a preallocated KV cache (transformers' StaticCache), one
prefill per batch, and a decoding step whose shapes never change. On CUDA that step is captured once per batch
shape as a CUDA graph and replayed (one launch a step); elsewhere the same loop runs eagerly. Sampling is HF's
own warpers (temperature, top-k, top-p), then each row's token drawn from its own seed (engines/sampling.py),
outside the graph; so with the same seeds it samples what engines.hf.generate does, in either mode:
  keep_rows=True   every row steps until the last one is done
  keep_rows=False  when half the rows are done the live ones move to a batch half the size (its own cache and
                   graph): a long tail stops holding the batch; run eagerly, the cache also grows ROUND slots
                   at a time (attention reads only what is written)
(tests/test_graph_engine.py: the same tokens and per-token log-probs as HF generate, seeded and greedy)
A replayed graph reads the weights at the addresses it was captured with. Training changes them in place
(optimizer steps, the EMA teacher's lerp, a resume's load_state_dict copies into them); before every call the
sampler compares the parameters' addresses with those it captured and drops its graphs if any moved. The
caches are sized from the batch and the longest sequence (rounded up to ROUND tokens, so prompts of other
widths reuse the graph): `kv_bytes` says what they hold. Sliding-window layers (Olmo-3's) are sampled exactly
when run eagerly (their caches are moved with the count of tokens they hold); their decoding step cannot be
captured (the count is a Python int their mask and writes branch on), so capture refuses such a model. Under
torchrun (FSDP's sharded weights) it is refused: a graph cannot hold an all-gather of weights that are freed
between steps.
"""
import inspect

import torch

from engines.sampling import draw, row_seeds, warpers
from plumbing.data import PopsdError
from rollout import Rollout, from_tokens, pad_left

ROUND = 64  # cache length rounded up to a multiple of this: one graph serves prompts of many widths


def _rounded(tokens: int) -> int:
    return -(-tokens // ROUND) * ROUND


class _Step:
    """One batch shape (rows, cache length): a static KV cache, static input buffers, and the decoding step on
    them, run eagerly or replayed from a CUDA graph captured at its first use."""

    def __init__(self, model, rows: int, length: int, device, capture: bool):
        from transformers import StaticCache
        self.model, self.rows, self.length, self.capture = model, rows, length, capture
        self.cache = StaticCache(config=model.config, max_cache_len=length)
        self.mask = torch.zeros(rows, length, dtype=torch.long, device=device)  # [b, L] 1 = attend
        self.token = torch.zeros(rows, 1, dtype=torch.long, device=device)  # [b, 1] the last sampled token
        self.position = torch.zeros(rows, 1, dtype=torch.long, device=device)  # [b, 1] its position id
        self.cache_position = torch.zeros(1, dtype=torch.long, device=device)  # [1] its slot in the cache
        self.graph, self.logits = None, None
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        params = inspect.signature(base.forward).parameters
        # transformers renames it by 5.40
        self.cache_key = "cache" if "cache" in params else "past_key_values"
        # older releases read it; 5.24 writes at the cache's offset
        self.takes_position = "cache_position" in params

    def forward(self, ids, position, cache_position):
        """Logits [b, V] float32 of the last position of ids [b, s]; the cache appends their keys and
        values."""
        extra = {"cache_position": cache_position} if self.takes_position else {}
        out = self.model(input_ids=ids, attention_mask=self.mask, position_ids=position, use_cache=True,
                         logits_to_keep=1, **{self.cache_key: self.cache}, **extra)
        return out.logits[:, -1].float()

    def prefill(self, ids, attn):
        """ids, attn [b, P] left-padded prompts → logits [b, V] of their last position; the cache holds
        them."""
        p = ids.shape[1]
        self.cache.reset()
        self.mask.fill_(1)
        self.mask[:, :p] = attn
        position = (attn.cumsum(-1) - 1).masked_fill(attn == 0, 1)  # as HF generate: pads at 1, real from 0
        self.position.copy_(position[:, -1:])
        self.cache_position.fill_(p - 1)
        return self.forward(ids, position, torch.arange(p, device=ids.device))

    def decode(self, token):
        """token [b]: the tokens just sampled → logits [b, V] of the next position."""
        self.token.copy_(token[:, None])
        self.position.add_(1)
        self.cache_position.add_(1)
        if not self.capture:
            return self.forward(self.token, self.position, self.cache_position)
        if self.graph is None:
            self._capture()
        self.graph.replay()
        return self.logits

    def _layers(self):
        return self.cache.layers

    def _capture(self):
        """Warm up on a side stream (lazy initialisations, kernel choices), then record the step. The warm-up
        runs write the same keys and values at the same slot as the replay will, and each layer's write offset
        (StaticLayer.cumulative_length, advanced in place by every update) is set back after them."""
        offsets = [layer.cumulative_length.clone() for layer in self._layers()]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self.forward(self.token, self.position, self.cache_position)
                for layer, offset in zip(self._layers(), offsets):
                    layer.cumulative_length.copy_(offset)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self.forward(self.token, self.position, self.cache_position)

    def take(self, other: "_Step", rows: torch.Tensor):
        """Continue other's rows [k] (k ≤ self.rows) here: their cache, mask and positions; the rows beyond k
        repeat the first (they are finished and stay so). This cache may be longer than other's (growing)."""
        idx = torch.cat([rows, rows[:1].expand(self.rows - len(rows))])
        n = other.length
        for mine, theirs in zip(self._layers(), other._layers()):
            if not mine.is_initialized:
                mine.lazy_initialization(theirs.keys[idx], theirs.values[idx])
            # a sliding-window layer holds min(window, length) slots, rolled when full
            held = theirs.keys.shape[2]
            mine.keys[:, :, :held].copy_(theirs.keys[idx])
            mine.values[:, :, :held].copy_(theirs.values[idx])
            mine.cumulative_length.copy_(theirs.cumulative_length)
            if hasattr(theirs, "cumulative_length_int"):  # ... and counts its tokens in Python (its branches)
                mine.cumulative_length_int = theirs.cumulative_length_int
        self.mask[:, :n].copy_(other.mask[idx])
        self.mask[:, n:] = 1  # slots not written yet: the causal mask keeps them out until they are
        self.position.copy_(other.position[idx])
        self.cache_position.copy_(other.cache_position)
        return idx

    def kv_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self._layers() if layer.is_initialized
                   for t in (layer.keys, layer.values))


def plan(model, batch_size: int, seq_len: int, budget_bytes: float, keep_rows: bool) -> tuple[int, str]:
    """Rows per batch whose static caches fit budget_bytes at seq_len tokens (rounded up to ROUND): one cache
    of the batch with keep_rows; without, 2× the rows (its halves, or, eager, a growing cache and the copy it
    moves into). Returns (rows, a line for the log)."""
    from plumbing.models import generation_batch, kv_bytes_per_token
    length = _rounded(seq_len)
    rows, _ = generation_batch(model, length, budget_bytes / (1 if keep_rows else 2), cap=batch_size)
    wide = next(model.parameters()).dtype in (torch.bfloat16, torch.float16)
    per_row = kv_bytes_per_token(model.config, 2 if wide else 4) * length
    held = per_row * (rows if keep_rows else 2 * rows)
    return rows, (f"{rows} rows × {length:,} tokens{'' if keep_rows else ' (and the halves)'}: "
                  f"{held / 2 ** 30:.2f} GiB of {budget_bytes / 2 ** 30:.1f} GiB")


class GraphSampler:
    """rollout_engine=graph: the training model samples through _Step's static cache and (CUDA) replayed
    graphs. Same interface as engines.hf.HFSampler: sync(model, step), generate(prompts, ...), close(); it
    reports each sampled token's log-prob (raw logits, τ = 1), as the vLLM engines do."""
    reports_logprobs = True

    def __init__(self, model, tokenizer, *, batch_size: int, device, eos_ids: list[int],
                 capture: bool | None = None, keep_rows: bool = True):
        self.model, self.tokenizer, self.device, self.eos_ids = (model, tokenizer, torch.device(device),
                                                                 eos_ids)
        self.batch_size, self.keep_rows = batch_size, keep_rows
        self.capture = self.device.type == "cuda" if capture is None else capture
        # what a CUDA graph cannot hold: a host sync in the mask (flash-attention's), a RoPE that
        if self.capture:
            attn = getattr(model.config, "_attn_implementation", "sdpa")  # branches on the sequence length
            rope = (getattr(model.config, "rope_scaling", None) or {}).get("rope_type", "default")
            if attn not in ("sdpa", "eager") or rope == "dynamic":
                raise PopsdError("rollout_engine=graph captures the decoding step, which needs sdpa or eager "
                                 f"attention and a non-dynamic RoPE (this model: attention {attn!r}, RoPE "
                                 f"{rope!r}): use rollout_engine=dynamic or static")
            # a sliding-window layer counts its tokens in a Python int and its mask and writes branch on it: a
            # graph would replay the count it was captured at (eager sampling, on a CPU, supports such layers)
            from transformers import StaticCache
            if any(layer.is_sliding for layer in StaticCache(config=model.config, max_cache_len=1).layers):
                raise PopsdError("rollout_engine=graph cannot capture this model's decoding step: its "
                                 "sliding-window layers branch in Python on how many tokens they hold, which "
                                 "a CUDA graph would fix at capture; use "
                                 "rollout_engine=dynamic, static or vllm")
        self.steps: dict[tuple[int, int], _Step] = {}
        self.used: set[tuple[int, int]] = set()  # the shapes the current call uses
        self.addresses = None
        self.captures = 0  # graphs recorded so far (a test watches this)
        # the shapes (rows, length) the last call moved through, in order
        self.trail: list[tuple[int, int]] = []

    def sync(self, model, step: int):
        pass  # the training model's own weights: updated in place, read by address (checked in generate)

    def _check_addresses(self):
        """A replayed graph runs the weights and the adapter choice it was captured with: a replaced tensor,
        another active adapter (peft chooses in Python) or disabled adapters drop the graphs, and the next
        call recaptures."""
        lora = next((m for m in self.model.modules() if hasattr(m, "disable_adapters")
                     and hasattr(m, "lora_A")), None)
        # a peft model's list; a plain model's is a method
        active = getattr(self.model, "active_adapters", ())
        now = ([p.data_ptr() for p in self.model.parameters()],
               tuple(active) if isinstance(active, list) else (),
               lora is not None and lora.disable_adapters)
        if now != self.addresses:
            self.steps.clear()
            self.addresses = now

    def _step(self, rows: int, length: int) -> _Step:
        self.used.add((rows, length))
        self.trail.append((rows, length))
        if (rows, length) not in self.steps:
            self.steps[(rows, length)] = _Step(self.model, rows, length, self.device, self.capture)
        return self.steps[(rows, length)]

    def _leave(self, old: _Step, new: _Step) -> _Step:
        """Move on to new; eager (no graph holds its addresses), old's cache is dropped now."""
        if not self.capture:
            self.steps.pop((old.rows, old.length), None)
            self.used.discard((old.rows, old.length))
        return new

    def kv_bytes(self) -> int:
        """Bytes the preallocated KV caches hold now."""
        return sum(s.kv_bytes() for s in self.steps.values())

    @torch.no_grad()
    def generate(self, prompts, *, n, max_new_tokens, temperature, top_p, top_k, seeds=None, on_batch=None,
                 lengths=None) -> Rollout:
        """n completions per prompt, with the log-prob of each sampled token, as a Rollout; rows in batches of
        batch_size, as engines.hf.generate. lengths [B] (benchmarks: a fixed workload): row i ends exactly at
        lengths[i] tokens, EOS banned before and forced there. seeds: prompt i's seed (sample j: + j), each
        row's tokens drawn from its own; None: one per prompt from torch's generator. Caches of shapes this
        call did not use are freed after it, so at most one call's caches are held (what plan() budgets)."""
        self._check_addresses()
        self.used, self.trail = set(), []
        do_sample = temperature != 0
        if not do_sample:  # greedy, as engines.hf.generate
            temperature, top_p, top_k = 1.0, 1.0, 0
        warp = warpers(temperature, top_k, top_p)
        self.model.eval()
        rows = [p for p in prompts for _ in range(n)]
        every_row = row_seeds(seeds, len(prompts), n, self.device) if do_sample else None  # [B]
        tokens, logprobs = [], []
        for i in range(0, len(rows), self.batch_size):
            batch_seeds = None if every_row is None else every_row[i:i + self.batch_size]
            ids, lp = self._batch(rows[i:i + self.batch_size], max_new_tokens, warp, batch_seeds,
                                  None if lengths is None else lengths[i:i + self.batch_size])
            tokens += ids.tolist()
            logprobs += lp.tolist()
            if on_batch:
                on_batch(len(ids))
        for key in set(self.steps) - self.used:  # e.g. the training batch's caches during an evaluation
            del self.steps[key]
        return from_tokens(tokens, logprobs, self.tokenizer, self.eos_ids)

    def _batch(self, prompts, max_new_tokens, warp, seeds, lengths=None):
        """One batch: prefill, then decode until every row has its EOS or max_new_tokens → (tokens [b, T],
        their log-probs [b, T]). seeds [b]: each row's (sampling.draw); None: greedy."""
        pad = self.tokenizer.pad_token_id
        ids, attn = pad_left(prompts, pad)  # [b, P]
        ids, attn = ids.to(self.device), attn.to(self.device)
        b, p = ids.shape
        final = _rounded(p + max_new_tokens)
        # eager and compacting: the cache also grows ROUND at a time
        grow = not (self.keep_rows or self.capture)
        step = self._step(b, _rounded(p + 1) if grow else final)
        logits = step.prefill(ids, attn)  # [b, V]
        eos = torch.tensor(self.eos_ids, device=self.device)
        out = torch.full((b, max_new_tokens), pad, dtype=torch.long, device=self.device)  # [b, T]
        out_lp = torch.zeros(b, max_new_tokens, device=self.device)  # [b, T]
        where = torch.arange(b, device=self.device)  # [b'] the batch row each live slot holds
        unfinished = torch.ones(b, dtype=torch.long, device=self.device)  # [b']
        # [b] last step of each row
        ends = None if lengths is None else torch.tensor(lengths, device=self.device) - 1
        for t in range(max_new_tokens):
            raw = logits  # [b', V] what the log-probs are of
            if ends is not None:  # EOS banned before a row's length and forced at it
                last = ends[where] == t  # [b']
                logits = logits.clone()
                logits[:, eos] = float("-inf")
                logits[last] = float("-inf")
                logits[last, eos[0]] = 0.0
            scores = warp(ids, logits)  # these warpers do not read the ids
            # each live slot's token from the seed of the batch row it holds
            token = scores.argmax(-1) if seeds is None else draw(scores, seeds[where], t)  # [b']
            token = token * unfinished + pad * (1 - unfinished)  # finished rows write pads, as HF
            live = unfinished.bool()
            out[where[live], t] = token[live]
            out_lp[where[live], t] = torch.log_softmax(raw[live], -1).gather(-1, token[live, None])[:, 0]
            unfinished = unfinished & ~torch.isin(token, eos)
            if not unfinished.any() or t == max_new_tokens - 1:
                break
            if not self.keep_rows and step.rows > 1 and int(unfinished.sum()) <= step.rows // 2:
                keep = unfinished.nonzero()[:, 0]  # [k] live slots
                smaller = self._step(step.rows // 2, step.length)
                idx = smaller.take(step, keep)  # [b'/2] slots of the old batch, padded with repeats
                where, token = where[idx], token[idx]
                unfinished = torch.zeros(smaller.rows, dtype=torch.long, device=self.device)
                unfinished[:len(keep)] = 1
                step = self._leave(step, smaller)
            if grow and p + t >= step.length:  # the next token's slot is past the cache: one ROUND longer
                longer = self._step(step.rows, min(step.length + ROUND, final))
                longer.take(step, torch.arange(step.rows, device=self.device))
                step = self._leave(step, longer)
            logits = step.decode(token)
        self.captures = sum(s.graph is not None for s in self.steps.values())
        return out[:, :t + 1].cpu(), out_lp[:, :t + 1].cpu()  # the steps run, as HF generate returns

    def close(self):
        self.steps.clear()
