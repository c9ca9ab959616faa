"""carry: Purified OPSD on the second toy world (worlds/carryworld.py), where the base's errors are its own.

Hardware: any CPU (2 cores).   Command: python popsd.py --recipe carry
The base (data/carryworld/base, 0.9M parameters, pre-trained in two stages by `python compare.py pretrain
--world carryworld`) multiplies a two-digit number mod 100 in one go by 3, 7 or 9 (`47*7=29`) or by a
two-digit number (`29*23=67`, a hard step), gets some of those steps wrong by itself (most hard ones), and
after "wait" re-derives the step in single-digit sub-steps. Every setting is the toy recipe's
(recipes/toy.py, read below) except the world's files and the lengths, which follow from the world's longest
reflective trace (worlds.carryworld.MAX_NEW_TOKENS: every step of a five-step question reflected, + EOS), and
the prompt bound, the base's 512 positions less that length (toy.py's 256 would cut the completions to 256).
`reference_field=sketch` gives the teachers only the start and the answer; `method=opsd` runs the baseline.
The base's gates (400 held-out questions, docs/carryworld.md): accuracy 0.838, 0.375 with "wait" forbidden,
84% of first-try errors caught, the teacher with the full reference 0.990.
Expected time: about 2 min (129 s alone on the 2-core Xeon, 2026-12-03; the comparison's 12 runs, two side
by side, with its measurements: 13.6 min on a 2-core AMD EPYC, 2026-12-08). Expected result
(docs/carryworld.md, 3 seeds, 2026-12-08): accuracy 0.84 → 0.83 (full) and 0.80 (sketch), markers kept;
method=opsd with the sketch: 0.52, the markers 12.9 → 7.7 per 1k. The base sampled at T = 0.5 scores 0.90,
above every trained student.
"""
import runpy as _runpy
from pathlib import Path as _Path

globals().update({k: v for k, v in _runpy.run_path(str(_Path(__file__).with_name("toy.py"))).items()
                  if not k.startswith("_")})  # world one's settings, unchanged
model = "data/carryworld/base"
data = "data/carryworld/train.jsonl"
eval_bench = "data/carryworld/test.jsonl"
eval_grader = "carryworld"
max_new_tokens = 291  # worlds.carryworld.MAX_NEW_TOKENS (tests/test_carryworld.py checks it)
eval_max_new_tokens = 291
# the base's 512 positions − 291: a scored context fits whole (the longest prompt: 80 tokens)
max_prompt_len = 221
