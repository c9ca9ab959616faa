"""worlds/carryworld.py: the arithmetic and the procedure, the checker on hand-made traces, own-trace
documents, the reflection ban, the gates, the recipe's derived lengths, the shipped base."""
import json
import random
import re
import subprocess
import sys

import pytest
import torch

from plumbing.config import make_config
from conftest import ROOT, train_world_recipe
from rollout import build_contexts
from worlds import carryworld as C
from worlds import common

Q = "47*7*9"  # 47·7 = 329 → 29; 29·9 = 261 → 61
FIX = "47*7=39 wait 7*7=49 4*7=28 4+8=2 47*7=29"


def test_world_arithmetic_references_and_split():
    assert C.steps_of(Q) == [(47, 7, 29), (29, 9, 61)] and C.answer_of(Q) == "61"
    assert C.references(Q) == {"full": "47*7=29 29*9=61 \\boxed{61}", "sketch": "47..61"}
    rng = random.Random(0)
    train = {C.sample_question(rng) for _ in range(500)}
    test = {C.sample_question(rng, "test") for _ in range(200)}
    assert not train & test and all(C.is_test(q) for q in test)
    assert {len(C.steps_of(q)) for q in train} == set(range(C.MIN_OPS, C.MAX_OPS + 1))
    assert C.answer_of("05*3") == "15" and C.steps_of("99*9")[0][2] == 91  # 891
    assert C.steps_of("47*7*23*3") == [(47, 7, 29), (29, 23, 67),
                                       (67, 3, 1)] and C.answer_of("47*7*23*3") == "01"
    multipliers = [b for q in train for _, b, _ in C.steps_of(q)]
    assert set(multipliers) <= set(C.FACTORS + C.HARD) and set(C.HARD) <= set(multipliers)
    assert abs(sum(b > 9 for b in multipliers) / len(multipliers) - C.P_HARD) < 0.03


def test_the_procedure_is_right_for_every_step():
    for a in range(100):
        for b in C.FACTORS + C.HARD:
            text = C.procedure(a, b)
            for x, y, z in re.findall(r"(?<!\d)(\d)\*(\d)=(\d\d)", text):
                assert int(x) * int(y) == int(z), text
            for x, y, z in re.findall(r"(\d)\+(\d)=(\d)", text):
                assert (int(x) + int(y)) % 10 == int(z), text
            assert text.endswith(C.step_text(a, b, a * b % 100)), text
            # one-digit products only
            assert len(re.findall(r"(?<!\d)\d\*\d=", text)) == (3 if b > 9 else 2), text
    assert C.procedure(47, 7) == FIX.split(" wait ")[1]
    assert C.procedure(29, 23) == "9*3=27 2*3=06 9*2=18 2+6=8 8+8=6 29*23=67"  # tens: 2 + 6 + 8 = 16 → 6
    # coprime to 10: every step a bijection, so a wrong value left standing is a wrong answer
    for b in C.FACTORS + C.HARD:
        assert len({a * b % 100 for a in range(100)}) == 100


@pytest.mark.parametrize("completion, expected", [
    ("47*7=29 29*9=61 \\boxed{61}", dict(correct=True, steps=2, errors=0, waits=0)),
    (FIX + " 29*9=61 \\boxed{61}", dict(correct=True, steps=2, errors=1, caught=1, false_reflections=0,
                                        # the sub-steps are not attempts
                                        wrong_attempts=1, right_attempts=2)),
    ("47*7=39 39*9=51 \\boxed{51}", dict(correct=False, steps=2, errors=1, caught=0)),  # missed, carried on
    ("47*7=29 wait " + C.procedure(47, 7) + " 29*9=61 \\boxed{61}",
     dict(correct=True, errors=0, false_reflections=1, right_reflected=1)),  # a re-check of a right step
    ("47*3=41 29*9=61 \\boxed{61}", dict(steps=2, errors=2, correct=True)),  # wrong operand; the next from 41
    ("47*7=29 29*9=61", dict(correct=False)),  # no answer
    ("47*7=29 29*23=47 wait " + C.procedure(29, 23) + " 67*3=01 \\boxed{01}",
     # a hard step fixed
     dict(correct=True, steps=3, errors=1, caught=1, false_reflections=0, right_attempts=3)),
    # 2 is not 23; the rest from 58, locally right
    ("47*7=29 29*2=58 58*3=74 \\boxed{74}", dict(correct=False, steps=3, errors=1)),
])
def test_checker_on_hand_made_traces(completion, expected):
    got = C.check("47*7*23*3" if "*3=01" in completion or "*2=" in completion else Q, completion)
    for k, v in expected.items():
        assert getattr(got, k) == v, (k, got)


