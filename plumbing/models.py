"""models.py: loading the model (LoRA, 4-bit), its parts the loss reads, its EOS ids, and the optimizer.

Shared by popsd.py (training), eval.py (evaluation) and bench/: imports go one way, to here.
"""
import hashlib
import logging
import re
from pathlib import Path

import torch

from plumbing.data import PopsdError, model_load_error

# an optional hub kernel for bitsandbytes on a CPU, not
for _name in ("bitsandbytes.backends.cpu.ops", "kernels"):
    # needed: its "failed to load" lines are noise, not errors
    logging.getLogger(_name).setLevel(logging.ERROR)


def pick_device(name: str) -> torch.device:
    if name != "auto":
        try:
            torch.device(name)
        except RuntimeError:
            raise PopsdError(f"device {name!r} is not a device: auto, cpu, cuda or cuda:N") from None
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise PopsdError(f"device={name}: this machine has no CUDA GPU (torch {torch.__version__}); the GPU "
                         "recipes need one. On a CPU: --recipe toy (or device=cpu with a small model)")
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)


def load_model(cfg, device: torch.device, path: str):
    """Tokenizer and base + LoRA (peft) model; teacher, ref-only and base are this model with LoRA
    disabled."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    kwargs = {"dtype": torch.bfloat16 if cfg.dtype == "bf16" else torch.float32,
              "trust_remote_code": cfg.trust_remote_code}
    if cfg.load_in_4bit:
        kwargs["quantization_config"] = quantization_config()
        kwargs["device_map"] = {"": device}
    if Path(path).is_dir() and not (Path(path) / "config.json").is_file():
        raise PopsdError(f"model folder {path!r} holds no config.json: not a Hugging Face model folder")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    # ValueError: a folder transformers cannot read as a model or tokenizer
    except (OSError, ValueError) as e:
        raise model_load_error(path, e) from None
    if not cfg.load_in_4bit:
        model.to(device)
    elif device.type == "cpu":
        import bitsandbytes as bnb
        for m in model.modules():  # bnb repacks CPU weights at the first eval forward (sampling); training
            if isinstance(m, bnb.nn.Linear4bit):  # forwards then go through gemv_4bit, which has no backward
                m.support_avx512bf16_for_cpu = False
    if cfg.gradient_checkpointing:
        # transformers >= 5.20; before: the old name
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    targets = cfg.lora_targets if cfg.lora_targets == "all-linear" else [
        t.strip() for t in cfg.lora_targets.split(",")]
    check_lora_fits(model, targets, cfg.lora_r, device, ema=cfg.teacher == "ema")
    torch.manual_seed(cfg.seed)  # LoRA init: from the config alone, whatever consumed the RNG before
    try:
        model = get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                                                 lora_dropout=cfg.lora_dropout, target_modules=targets,
                                                 task_type="CAUSAL_LM"))
    except ValueError as e:  # peft: no module matches lora_targets
        names = sorted({n.rsplit(".", 1)[-1] for n,
                        m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise PopsdError(f"config key 'lora_targets' {cfg.lora_targets!r}: {str(e).splitlines()[0]} (its "
                         f"linear layers: {', '.join(names)}; or all-linear)") from None
    return tokenizer, model


WEIGHTS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf")  # what a model folder keeps its weights in
# what from_pretrained reads of a model folder (its weights, config, tokenizer, chat template): a base's
# fingerprint covers these and nothing else in the folder (plots, logs, notes)
READ_BY_FROM_PRETRAINED = WEIGHTS + ("config.json", "generation_config.json", "tokenizer.json",
                                     "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                                     "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja",
                                     "chat_template.json")
FINGERPRINT = "files-v2:"  # marks a fingerprint of every file above; one without it covers the weights only


def base_fingerprint(path: str, say=None, weights_only: bool = False) -> str | None:
    """A base model's checksum: sha256 over the files from_pretrained reads (name and contents: weights,
    config, tokenizer files, chat template; weights_only: the weights alone, as popsd recorded bases before
    2026-12-08), so a run, a checkpoint, an adapter or an evaluation names the very base it used and a base
    changed in its folder is noticed. A hub model's files in the Hugging Face cache are links to blobs named
    by their sha256: read, not recomputed. None when the weights are nowhere on this machine (a hub id not
    downloaded yet). say(msg): progress."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        try:
            from huggingface_hub import snapshot_download
            folder = Path(snapshot_download(path, local_files_only=True))
        except Exception:  # not a hub id, or not in the cache
            return None
    weights = sorted({f for pattern in WEIGHTS for f in folder.glob(pattern) if f.is_file()})
    if not weights:
        return None
    read = WEIGHTS if weights_only else READ_BY_FROM_PRETRAINED
    files = sorted({f for pattern in read for f in folder.glob(pattern) if f.is_file()})
    big = sum(f.stat().st_size for f in files if not re.fullmatch(r"[0-9a-f]{64}", f.resolve().name))
    if say and big > 2 << 30:
        say(f"checksumming the base's files ({big / 2 ** 30:.1f} GiB, once per run) ...")
    digest = hashlib.sha256()
    for f in files:
        blob = f.resolve().name
        if not re.fullmatch(r"[0-9a-f]{64}", blob):  # a plain file: its contents, a MiB at a time
            file_hash = hashlib.sha256()
            with open(f, "rb") as fh:
                while chunk := fh.read(1 << 20):
                    file_hash.update(chunk)
            blob = file_hash.hexdigest()
        digest.update(f"{f.name}:{blob}\n".encode())
    return digest.hexdigest() if weights_only else FINGERPRINT + digest.hexdigest()


