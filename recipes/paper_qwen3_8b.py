"""paper_qwen3_8b: Table 1's Qwen3-8B run (bf16 LoRA, no quantisation).

Hardware: one 80 GB GPU (H100/A100).   Command: python popsd.py --recipe paper_qwen3_8b
Expected time: not yet measured. Expected result (paper, avg of AIME24/25 and HMMT25, avg@12):
base 61.8 → Purified 66.0 (DASD-10K) / 65.1 (Math-CoT-20K); those datasets are not on the hub,
so this recipe uses the OPSD set. Paper settings are the Config defaults; this file names the model.
"""
model = "Qwen/Qwen3-8B"
micro_batch_size = 2