def test_own_traces_reflect_exactly_on_their_wrong_steps():
    rng = random.Random(0)
    for _ in range(300):
        q = C.sample_question(rng)
        tries = [c if rng.random() < 0.7 else (c + rng.randrange(1, 100)) % 100 for _, _, c in C.steps_of(q)]
        pieces = C.reflective(q, tries, random.Random(1))
        text = C.text_of(pieces)
        got = C.check(q, text)
        wrong = [f"{t:02d}" for t, (_, _, c) in zip(tries, C.steps_of(q)) if t != c]
        assert got.correct and got.errors == len(wrong) == got.caught, (q, tries, text)
        read = [t for t, trained in pieces if not trained]  # a wrong first try: read, never learned
        assert read == wrong and len(text) < C.MAX_NEW_TOKENS
    clean = C.reflective(Q, [29, 61], None)
    assert C.text_of(clean) == C.trace(Q) and all(trained for _, trained in clean)


def test_documents_keep_the_style_control_and_the_practice_rate():
    rng = random.Random(0)
    pool = [C.sample_question(rng) for _ in range(300)]
    tries = [[(c + 1) % 100 for _, _, c in C.steps_of(q)] for q in pool]  # every first try wrong
    docs = C.reflective_documents(pool, tries, seed=0)(6000)
    kinds = {"Q": [], "QR": [], "R": [], "P": []}
    results = []  # (is it the step's right value, is it learned) for every direct-step result
    for prompt, completion in docs:
        if not isinstance(completion, str):
            if prompt.startswith("Q:"):  # student and teacher contexts name the question
                truth = [f"{c:02d}" for _, _, c in C.steps_of(prompt[2:].split("\n")[0])]
                tried = [(text, trained) for text, trained in completion if re.fullmatch(r"\d\d", text)]
                results += [(text == t, trained) for (text, trained), t in zip(tried, truth, strict=True)]
            completion = C.text_of(completion)
        kind = "P" if prompt.startswith("P:") else "QR" if "\nR:" in prompt else prompt[0]
        kinds[kind].append("wait" in completion)
    assert abs(len(kinds["P"]) / len(docs) - C.P_PROCEDURE) < 0.02
    assert sum(kinds["Q"]) == len(kinds["Q"])  # the student's own traces: every wrong step reflected
    for k in ("QR", "R"):  # the same reflective share in both teacher contexts
        assert abs(sum(kinds[k]) / len(kinds[k]) - C.P_TEACHER_REFLECTIVE) < 0.04, k
    assert all(right == trained for right, trained in results) and {r for r, _ in results} == {True, False}
    stage1 = [C.direct_document(random.Random(i)) for i in range(2000)]
    assert not any("wait" in c for _, c in stage1)  # stage 1: no reflection anywhere


def test_the_lengths_are_derived_from_the_longest_trace_and_the_recipe_uses_them():
    def reflected(q):  # every step wrong, so every step reflected
        return C.text_of(C.reflective(q, [(c + 1) % 100 for _, _, c in C.steps_of(q)], None))
    rng = random.Random(0)
    sampled = max((reflected(C.sample_question(rng)) for _ in range(3000)), key=len)
    worst = max((reflected(f"{a:02d}" + f"*{b}" * C.MAX_OPS) for a in (19, 59, 99) for b in C.HARD), key=len)
    assert len(sampled) <= len(worst) <= C.longest_trace() < C.MAX_NEW_TOKENS == C.longest_trace() + 1
    assert worst.count(" wait ") == C.MAX_OPS and C.longest_trace() - len(worst) <= 2 * C.MAX_OPS
    cfg = make_config("carry")
    toy = make_config("toy")
    assert cfg.max_new_tokens == cfg.eval_max_new_tokens == C.MAX_NEW_TOKENS
    same = {"lr", "steps", "batch_size", "lora_r", "lora_alpha", "temperature", "beta", "pmi_clip", "jsd_mix",
            "eval_limit", "eval_every", "divergence", "seed"}
    assert {k: getattr(cfg, k) for k in same} == {k: getattr(toy, k) for k in same}  # world one's settings
    assert {k: getattr(cfg, k) for k in C.TEMPLATES} == C.TEMPLATES
    # the shipped base
    positions = json.loads((C.BASE / "config.json").read_text())["max_position_embeddings"]
    assert cfg.max_prompt_len + cfg.max_new_tokens == positions  # fit_new_tokens cuts nothing
    tok = common.build_tokenizer()
    rows = [json.loads(x) for f in ("train",
                                    "test") for x in (C.DATA / f"{f}.jsonl").read_text().splitlines()]
    contexts = [build_contexts(tok, r["question"], r["full"], student_thinking=False, teacher_thinking=False,
                               templates=(cfg.student_template, cfg.teacher_template, cfg.refonly_template))
                for r in rows[::25]]  # the full reference: the longer one
    longest = max(max(len(c.student), len(c.teacher), len(c.refonly)) for c in contexts)
    assert longest < cfg.max_prompt_len / 2  # no row is skipped as too long


