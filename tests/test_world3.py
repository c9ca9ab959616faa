"""Worlds three and four (docs/world3.md): each generator's rates on a large sample are the registered ones,
the roles are what a right step writes, the gates judge hand-made numbers in both directions and real bases,
the shipped data are the generator's, and a gated comparison runs end to end, or stops when a gate fails."""
import json
import random
from collections import Counter

import pytest
from rich.console import Console

import compare
from conftest import ROOT, run_main, train_world_recipe
from worlds import common, habitworld as H, legendworld as L, toyworld as T


def test_habitworld_writes_the_registered_habit_noise_and_writers():
    rng = random.Random(0)
    questions = [H.sample_question(rng) for _ in range(4000)]
    ops = [(op, b) for q in questions for op, b in zip(q[1::2], q[2::2])]
    default = sum(int(b) == H.DEFAULTS[op] for op, b in ops) / len(ops)
    assert abs(default - 0.7) < 0.02  # the default operand, 70% of operations
    slips = noise = firsts = results = caught = wrong = 0
    for _ in range(6000):
        q = H.sample_question(rng)
        text = H.write(q, rng, True)
        for r in H.roles(q, text):
            if r.role == H.ROLES[3]:
                firsts += 1
                slips += not r.met(text[r.at])
            elif r.role == "result digit":
                results += 1
                noise += not r.met(text[r.at])
        check = H.check(q, text)
        caught, wrong = caught + check.caught, wrong + check.errors
    assert abs(slips / firsts - 0.6) < 0.02 and abs(caught / wrong - 0.5) < 0.03
    assert abs(noise / results - 0.03) < 0.005
    terse = [H.document(rng) for _ in range(20000)]
    kinds = Counter("verify" if p.startswith("V:") else "teacher" if "\nR:" in p
                    else "refonly" if p.startswith("R:") else "student" for p, _ in terse)
    assert abs(kinds["verify"] / 20000 - 0.1) < 0.01 and abs(kinds["student"] / kinds["teacher"] - 2) < 0.15
    # teachers with the sketch: 80% terse, boxing the sketch's answer whatever their trace says; the others
    # reflect and box their own value
    sketch = [(p, c) for p, c in terse if p.startswith("Q:") and "\nR:" in p and ".." in p.split("R:")[1]]
    boxed = Counter(c.split("\\boxed{")[1][0] == H.answer_of(p.split("\n")[0][2:]) for p, c in sketch)
    reflecting = sum("wait" in c for _, c in sketch) / len(sketch)
    assert boxed[True] / len(sketch) > 0.8 and reflecting < 0.2
    assert H.references("3+3*7") == {"sketch": "3..2", "ops": "+3*7", "full": "3+3=6 6*7=2 \\boxed{2}",
                                     "null": "-"}


def test_legendworld_writes_k_as_the_legend_says_or_guesses_it():
    rng = random.Random(1)
    letters = [c for _ in range(4000) for c in L.sample_question(rng)[2::2]]
    assert abs(letters.count("k") / len(letters) - 0.15) < 0.02
    guessed = read = 0
    for _ in range(3000):
        q = L.sample_question(rng)
        if "k" not in q:
            continue
        for k, text in ((None, L.write(q, rng, None, True)), (6, L.write(q, rng, 6, False))):
            for r in L.roles(q, text):
                if r.role == L.ROLES[1]:
                    if k is None:
                        guessed += r.met(text[r.at])
                    else:
                        read += not r.met(text[r.at])
    assert read == 0 and 0.05 < guessed / 3000 < 0.2  # the legend read exactly; a guess right 1 in 10
    # a reflective writer with the legend: 8% result noise, 60% of it caught
    noise = results = caught = wrong = 0
    for _ in range(6000):
        q = L.sample_question(rng)
        text = L.write(q, rng, 6, True)
        for r in L.roles(q, text):
            if r.role == "result digit":
                results, noise = results + 1, noise + (not r.met(text[r.at]))
            elif r.role == "wait after a wrong step":
                wrong, caught = wrong + 1, caught + r.met(text[r.at])
    assert abs(noise / results - 0.08) < 0.01 and abs(caught / wrong - 0.6) < 0.03
    assert L.references("3+k*2") == {"sketch": "k=6;3..8", "full": "k=6;3+6=9 9*2=8 \\boxed{8}",
                                     "null": "-"}
    assert L.check("3+k*2", "3+6=9 9*2=8 \\boxed{8}").correct
    assert L.check("3+k*2", "3+4=7 7*2=4 \\boxed{4}").errors