def same_base(recorded: str | None, path: str, now: str | None = None) -> bool:
    """Whether the base in `path` is the one a record names (its fingerprint `recorded`; `now`, the base's
    current fingerprint, if known). A record from before the full fingerprint is compared on the weights
    alone; a record with none (older still) cannot be compared: True."""
    if not recorded:
        return True
    if recorded.startswith(FINGERPRINT):
        return recorded == (now or base_fingerprint(path))
    return recorded == base_fingerprint(path, weights_only=True)


def free_memory(device: torch.device) -> int:
    """Bytes that can still be allocated on the device: the GPU's free memory, or the machine's available
    RAM."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    for line in Path("/proc/meminfo").read_text().splitlines() if Path("/proc/meminfo").exists() else []:
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 1 << 62  # unknown: no bound


def check_lora_fits(model, targets, r: int, device: torch.device, ema: bool = False):
    """Before any LoRA weight is allocated: the rank must not exceed the dimensions of the layers it adapts (a
    rank-r update of an m×n layer with r > min(m, n) adds nothing), and the adapter with its gradient and
    AdamW's two states (fp32: 16 bytes a weight, 20 with the EMA teacher) must fit in what the device has
    free."""
    head = model.get_output_embeddings()
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head and
              (targets == "all-linear" or n.rsplit(".", 1)[-1] in targets)]
    if not layers:
        return  # peft names the targets it cannot find
    name, layer = min(layers, key=lambda x: min(x[1].in_features, x[1].out_features))
    rank = min(layer.in_features, layer.out_features)
    if r > rank:
        raise PopsdError(f"config key 'lora_r' is {r}, beyond the dimensions of the layers it adapts "
                         f"({name}: {layer.in_features} → {layer.out_features}): a rank above {rank} adds "
                         "nothing; choose lora_r at most that")
    need = sum(r * (m.in_features + m.out_features) for _, m in layers) * (20 if ema else 16)
    free = free_memory(device)
    if need > free:
        size = lambda b: f"{b / 2 ** 30:.1f} GiB" if b >= 2 ** 30 else f"{b / 2 ** 20:.1f} MiB"  # noqa: E731
        raise PopsdError(f"config key 'lora_r'={r}: the adapter, its gradient and AdamW's states need "
                         f"{size(need)}, and {device} has {size(free)} free: lower lora_r or lora_targets")


def model_positions(model) -> int:
    """How many positions the model has (its max_position_embeddings; unbounded when it names none)."""
    return getattr(model.config.get_text_config(), "max_position_embeddings", None) or 1 << 30


def fit_new_tokens(model, prompt_len: int, max_new_tokens: int, what: str, warn) -> int:
    """max_new_tokens, cut (with a warning) so that prompt + completion fit the model's positions."""
    positions = model_positions(model)
    room = max(1, positions - prompt_len)
    if max_new_tokens > room:
        warn(f"warning: {what}={max_new_tokens} with prompts of up to {prompt_len} tokens exceeds the "
             f"model's {positions} positions: cut to {room}")
    return min(max_new_tokens, room)


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
    """(body, head weight [V, H]) of a peft causal LM: the loss works from hidden states and the frozen
    head."""
    causal = model.get_base_model()
    body = getattr(causal, causal.base_model_prefix)
    head = causal.get_output_embeddings()
    if getattr(head, "bias", None) is not None or getattr(causal.config, "final_logit_softcapping", None):
        raise PopsdError(f"{type(causal).__name__}: popsd needs logits = hidden @ head.weight.T (no "
                         "bias, no softcap)")
    return body, head.weight


