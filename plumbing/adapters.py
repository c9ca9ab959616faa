"""adapters.py: a trained adapter folder and what comes with it, for the commands that read one (eval.py,
explain.py): the settings of the run that made it (prompts, sampling), the base it names, its
adapter_config.json checked, and loading base + adapter.

    tokenizer, model = load_for_eval("data/toyworld/base", "runs/toy/adapter", "fp32", False, device, False)
    run_settings("runs/toy/adapter")   # {"student_template": ..., "student_thinking": False, ...}
"""
import json
from pathlib import Path

import torch

from plumbing.checkpoints import BASE_FILE, PROMPTS_FILE, PROMPT_KEYS
from plumbing.data import PopsdError, model_load_error, resolve_local
from plumbing.models import FINGERPRINT, quantization_config, same_base


def run_settings(adapter: str | None, model_path: str | None = None) -> dict:
    """The prompt settings to evaluate with, first found of: the adapter's popsd_prompts.json (popsd saves one
    with every adapter), the training run's config.json above it, the model folder's popsd_prompts.json (a
    base that ships its own, like the toy base); {} when none (then the built-in defaults). Flags override
    them."""
    def read(path: Path) -> dict:
        try:
            got = json.loads(path.read_text()) if path.is_file() else {}
        except ValueError:
            raise PopsdError(f"{path} is not valid JSON") from None
        return {k: v for k, v in got.items() if k in PROMPT_KEYS} if isinstance(got, dict) else {}
    if adapter and (found := read(Path(adapter) / PROMPTS_FILE)):
        return found
    if adapter:
        for d in [Path(adapter), *Path(adapter).resolve().parents][:4]:
            if "student_template" in (found := read(d / "config.json")):
                return found
    local = resolve_local(model_path) if model_path else None
    return read(local / PROMPTS_FILE) if local is not None and local.is_dir() else {}


SAMPLING_KEYS = ("rollout_engine", "graph_keep_rows", "gen_batch_size", "threads")


def run_config(adapter: str | None) -> dict:
    """The config.json of the training run an adapter folder belongs to (the folder itself, or up to three
    above it: a run's adapter/ or checkpoints/step_N/), {} when there is none."""
    for d in [Path(adapter), *Path(adapter).resolve().parents][:4] if adapter else []:
        try:
            got = json.loads((d / "config.json").read_text())
        except (OSError, ValueError):
            continue
        if isinstance(got, dict) and "rollout_engine" in got:
            return got
    return {}


def run_sampling(adapter: str | None) -> dict:
    """How the training run above an adapter sampled (its config.json: engine, graph_keep_rows, batch,
    threads): eval.py samples the same way by default, so checking a result takes what the run's own
    evaluation took, and gives the run's own evaluation, sample for sample, with the same questions, seed and
    settings."""
    got = run_config(adapter)
    return {k: got[k] for k in SAMPLING_KEYS if k in got}


def base_record(adapter: str | None) -> dict:
    """The base an adapter was trained from, as popsd recorded it next to the adapter (popsd_base.json:
    model, sha256); {} for an adapter from before the record, or none."""
    try:
        got = json.loads((Path(adapter) / BASE_FILE).read_text()) if adapter else {}
    except (OSError, ValueError):
        return {}
    return got if isinstance(got, dict) else {}


def load_tokenizer(model_path: str, adapter: str | None, trust: bool):
    """The adapter's tokenizer when it saved one (a run's adapter/), else the base model's."""
    from transformers import AutoTokenizer
    # adapter/ has one, checkpoints not
    has_tok = adapter and (Path(adapter) / "tokenizer_config.json").exists()
    try:
        tokenizer = AutoTokenizer.from_pretrained(adapter if has_tok else model_path, trust_remote_code=trust)
    except OSError as e:
        raise model_load_error(model_path, e) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_adapter_config(path: Path):
    """A LoRA adapter as popsd writes them: nothing besides low-rank updates (modules_to_save would replace
    whole layers of the base), a positive integer rank."""
    try:
        config = json.loads(path.read_text())
        assert isinstance(config, dict)
    except (ValueError, AssertionError):
        raise PopsdError(f"{path} is not a JSON object") from None
    if config.get("peft_type", "LORA") != "LORA":
        raise PopsdError(f"{path}: peft_type {config.get('peft_type')!r}; eval.py evaluates LoRA adapters")
    if config.get("modules_to_save"):
        raise PopsdError(f"{path}: modules_to_save {config['modules_to_save']!r} would replace whole layers "
                         "of the base model; a popsd adapter holds LoRA weights only")
    if not isinstance(config.get("r"), int) or config["r"] < 1:
        raise PopsdError(f"{path}: the rank r must be a positive integer, got {config.get('r')!r}")


