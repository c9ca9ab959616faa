"""data.py: datasets by hub id or local file, the training data order, and the tiny test model.

Shared by popsd.py (training data) and eval.py (benchmarks). Rows with a missing or empty field
are an error naming the file and row, or are skipped and counted when asked.
The tiny model is a random-init 2-layer Qwen3 with a BPE tokenizer trained in milliseconds on the
bundled toy math data (data/toy_math.jsonl): it lets every path run on a CPU with no download.
"""
import json
import math
import os
import shutil
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent  # the repository


class PopsdError(Exception):
    """A user-facing error: printed without a traceback."""


def model_load_error(path: str, e: Exception) -> PopsdError:
    """One clear line: a local folder that is missing or unreadable, or a hub id that could not be fetched."""
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    if Path(path).expanduser().is_dir():
        return PopsdError(f"could not load the model in folder {path!r}: {first}")
    if path.startswith((".", "/", "~")) or path.count("/") > 1:  # a hub id is "name" or "org/name"
        return PopsdError(f"model folder {path!r} does not exist")
    return PopsdError(
        f"could not load model {path!r} (no such local folder; as a hub id: {first}). If this machine is "
        "offline or the model is not in the Hugging Face cache, download it where there is a network (hf "
        f"download {path}) and pass the local directory.")


def resolve_local(path: str) -> Path | None:
    """A local file as given, or relative to the repo; None when neither exists."""
    for p in (Path(path), ROOT / path):
        if p.exists():
            return p
    return None


def unique_keys(pairs: list) -> dict:
    """json's object_pairs_hook: an object naming a key twice is an error (json keeps the last, silently)."""
    seen = set()
    for key, _ in pairs:
        if key in seen:
            raise ValueError(f"the key {key!r} appears twice in one object")
        seen.add(key)
    return dict(pairs)


def read_records(source: str, split: str):
    """Yields (row label, dict or JSON error) from a local .jsonl/.json/.parquet file or a hub dataset id."""
    local = resolve_local(source)
    if local is None and Path(source).suffix in (".jsonl", ".json", ".parquet"):
        raise PopsdError(f"data file {source!r} not found")
    if local is not None and local.suffix == ".jsonl":
        for i, raw in enumerate(local.read_bytes().splitlines(), 1):
            try:  # line by line: a bad byte names its line (and is skipped under skip_bad_rows)
                line = raw.decode("utf-8-sig" if i == 1 else "utf-8")  # a UTF-8 byte-order mark is accepted
            except UnicodeDecodeError as e:
                yield f"{local} line {i}", ValueError(f"not UTF-8 text ({e.reason} at byte {e.start})")
                continue
            if line.strip():
                try:
                    yield f"{local} line {i}", json.loads(line, object_pairs_hook=unique_keys)
                except ValueError as e:  # not JSON, or a key named twice
                    yield f"{local} line {i}", e
        return
    if local is not None and local.suffix == ".json":
        try:
            rows = json.loads(local.read_text(encoding="utf-8-sig"), object_pairs_hook=unique_keys)
        except (UnicodeDecodeError, ValueError) as e:
            raise PopsdError(f"data file {local} is not UTF-8 JSON: {e}") from None
        yield from ((f"{local} row {i}", r) for i, r in enumerate(rows if isinstance(rows, list) else [rows]))
        return
    import datasets
    try:
        if local is not None:
            ds = datasets.load_dataset("parquet", data_files=str(local), split="train")
        else:
            ds = datasets.load_dataset(source, split=split)
    except Exception as e:  # offline, not cached, no such split, ...
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise PopsdError(
            f"could not load dataset {source!r} (split {split!r}): {first}. If this machine is offline or "
            "the dataset is not in the Hugging Face cache, download it where there is a network (hf "
            f"download --repo-type dataset {source}) or point at a local .jsonl/.json/.parquet file with the "
            "question and reference fields. Setting HF_HUB_OFFLINE=1 skips the network retries.") from None
    yield from ((f"{source} row {i}", r) for i, r in enumerate(ds))


def read_rows(source: str, split: str, fields: tuple[str, ...], skip_bad: bool = False,
              advice: str = "Name the right fields in the config (question_field, reference_field), fix the "
                            "row, or set skip_bad_rows=true to skip and count such rows."):
    """Tuples of the named string fields, and the number of bad rows skipped (a bad row stops unless
    skip_bad)."""
    rows, bad = [], 0
    for label, rec in read_records(source, split):
        if isinstance(rec, json.JSONDecodeError):
            problem = f"not valid JSON ({rec})"
        elif isinstance(rec, Exception):
            problem = str(rec)
        elif not isinstance(rec, dict):
            problem = "is not an object"
        else:
            missing = [f for f in fields if rec.get(f) is None or not str(rec[f]).strip()]
            # text, or a number written as itself; true, NaN or a list would become Python's "True", "nan"
            other = [f for f in fields if f not in missing and (
                isinstance(rec[f], bool) or not isinstance(rec[f], (str, int, float))
                or (isinstance(rec[f], float) and not math.isfinite(rec[f])))]
            problem = (f"field {missing[0]!r} is missing or empty (fields: {', '.join(rec)})" if missing
                       else f"field {other[0]!r} holds {json.dumps(rec[other[0]])[:60]}, not text or a number"
                       if other else "")
        if problem:
            if not skip_bad:
                raise PopsdError(f"{label}: {problem}. {advice}")
            bad += 1
            continue
        rows.append(tuple(str(rec[f]) for f in fields))
    if not rows:
        raise PopsdError(f"no usable rows in {source!r}")
    return rows, bad


class DataStream:
    """Prompt indices in a fresh seeded permutation each epoch; (epoch, cursor) is the whole state."""

    def __init__(self, size: int, seed: int, epoch: int = 0, cursor: int = 0):
        self.size, self.seed, self.epoch, self.cursor = size, seed, epoch, cursor

    def take(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            perm = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch))
            part = perm[self.cursor:self.cursor + k - len(out)].tolist()
            out += part
            self.cursor += len(part)
            if self.cursor >= self.size:
                self.epoch, self.cursor = self.epoch + 1, 0
        return out


TINY_CHAT_TEMPLATE = (  # ChatML with Qwen3's enable_thinking switch
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% "
    "endif %}{% endif %}")


def build_tiny_model(path: Path, texts: list[str], seed: int = 0) -> Path:
    """A random-init 2-layer Qwen3 and a byte-level BPE tokenizer trained on `texts`, saved to `path`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen3Config
    if (path / "config.json").exists():
        return path
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=512, special_tokens=specials,
                                                       show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    # as in Qwen3: single tokens, not special (decoded text keeps them)
    bpe.add_tokens(["<think>", "</think>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.chat_template = TINY_CHAT_TEMPLATE
    vocab = math.ceil(len(tok) / 64) * 64 + 64  # padded beyond the tokenizer, as Qwen pads to 151,936
    config = Qwen3Config(vocab_size=vocab, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         max_position_embeddings=1024, tie_word_embeddings=False,
                         initializer_range=0.4,  # wide init: peaked, context-dependent distributions
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.do_sample = True  # as chat models ship it: servers then sample at temperature > 0
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, path)
    return path
