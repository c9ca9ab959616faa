"""legend: Purified OPSD on legendworld (worlds/legendworld.py, docs/world3.md), built so that Purified's
question × reference interaction should win: a positive control of the method and the code.

Hardware: any CPU (2 cores).   Command: python popsd.py --recipe legend
Every setting is the toy recipe's (recipes/toy.py, read below) but the world's files and the reference format,
sketch by default (`reference_field=null` or `full` (the controls); `method=opsd` runs the baseline). The base
(data/legendworld/base) is the world-one base pre-trained further on this world's documents (`python
compare.py pretrain --world legendworld`).
Expected time and result: docs/world3.md.
"""
import runpy as _runpy
from pathlib import Path as _Path

globals().update({k: v for k, v in _runpy.run_path(str(_Path(__file__).with_name("toy.py"))).items()
                  if not k.startswith("_")})  # world one's settings, unchanged
model = "data/legendworld/base"
data = "data/legendworld/train.jsonl"
eval_bench = "data/legendworld/test.jsonl"
eval_grader = "legendworld"
reference_field = "sketch"