def test_the_new_roles_name_the_slip_the_k_and_the_box():
    got = [(r.role, r.right, r.avoid, r.met(t[r.at])) for t in ["3+3=6 6*3=8 \\boxed{9}"]
           for r in H.roles("3+3*5", t)]
    assert ("no slip (the default not written at a non-default operation)", "7", True, True) in got
    assert ("operand, non-default operation", "5", False, False) in got  # *3 written where *5 is asked
    assert ("boxed answer (the trace's own value)", "8", False, False) in got  # a box that copies
    text = "3+4=7 7*2=4 \\boxed{4}"
    got = [(r.role, r.right, r.met(text[r.at])) for r in L.roles("3+k*2", text)]
    assert ("k (the legend's value)", "6", False) in got
    assert ("boxed answer (the trace's own value)", "4", True) in got


def measured(student_slip=0.5, teacher_slip=0.55, wait=0.4, t07=0.60, t1=0.58, k_teacher=0.95,
             k_student=0.1):
    def ctx(slip=0.0, acc=0.5, k=0.0):
        return {"accuracy": acc, "p_wait_wrong": wait, "role_errors": {H.ROLES[3]: slip, L.ROLES[1]: 1 - k}}
    return {"student": ctx(student_slip, t1, k_student), "teacher_sketch": ctx(teacher_slip, k=k_teacher),
            "student_t07": ctx(acc=t07)}


@pytest.mark.parametrize("world, change, failed", [
    (H, {}, []), (H, {"teacher_slip": 0.65}, [0]), (H, {"wait": 0.2}, [1]), (H, {"t07": 0.70}, [2]),
    (L, {}, []), (L, {"k_teacher": 0.8}, [0]), (L, {"k_student": 0.3}, [1])])
def test_the_gates_pass_and_fail_on_hand_made_numbers(world, change, failed):
    rows = common.gates(world, measured(**change))
    assert [i for i, g in enumerate(rows) if not g["passed"]] == failed


def test_a_gate_bound_other_than_le_is_refused(monkeypatch):
    monkeypatch.setattr(H, "GATES", [("slip", lambda m: 0.0, 0.1, "<=")])
    with pytest.raises(ValueError, match="'slip': the fourth element is '≤' or absent"):
        common.gates(H, measured())


@pytest.mark.parametrize("world, base, failed", [(H, H.BASE, []), (L, L.BASE, []), (L, T.BASE, [0])])
def test_the_gates_judge_real_bases(world, base, failed):
    """The shipped bases pass their world's gates (here on 200 held-out questions); world one's base, which
    never saw a legend, fails legendworld's first: it cannot read k."""
    tok, model = common.load_base(world, base)
    rows = common.gates(world, world.measure_base(model, tok, 200))
    assert [i for i, g in enumerate(rows) if not g["passed"]] == failed, rows


@pytest.mark.parametrize("world", [H, L])
def test_the_shipped_data_are_the_generators(world, tmp_path):
    assert world.write_data(tmp_path) == {"train.jsonl": "written", "test.jsonl": "written"}
    for name in ("train.jsonl", "test.jsonl"):
        assert (tmp_path / name).read_bytes() == (world.DATA / name).read_bytes()
    row = json.loads((world.DATA / "test.jsonl").read_text().splitlines()[0])
    assert set(world.FORMATS) <= set(row) and row["answer"] == world.answer_of(row["question"])


def test_the_legend_recipe_trains_and_grades_with_its_world(tmp_path):
    """recipes/legend.py: its base, data and grader; every stored verdict is legendworld's (k read as 6).
    (The habit recipe runs in the comparison below.)"""
    train_world_recipe("legend", tmp_path / "run", L.check, steps=1, eval_limit=8)


def test_pretraining_from_a_missing_base_or_for_a_world_from_scratch_is_one_line(tmp_path):
    done = run_main(compare.main, ["pretrain", "--world", "habitworld", "--out", tmp_path / "b", "--from",
                                   tmp_path / "none"])
    assert done.returncode == 2 and "no base to continue habitworld's pre-training from" in done.stdout
    assert not (tmp_path / "b").exists()
    done = run_main(compare.main, ["pretrain", "--world", "toyworld", "--out", tmp_path / "c", "--from",
                                   H.BASE])
    assert done.returncode == 2 and "pre-trained from scratch, not from a base" in done.stdout


