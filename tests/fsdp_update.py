"""Helper for test_scale.py: optimizer steps from fixed sequences, under torchrun or as one plain process.

    python tests/fsdp_update.py TINY_MODEL OUT_DIR STEPS                 # one rank
    torchrun --nproc_per_node 2 tests/fsdp_update.py TINY_MODEL OUT_DIR STEPS
Every rank builds the same full batch of sequences for a step and takes its share (rank::world), as the
loop does with prompts; a checkpoint is saved after every step; resume=true continues from OUT_DIR's newest.
"""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from plumbing import checkpoints  # noqa: E402
from plumbing import distributed  # noqa: E402
from plumbing import models  # noqa: E402
import popsd  # noqa: E402
from plumbing.config import make_config  # noqa: E402
from plumbing import session  # noqa: E402
from plumbing.data import DataStream, read_rows  # noqa: E402
from rollout import Rollout, completion_mask  # noqa: E402


def fixed_rollout(contexts, vocab: int, eos: int, pad: int, step: int) -> Rollout:
    g = torch.Generator().manual_seed(1000 + step)
    lengths = torch.randint(3, 17, (len(contexts),), generator=g)
    completions = torch.randint(0, vocab, (len(contexts), int(lengths.max())), generator=g)
    completions[completions == eos] = 0
    for i, n in enumerate(lengths.tolist()):
        if i % 3:  # some end with EOS, some are truncated
            completions[i, n - 1] = eos
    mask, truncated = completion_mask(completions, [eos])
    mask &= torch.arange(completions.shape[1]) < lengths[:, None]
    return Rollout(completions.masked_fill(~mask, pad), mask, truncated, [""] * len(contexts),
                   contexts=contexts)


def main(model_dir: str, out_dir: str, steps: int, *overrides):
    cfg = make_config("tiny", [f"out_dir={out_dir}", f"steps={steps}", "eval_every=0", *overrides])
    rank, world, device = distributed.setup(models.pick_device(cfg.device))
    torch.manual_seed(cfg.seed)
    tokenizer, model = models.load_model(cfg, device, model_dir)
    if world > 1:
        distributed.shard_model(model, device, bf16=cfg.dtype == "bf16")
    body, head = models.model_parts(model)
    rows, _ = read_rows(cfg.data, cfg.data_split, (cfg.question_field, cfg.reference_field))
    contexts, _ = session.prepare_contexts(rows[:cfg.batch_size], tokenizer, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = models.make_optimizer(cfg, params)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: session.lr_factor(s, cfg))
    stream, start, out = DataStream(len(contexts), cfg.seed), 0, Path(out_dir)
    if cfg.resume:
        start, _ = checkpoints.load_checkpoint(checkpoints.latest_checkpoint(out), model, optimizer,
                                               scheduler, stream, cfg.seed, rank, world)
    for step in range(start + 1, steps + 1):
        full = fixed_rollout(contexts, len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id, step)
        row = popsd.update(model, body, head, full.select(slice(rank, None, world)), cfg,
                           tokenizer.pad_token_id, optimizer, scheduler)
        checkpoints.save_checkpoint(out, step, model, optimizer, scheduler, stream, keep=10, rank=rank)
        if rank == 0:
            with (out / "rows.jsonl").open("a") as f:
                f.write(json.dumps({"step": step, "world": world, **row}) + "\n")
    # gloo torn down while both ranks live: left to exit, it aborts a rank now and then (SIGABRT)
    distributed.finish()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), *sys.argv[4:])
