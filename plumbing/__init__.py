"""plumbing/: what keeps a run safe, fast and visible, and is not the algorithm. A student may skip it.

The algorithm is popsd.py, rollout.py and loss.py (and engines/ for how ŷ is sampled); everything here
serves them, each module behind a call or two the loop makes:

    config.py       Config (one documented field each), recipes, the command line, the checks that refuse a
                    wasted run
    session.py      the run around the loop: folder and lock, set-up, signals, logs, the step line, saves
    guards.py       a run that diverges, collapses or cannot learn says so and why (and stops)
    checkpoints.py  a run's folder and checkpoints: saving, resuming, the base's fingerprint, the run record
    models.py       loading (LoRA, 4-bit), the parts the loss reads, EOS ids, optimizer, memory checks, merge
    loss_fused.py   loss.py's numbers, chunked and in place (loss_impl=fused: real vocabularies), tested equal
    ema.py          teacher=ema: the EMA teacher, a second LoRA adapter
    data.py         datasets by hub id or local file, the data order, the tiny test model, PopsdError
    distributed.py  several GPUs: torchrun, FSDP2, sums and gathers over ranks (no-ops on one process)
    trackers.py     report_to=tensorboard | wandb
    adapters.py     a trained adapter's folder, for eval.py and explain.py
    grading.py      is an answer right: math-verify on the last \\boxed{}; pass@k
    remote.py       evaluation through any OpenAI-compatible server
"""
