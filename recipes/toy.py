"""toy: Purified OPSD on the shipped toy base (worlds/toyworld.py): watch it work on a laptop CPU.

Hardware: any CPU (2 cores).   Command: python popsd.py --recipe toy
Expected time: about 45 s (44 s on a 2-core AMD EPYC, 2026-12-08).
The base (data/toyworld/base, 0.9M parameters, pre-trained from scratch by `python compare.py pretrain`)
solves last-digit arithmetic with a reflective chain of thought: `3+4=7 7*2=5 wait 7*2=4 ... \\boxed{6}`.
The teachers see the full worked reference (the paper's format); `reference_field=sketch` gives them only
the start and the answer; `method=opsd` runs the baseline. At steps 0, 20, 40 and 60 the student is
evaluated on 400 held-out questions by the world's exact checker.
Expected result (seed 0, measured 2026-12-08): with the full reference Purified has almost nothing to learn
(both teacher contexts copy the same trace, so Δ_it ≈ 0): the loss stays between 2e-5 and 7e-4 and held-out
accuracy at the base's 0.91-0.92, with ~17 markers per 1,000 tokens and ~81% of first-try errors caught.
reference_field=sketch: accuracy 0.93, markers ~13. method=opsd: accuracy 0.97, markers ~4 (the markers
collapse). The base sampled at T = 0.5 scores 0.998, above every trained student: the 3-seed comparison
against it, docs/toyworld.md. Each step prints the loss and the Δ diagnostics; runs/toy/plots.png holds the
curves.
These settings were fixed before any OPSD-vs-Purified comparison was run; compare changes only the method.
Since then only the sampler (rollout_engine, below: the same law, faster; each row from its own seed) and the
loss path (loss_impl: the same numbers, the readable code) changed, and the comparisons were rerun.
"""
model = "data/toyworld/base"
data = "data/toyworld/train.jsonl"
question_field = "question"
reference_field = "full"  # full | sketch
student_template = "Q:{question}"
teacher_template = "Q:{question}\nR:{reference}"
refonly_template = "R:{reference}"
student_thinking = False  # the toy chat template has no thinking block
teacher_thinking = False
dtype = "fp32"
device = "cpu"
# one torch thread: on a 0.9M-parameter model more only contend (55 s against 9.5 min measured under load)
threads = 1
gradient_checkpointing = False
lora_r = 16
lora_alpha = 32
max_prompt_len = 256
max_new_tokens = 128  # the longest reflective traces are ~110 characters
temperature = 1.0
top_p = 1.0
top_k = 0
gen_batch_size = 400  # one generate call per evaluation
# engines/graph.py, eager on a CPU: a preallocated KV cache grown as the rows need it ...
rollout_engine = "graph"
graph_keep_rows = False  # ... and the batch halved as rows finish (for speed); each row is drawn from its
# own seed, so these are the samples HF generate (rollout_engine=dynamic) draws from the same seeds
steps = 60
batch_size = 16
micro_batch_size = 16
lr = 1e-3
topk = 16  # support=topk: 16 of the 128 tokens (the full vocabulary is the default support)
# the readable loss (loss.reference_loss): at V = 128 its logits are small, its numbers the fused path's
# within 1e-5 and a run as fast (bench/toy_loss_impl.py); real vocabularies need the fused default
loss_impl = "reference"
max_grad_norm = 1.0
save_every = 0  # one checkpoint, at the end
keep_checkpoints = 1
samples_per_step = 1
eval_every = 20
eval_bench = "data/toyworld/test.jsonl"
eval_fields = "question,answer"
eval_grader = "toyworld"
eval_n = 1
eval_limit = 400
eval_max_new_tokens = 128
eval_temperature = 1.0
eval_top_p = 1.0