def test_forbid_keeps_the_word_from_starting():
    tok = common.build_tokenizer()
    forbid = common.Forbid(tok, "wait")
    ids = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    rows = [ids("47*36=82 "), ids("47*36=82 w"), ids("47*36=82 wai"), ids("47*36=82")]
    width = max(map(len, rows))
    batch = torch.tensor([[tok.pad_token_id] * (width - len(r)) + r for r in rows])
    scores = forbid(batch, torch.zeros(4, 128))
    w, a, t = ids("w")[0], ids("a")[0], ids("t")[0]
    assert scores[0, w] == -float("inf") and scores[1, a] == -float("inf") and scores[2, t] == -float("inf")
    assert torch.isfinite(scores[3]).all() and (scores[0] == -float("inf")).sum() == 1


def test_own_first_tries_come_from_the_model_and_are_seeded():
    torch.manual_seed(0)
    tok = common.build_tokenizer()
    model = common.build_model(tok, hidden=32, layers=1).eval()
    qs = [C.sample_question(random.Random(i)) for i in range(6)]
    a, b = C.own_first_tries(model, tok, qs, seed=3), C.own_first_tries(model, tok, qs, seed=3)
    assert a == b and [len(t) for t in a] == [len(C.steps_of(q)) for q in qs]
    assert all(0 <= x < 100 for t in a for x in t)
    wrong = sum(t != c for q, ts in zip(qs, a) for t, (_, _, c) in zip(ts, C.steps_of(q)))
    assert C.first_try_error(model, tok, qs, seed=3) == wrong / sum(len(t) for t in a)


def test_each_first_try_follows_the_question_and_the_clean_trace_so_far(monkeypatch):
    import types
    from engines import hf
    tok = common.build_tokenizer()
    seen = []

    def generate(model, tok, prompts, **kw):  # records the prompts; every first try "00" (always wrong)
        seen.extend(tok.decode(p) for p in prompts)
        return types.SimpleNamespace(texts=["00"] * len(prompts))
    monkeypatch.setattr(hf, "generate", generate)
    model = common.build_model(tok, hidden=16, layers=1)
    assert C.own_first_tries(model, tok, [Q], seed=0) == [[0, 0]]
    assert "Q:47*7*9" in seen[0] and seen[0].endswith("47*7=")
    # after the clean trace, not after the wrong try and a reflection
    assert seen[1].endswith("47*7=29 29*9=")


def test_untrained_pieces_get_no_labels():
    tok = common.build_tokenizer()
    ids, attn, labels = common.batch_tensors([("Q:47*7", [("47*7=", True), ("39", False), (" wait", True)]),
                                              ("Q:47*7", "47*7=39 wait")], tok)
    assert torch.equal(ids[0], ids[1]) and attn.sum() == 2 * attn[0].sum()
    masked = (labels[1] != -100) & (labels[0] == -100)
    assert tok.decode(ids[1][masked]) == "39" and torch.equal(labels[0][~masked], labels[1][~masked])