def eos_ids(model, tokenizer) -> list[int]:
    ids = model.generation_config.eos_token_id
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    return sorted(set(ids) | {tokenizer.eos_token_id})


def kv_bytes_per_token(config, dtype_bytes: int) -> int:
    """Bytes of KV cache one token costs: keys and values, every layer, every KV head."""
    c = config.get_text_config() if hasattr(config, "get_text_config") else config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return 2 * c.num_hidden_layers * getattr(c, "num_key_value_heads",
                                             c.num_attention_heads) * head_dim * dtype_bytes


def generation_batch(model, seq_len: int, budget_bytes: float, cap: int = 256) -> tuple[int, str]:
    """Sequences per generate call that fit `budget_bytes` at `seq_len` tokens each (prompt + new tokens):
    the KV cache and the per-step fp32 logits of each sequence. Returns (batch, the reasoning, for the
    log)."""
    dtype_bytes = 2 if next(model.parameters()).dtype in (torch.bfloat16, torch.float16) else 4
    per_seq = kv_bytes_per_token(model.config,
                                 dtype_bytes) * seq_len + 8 * model.config.get_text_config().vocab_size
    batch = max(1, min(cap, int(budget_bytes // per_seq)))
    gib = 2 ** 30
    return batch, (f"generation batch {batch}: {seq_len:,} tokens × "
                   f"{kv_bytes_per_token(model.config, dtype_bytes)/1024:.0f} KiB of KV cache = "
                   f"{per_seq / gib:.2f} GiB per sequence, {budget_bytes / gib:.1f} GiB budget")


def memory_budget(device, memory_gb: float) -> float:
    """Bytes generation may use: --memory-gb, else 90% of what is free on the GPU now, else 8 GiB on a CPU."""
    if memory_gb:
        return memory_gb * 2 ** 30
    if device.type == "cuda":
        return 0.9 * torch.cuda.mem_get_info(device)[0]
    return 8 * 2 ** 30


def merge_adapter(adapter: str, out: str, dtype: str = "bf16", trust: bool = False) -> str:
    """Base + LoRA adapter written as one model folder (peft merge_and_unload), with the tokenizer: for
    serving engines without LoRA support. The base is the one named in the adapter's adapter_config.json."""
    import json
    from pathlib import Path
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    config = Path(adapter) / "adapter_config.json"
    if not config.exists():
        raise PopsdError(
            f"{adapter}: no adapter_config.json (a run's adapter/ or checkpoints/step_N/ folder)")
    base = json.loads(config.read_text())["base_model_name_or_path"]
    try:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16 if dtype == "bf16"
                                                     else torch.float32, trust_remote_code=trust)
        tok_dir = adapter if (Path(adapter) / "tokenizer_config.json").exists() else base
        tokenizer = AutoTokenizer.from_pretrained(tok_dir, trust_remote_code=trust)
    except OSError as e:
        raise model_load_error(base, e) from None
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    merged.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
