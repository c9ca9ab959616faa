import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """The tiny recipe's random-init Qwen3 and tokenizer, built once for the session."""
    import data
    import rollout
    rows = [json.loads(line) for line in (ROOT / "data/toy_math.jsonl").read_text().splitlines()]
    texts = [t for r in rows for t in (r["problem"], r["solution"])] + [
        rollout.STUDENT_TEMPLATE, rollout.TEACHER_TEMPLATE, rollout.REFONLY_TEMPLATE]
    return data.build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", texts, seed=0)


@pytest.fixture(scope="session")
def tiny(tiny_dir):
    """(tokenizer, peft model) of the tiny model, fp32 on CPU, LoRA r8."""
    import popsd
    cfg = popsd.make_config("tiny", ["out_dir=unused"])
    return popsd.load_model(cfg, popsd.pick_device("cpu"), str(tiny_dir))