def test_training_stops_when_asked(tmp_path):
    tok = common.build_tokenizer()
    model = common.build_model(tok, hidden=16, layers=1)
    asked = []
    log = common.train_lm(model, tok, lambda k: [C.direct_document(random.Random(i)) for i in range(k)],
                          tmp_path, 50, batch_size=2, lr=1e-3, warmup=2, evaluate=lambda m: {
                              "student": {"accuracy": 0, "first_try_errors": 0, "caught_frac": 0,
                                          "p_wait_wrong": 0, "p_wait_right": 0}}, eval_every=100, quiet=True,
                          stop=lambda m: asked.append(1) or len(asked) == 2, stop_every=4)
    assert len(asked) == 2 and [r["step"] for r in log] == [8]


def _measured(acc=0.8, banned=0.5, caught=0.9, wrong=0.9, right=0.05, teacher=0.99):
    return {"student": {"accuracy": acc, "caught_frac": caught, "p_wait_wrong": wrong, "p_wait_right": right},
            "student_no_wait": {"accuracy": banned}, "teacher_full": {"accuracy": teacher}}


@pytest.mark.parametrize("change, failed", [
    ({}, []), ({"acc": 0.4, "banned": 0.2}, [0]), ({"banned": 0.75}, [1]), ({"caught": 0.3}, [2]),
    ({"right": 0.6}, [3]), ({"teacher": 0.9}, [4]),
])
def test_gates_pass_and_fail_on_their_numbers(change, failed):
    rows = common.gates(C, _measured(**change))
    assert [i for i, g in enumerate(rows) if not g["passed"]] == failed


def test_the_world_is_found_by_name_and_data_ship_with_a_held_out_split():
    import eval as E
    from plumbing import grading
    import worlds
    assert worlds.get("carryworld") is C and "carryworld" in worlds.NAMES
    samples = [{"completion": FIX + " 29*9=61 \\boxed{61}"}]
    grading.grade(samples, Q, "61", checker=E.checker_of("carryworld"))  # eval.py looks the world up by name
    assert samples[0]["correct"] and samples[0]["check"]["caught"] == 1
    with pytest.raises(ValueError, match="no world 'nope'"):
        worlds.get("nope")
    train = {r.split('"')[3] for r in (C.DATA / "train.jsonl").read_text().splitlines()}
    test = {r.split('"')[3] for r in (C.DATA / "test.jsonl").read_text().splitlines()}
    assert len(train) == 2000 and len(test) == 500 and not train & test and all(C.is_test(q) for q in test)
    assert (ROOT / "data/carryworld").is_dir()


def test_a_misspelled_world_stops_compare_before_any_run(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "compare.py"), "--world", "toyworld,nope", "--seeds",
                           "1"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert (proc.returncode == 2
            and "no world 'nope'" in proc.stdout), proc.stdout[-2000:] + proc.stderr[-2000:]
    assert not (tmp_path / "runs").exists()  # not after the first world's comparison


def test_pretraining_curves_of_two_stages_mark_the_stage_and_the_ban(tmp_path):
    import json
    import plots
    log = [json.loads(x)
           for x in (ROOT / "docs/carryworld_pilot_e/pretrain_log.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in log} == {"stage 1", "stage 2"} and all("student_no_wait" in r for r in log)
    out = plots.plot_pretrain(log, [(n, t) for n, _, t in C.GATES if t <= 1], tmp_path / "p.png")
    assert out.stat().st_size > 30_000


def test_the_shipped_base_loads_and_reflection_pays_on_it():
    tok, model = common.load_base(C)
    assert type(model).__name__ == "Qwen3ForCausalLM" and sum(p.numel()
                                                              for p in model.parameters()) < 2_000_000
    assert sum(f.stat().st_size for f in C.BASE.iterdir()) < 8_000_000  # a few MB
    qs = common.held_out(C, 64)
    with_wait, banned = common.measure(C, model, tok, qs), common.measure(C, model, tok, qs, forbid="wait")
    # coarse: the gates
    assert with_wait["accuracy"] > 0.5 and with_wait["accuracy"] - banned["accuracy"] > 0.1
    gates = (C.BASE / "gates.txt").read_text()  # are measured on 400 questions (docs/carryworld.md)
    assert gates.count("pass") == len(C.GATES) and "FAIL" not in gates


def test_the_carry_recipe_trains_and_evaluates_with_the_world_checker(tmp_path):
    train_world_recipe("carry", tmp_path / "run", C.check, steps=1, eval_limit=8)