def load_for_eval(model_path: str, adapter: str | None, dtype: str, load_in_4bit: bool, device, trust: bool):
    """Tokenizer and base model, with the adapter on top when one is given."""
    import transformers
    from transformers import AutoModelForCausalLM
    transformers.utils.logging.disable_progress_bar()
    kwargs = {"dtype": torch.bfloat16 if dtype == "bf16" else torch.float32, "trust_remote_code": trust}
    if load_in_4bit:
        kwargs |= {"device_map": {"": device}, "quantization_config": quantization_config()}
    tokenizer = load_tokenizer(model_path, adapter, trust)
    if adapter and (Path(adapter) / "adapter_config.json").is_file():
        check_adapter_config(Path(adapter) / "adapter_config.json")
    try:
        model = AutoModelForCausalLM.from_pretrained(model_path, **kwargs)
    except OSError as e:
        raise model_load_error(model_path, e) from None
    if adapter:
        from peft import PeftModel
        try:
            model = PeftModel.from_pretrained(model, adapter)
        except OSError as e:
            raise model_load_error(adapter if not Path(adapter).exists() else model_path, e) from None
        except (RuntimeError, ValueError, KeyError) as e:  # shapes or module names that do not match the base
            raise PopsdError(f"the adapter in {adapter} does not fit {model_path}: "
                             f"{str(e).strip().splitlines()[0][:300]}") from None
    if not load_in_4bit:
        model.to(device)
    return tokenizer, model


def base_model_of(adapter: str | Path | None) -> str | None:
    """The base model an adapter names; a relative local path is found from here or from the repo."""
    config = Path(adapter or "") / "adapter_config.json"
    if not (adapter and config.exists()):
        return None
    base = json.loads(config.read_text())["base_model_name_or_path"]
    local = resolve_local(base) if not Path(base).is_absolute() else None
    return str(local.resolve()) if local is not None else base


def swap_adapter(model, path: Path):
    """Loads another checkpoint's LoRA weights into the model's adapter (same shapes), in place."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file
    result = set_peft_model_state_dict(model, load_file(path / "adapter_model.safetensors"))
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing:
        raise PopsdError(f"{path}: the adapter does not match the first checkpoint's ({missing[0]} missing)")


def check_adapter_base(adapter: str | None, model_path: str, model_sha: str | None, other: bool, warn) -> str:
    """An adapter runs on the base it was trained from (its popsd_base.json), not on another one or on its own
    changed in place, unless `other` (--other-base) says to go on, said aloud. What was checked, for the
    record: "the adapter's own base", "another base (--other-base)", or why there was nothing to check."""
    record = base_record(adapter)
    if not adapter or not record.get("sha256"):
        return "no record of the adapter's base" if adapter else "no adapter"
    if model_sha and same_base(record["sha256"], model_path, model_sha):
        return "the adapter's own base"
    if other:
        warn(f"--other-base: {model_path} is not the base {adapter} was trained from (by its "
             "popsd_base.json); going on, as asked")
        return "another base (--other-base)"
    raise PopsdError(f"{adapter} was trained from {record.get('model')} (checksum "
                     f"{record['sha256'].removeprefix(FINGERPRINT)[:12]}…), and {model_path} is another base"
                     f"{' (or that one, changed since)' if model_sha else ' (not on this machine)'}: use the "
                     "base the adapter was trained from, or pass --other-base to go on anyway")