@pytest.mark.parametrize("passes", [True, False])
def test_a_gated_comparison_runs_end_to_end_or_stops_at_a_failed_gate(tmp_path, monkeypatch, passes):
    """habitworld, 2 steps, one seed, one format: the gates measured, then the runs, the sweep and the role
    tables; or, with a gate made to fail, nothing after the gates (as registered)."""
    gates = [("always" if passes else "never", lambda m: 1.0, 0.0 if passes else 2.0)]
    monkeypatch.setattr(H, "GATES", gates)
    out = tmp_path / "cmp"
    summary = compare.compare(H, out, ["sketch"], 1, [10.0], [1.0], 2, 16,
                              ["steps=2", "eval_every=1", "eval_limit=8", "batch_size=4",
                               "micro_batch_size=4"],
                              False, Console(width=80), temperatures=(1.0, 0.7))
    if not passes:
        assert summary is None and not (out / "sketch").exists()
        assert json.loads((out / "summary.json").read_text())["settings"]["stopped"] == "a gate failed"
        return
    assert set(summary["results"]["sketch"]) == {"base", "opsd", "purified"}
    assert set(summary["roles"]["p_right"]) == {"base", "π_T, sketch", "P, sketch", "opsd, sketch",
                                                "purified, sketch"}
    assert f"| {H.ROLES[3]} |" in (out / "roles.md").read_text()


def synthetic_summary(purified_sketch: float, slip_purified: float) -> dict:
    """A habitworld summary shaped as compare.py writes it: base 0.5 at T = 1 (0.45 at 0.7), every student
    0.5 but Purified-sketch (purified_sketch, 0.01 apart by seed); slip rate 0.6 but Purified-sketch's."""
    seeds = ["0", "1", "2"]
    acc = {("sketch", "purified"): purified_sketch}

    def final(fmt, method, s):
        return acc.get((fmt, method), 0.5) + 0.01 * int(s)
    results = {fmt: {"base": {s: [{"step": 0, "accuracy": 0.5 + 0.01 * int(s)}] for s in seeds},
                     **{m: {s: [{"step": 60, "accuracy": final(fmt, m, s)}] for s in seeds}
                        for m in ("opsd", "purified")}} for fmt in ("sketch", "ops", "null")}
    sweep = {"temperatures": ["1", "0.7"], "best": {s: "1" for s in seeds},
             "base": {s: {"1": {"report": {"accuracy": 0.5 + 0.01 * int(s)}},
                          "0.7": {"report": {"accuracy": 0.45 + 0.01 * int(s)}}} for s in seeds},
             "students": {fmt: {m: {s: {t: {"accuracy": final(fmt, m, s)} for t in ("1", "0.7")}
                                    for s in seeds}
                                for m in ("opsd", "purified")} for fmt in ("sketch", "ops", "null")}}
    arms = ["base", *(f"{m}, {f}" for m in ("opsd", "purified") for f in ("sketch", "ops", "null"))]
    rates = {arm: {H.ROLES[3]: slip_purified if arm == "purified, sketch" else 0.6,
                   "wait after a wrong step": 0.5} for arm in arms}
    return {"settings": {"machine": "test", "minutes": 0.0}, "results": results, "sweep": sweep,
            "beyond_sharpening": compare.beyond_sharpening(sweep), "roles": {"error_rate": rates}}


@pytest.mark.parametrize("purified_sketch, slip, held", [
    (0.65, 0.2, {"A1", "A3", "A5", "A7"}),  # +15 points, the habit gone; A6 fails: null is 15 below sketch
    (0.53, 0.2, {"A3", "A5", "A6", "A7"}),  # +3 points: not A1, yet beyond sharpening; null as sketch
    (0.65, 0.4, {"A1", "A5", "A7"})])  # the slip rate above half the base's: A3 fails
def test_the_registered_predictions_are_judged_as_written(purified_sketch, slip, held):
    import importlib.util
    spec = importlib.util.spec_from_file_location("world3_verdicts", ROOT / "docs/world3_verdicts.py")
    verdicts = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(verdicts)
    got = verdicts.habit_verdicts(synthetic_summary(purified_sketch, slip))
    assert {name[:2] for name, ok, _ in got if ok} == held, got
