"""paper_olmo3_7b: Table 1's Olmo-3-7B-Think run (bf16 LoRA).

Hardware: one 80 GB GPU.   Command: python popsd.py --recipe paper_olmo3_7b
Expected time: not yet measured. Expected result (paper): base 61.3 → Purified 63.2 / 63.3.
Differs from Qwen3: a thinking model whose template starts the reasoning itself, so every role thinks.
Prompts: the OPSD code's wording (prompts=opsd_wording).
Checkpoints every 50 steps, every adapter kept: evaluate them all (best step) with
python eval.py --adapter runs/paper_olmo3_7b/checkpoints, or through vLLM with --server (docs/evaluation.md).
"""
device = "cuda"  # a CUDA GPU: on a machine without one this recipe stops at once and says so
model = "allenai/Olmo-3-7B-Think"
prompts = "opsd_wording"
student_thinking = True
teacher_thinking = True
micro_batch_size = 2
