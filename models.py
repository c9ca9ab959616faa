"""models.py: loading the model (LoRA, 4-bit), its parts the loss reads, its EOS ids, and the optimizer.

Shared by popsd.py (training), eval.py (evaluation) and bench/: imports go one way, to here.
"""
import logging

import torch

from data import PopsdError, model_load_error

logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)  # optional hub kernel, not needed


def pick_device(name: str) -> torch.device:
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)


def load_model(cfg, device: torch.device, path: str):
    """Tokenizer and base + LoRA (peft) model; teacher, ref-only and base are this model with LoRA disabled."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    kwargs = {"dtype": torch.bfloat16 if cfg.dtype == "bf16" else torch.float32,
              "trust_remote_code": cfg.trust_remote_code}
    if cfg.load_in_4bit:
        kwargs["quantization_config"] = quantization_config()
        kwargs["device_map"] = {"": device}
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as e:
        raise model_load_error(path, e) from None
    if not cfg.load_in_4bit:
        model.to(device)
    elif device.type == "cpu":
        import bitsandbytes as bnb
        for m in model.modules():  # bnb repacks CPU weights at the first eval forward (sampling); training
            if isinstance(m, bnb.nn.Linear4bit):  # forwards then go through gemv_4bit, which has no backward
                m.support_avx512bf16_for_cpu = False
    if cfg.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    targets = cfg.lora_targets if cfg.lora_targets == "all-linear" else [t.strip() for t in cfg.lora_targets.split(",")]
    model = get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                             target_modules=targets, task_type="CAUSAL_LM"))
    return tokenizer, model


def quantization_config():
    """QLoRA's 4-bit weights: nf4, double quantisation, bf16 compute (bitsandbytes)."""
    from transformers import BitsAndBytesConfig
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


def make_optimizer(cfg, params):
    if cfg.optim == "paged_adamw_8bit":
        import bitsandbytes as bnb
        return bnb.optim.PagedAdamW8bit(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def model_parts(model):
    """(body, head weight [V, H]) of a peft causal LM: the loss works from hidden states and the frozen head."""
    causal = model.get_base_model()
    body = getattr(causal, causal.base_model_prefix)
    head = causal.get_output_embeddings()
    if getattr(head, "bias", None) is not None or getattr(causal.config, "final_logit_softcapping", None):
        raise PopsdError(f"{type(causal).__name__}: popsd needs logits = hidden @ head.weight.T (no bias, no softcap)")
    return body, head.weight


def eos_ids(model, tokenizer) -> list[int]:
    ids = model.generation_config.eos_token_id
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    return sorted(set(ids) | {tokenizer.eos_token_id})
