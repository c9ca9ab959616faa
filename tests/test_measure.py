"""measure.py and compare's use of it: each world's roles on hand-built traces whose roles and errors are
known exactly, the per-role statistics on hand-made log-probs, the base's best temperature, and the extended
decision rule on hand-made differences (a gain a temperature change matches must not count as learning)."""
import math

import pytest
import torch

import compare
import measure
from worlds import carryworld as C, toyworld as T


def roles_at(world, question, completion):
    return [(r.at, r.role, r.right, r.avoid, r.met(completion[r.at]))
            for r in world.roles(question, completion)]


def test_world_one_names_each_first_trys_roles_and_judges_them_locally():
    q = "6+0-5*2"  # steps 6+0=6, 6-5=1, 1*2=2
    # a wrong operand (6+3), caught; a right step; a miscomputed one (1*2=3), not caught
    text = "6+3=9 wait 6+0=6 6-5=1 1*2=3 \\boxed{3}"
    assert roles_at(T, q, text) == [
        (0, "carried value", "6", False, True), (2, "operand", "0", False, False),
        (4, "result digit", "9", False, True),  # 6+3 as written is 9: the operand was the error
        (6, "wait after a wrong step", "w", False, True),
        (17, "carried value", "6", False, True), (19, "operand", "5", False, True),
        (21, "result digit", "1", False, True), (23, "wait after a right step", "w", True, True),
        (23, "carried value", "1", False, True), (25, "operand", "2", False, True),
        (27, "result digit", "2", False, False), (29, "wait after a wrong step", "w", False, False)]
    # the retry (6+0=6 after the wait) is a re-derivation: no roles of its own
    assert T.roles(q, "") == []
    # the completion ends after the step: no "wait" decision
    assert [r.role for r in T.roles(q, "6+0=6")] == ["carried value", "operand", "result digit"]


def test_world_two_names_multipliers_tens_digits_by_kind_and_place_and_the_waits():
    q = "47*7*23"  # 47·7 = 29 (easy), 29·23 = 67 (hard)
    text = "47*7=29 29*23=47 wait 9*3=27 2*3=06 9*2=18 2+6=8 8+8=6 29*23=67 \\boxed{67}"
    got = roles_at(C, q, text)
    assert got == [
        (3, "multiplier (copied from the question)", "7", False, True), (6, "units digit", "9", False, True),
        (5, "tens digit, easy step", "2", False, True), (5, "tens digit, first step", "2", False, True),
        (8, "wait after a right step", "w", True, True),
        (11, "multiplier (copied from the question)", "2", False, True),
        (12, "multiplier (copied from the question)", "3", False, True),
        (15, "units digit", "7", False, True),
        (14, "tens digit, hard step", "6", False, False), (14, "tens digit, last step", "6", False, False),
        (17, "wait after a wrong hard step", "w", False, True)]
    assert {r for _, r, *_ in got} <= set(C.ROLES)


def test_error_counts_and_right_probabilities_on_known_traces():
    samples = [("6+0-5*2", "6+3=9 wait 6+0=6 6-5=1 1*2=3 \\boxed{3}"),
               ("6+0-5*2", "6+0=6 6-5=1 1*2=2 \\boxed{2}")]
    counts = measure.error_counts(T, samples)
    assert counts["operand"] == (1, 6) and counts["result digit"] == (1, 6)
    assert counts["wait after a wrong step"] == (1, 2)  # the uncaught miscompute
    assert counts["wait after a right step"] == (0, 4) and counts["carried value"] == (0, 6)
    tok = T_tok()
    # log-probs that put 0.8 on each position's own character and 0.2 on "w": P(right) follows exactly
    logps = []
    for _, text in samples:
        lp = torch.full((len(text), 128), -math.inf)
        for t, c in enumerate(text):
            lp[t, tok.convert_tokens_to_ids(c)] = math.log(0.8)
            lp[t, tok.convert_tokens_to_ids("w")] = math.log(0.2) if c != "w" else 0.0
        logps.append(lp)
    p = measure.right_probabilities(T, tok, samples, logps)
    assert p["operand"] == pytest.approx([0.0, 0.8, 0.8, 0.8, 0.8, 0.8])  # "3" written, "0" right
    assert p["wait after a wrong step"] == pytest.approx([1.0, 0.2])  # "w" written there, then "\\"
    assert p["wait after a right step"] == pytest.approx([0.8] * 4)  # 1 − P(w)


def T_tok():
    from worlds import common
    return common.build_tokenizer()


def test_the_base_s_best_temperature_is_picked_on_the_pick_rows_ties_to_the_lower():
    def base(pick, report):
        return {t: {"pick": {"accuracy": a}, "report": {"accuracy": r}}
                for t, a, r in zip(("1", "0.7", "0.5"), pick, report)}
    assert measure.best_temperature(base((0.90, 0.97, 0.95), (0.99, 0.50, 0.50))) == "0.7"  # not the report
    assert measure.best_temperature(base((0.97, 0.97, 0.90), (0, 0, 0))) == "0.7"  # a tie: the lower T


def sweep_of(base_acc: dict, student_acc: dict, best: str) -> dict:
    """A hand-made sweep: 3 seeds, the same best T for each; base_acc, student_acc: {T: accuracy per seed}."""
    temps = list(base_acc)
    return {"temperatures": temps, "best": {s: best for s in "012"},
            "base": {s: {t: {"report": {"accuracy": base_acc[t][i], "markers_per_1k": 1.0}} for t in temps}
                     for i, s in enumerate("012")},
            "students": {"sketch": {"purified": {s: {t: {"accuracy": student_acc[t][i], "markers_per_1k": 1.0}
                                                     for t in temps} for i, s in enumerate("012")}}}}


def test_a_gain_that_a_temperature_change_matches_is_not_learning():
    base = {"1": [0.90, 0.91, 0.89], "0.7": [0.97, 0.98, 0.97], "0.5": [0.96, 0.97, 0.96]}
    # sharpening only: far above the base at T = 1 (it counts there), below the base at its best temperature
    sharp = {"1": [0.95, 0.95, 0.94], "0.7": [0.97, 0.98, 0.97], "0.5": [0.96, 0.97, 0.96]}
    v, = compare.beyond_sharpening(sweep_of(base, sharp, "0.7"))
    assert v["vs_base_at"]["1"]["counts"] and v["vs_base_at"]["1"]["mean"] > 0
    assert not v["vs_base_at_best"]["counts"] or v["vs_base_at_best"]["mean"] < 0
    assert v["learning_beyond_sharpening"] is False
    # above the base at its best T and at every matched T, each counting: learning
    learned = {"1": [0.99, 0.995, 0.99], "0.7": [0.995, 1.0, 0.995], "0.5": [0.99, 0.995, 0.99]}
    v, = compare.beyond_sharpening(sweep_of(base, learned, "0.7"))
    assert v["learning_beyond_sharpening"] is True
    # above at its best T, but not at one matched T (0.5: the same as the base there): not learning
    learned["0.5"] = base["0.5"]
    v, = compare.beyond_sharpening(sweep_of(base, learned, "0.7"))
    assert v["vs_base_at_best"]["counts"] and v["learning_beyond_sharpening"] is False
