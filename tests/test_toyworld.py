"""worlds/toyworld.py (and worlds/common.py): the world and its checker on hand-made traces, the gates,
pre-training, the shipped base, compare.py."""
import json
import os
import random
import shutil
import statistics
import subprocess
import sys

import pytest
import torch

import compare
from conftest import ROOT, run_main, train_world_recipe
from worlds import common
from worlds import toyworld as T

Q = "3+4*2-5+7"  # 3+4=7, 7*2=4, 4-5=9, 9+7=6


# ---- the world

def test_world_arithmetic_and_references():
    assert T.steps_of(Q) == [(3, "+", 4, 7), (7, "*", 2, 4), (4, "-", 5, 9), (9, "+", 7, 6)]
    assert T.answer_of(Q) == "6"
    assert T.references(Q) == {"full": "3+4=7 7*2=4 4-5=9 9+7=6 \\boxed{6}", "sketch": "3..6"}
    rng = random.Random(0)
    for split in ("train", "test"):
        for _ in range(200):
            q = T.sample_question(rng, split)
            ops = list(zip(q[1::2], q[2::2]))
            assert T.is_test(q) == (split == "test") and T.MIN_OPS <= len(ops) <= T.MAX_OPS
            assert len(set(ops)) == len(ops)  # each operation at most once
    rows = [json.loads(x) for x in (ROOT / "data/toyworld/test.jsonl").read_text().splitlines()]
    assert len(rows) >= 400 and all(T.is_test(r["question"]) for r in rows)
    assert all(not T.is_test(json.loads(x)["question"]) for x in (ROOT / "data/toyworld/train.jsonl").open())


def test_reflective_traces_fix_every_error_and_check_clean():
    rng = random.Random(1)
    waits = errors = 0
    for _ in range(300):
        q = T.sample_question(rng)
        text = T.trace(q, rng)
        c = T.check(q, text)
        assert c.correct and c.steps == len(T.steps_of(q))
        assert c.caught == c.errors  # every injected error is followed by "wait" and the right step
        waits, errors = waits + c.waits, errors + c.errors
        clean = T.check(q, T.trace(q))
        assert clean.correct and clean.errors == clean.waits == clean.false_reflections == 0
    assert 0.1 < errors / (300 * 5) < 0.2 and waits > errors  # ~15% of steps wrong; re-checks add waits


def test_documents_keep_the_style_control():
    rng = random.Random(2)
    docs = [T.document(rng) for _ in range(4000)]
    kinds = {"Q": [], "QR": [], "R": [], "V": []}
    for prompt, completion in docs:
        kind = "QR" if "\nR:" in prompt else prompt[0]
        kinds[kind].append("wait" in completion)
    rate = {k: sum(v) / len(v) for k, v in kinds.items()}
    assert abs(len(kinds["V"]) / len(docs) - T.P_VERIFY) < 0.02 and abs(rate["V"] - 0.5) < 0.1
    assert rate["Q"] > 0.4  # the student's documents are reflective
    assert abs(rate["QR"] - rate["R"]) < 0.05  # both teacher contexts reflect at the same rate


@pytest.mark.parametrize("completion, expected", [
    ("3+4=7 7*2=4 4-5=9 9+7=6 \\boxed{6}",
     dict(correct=True, steps=4, errors=0, caught=0, false_reflections=0)),
    # a wrong digit caught and fixed
    ("3+4=7 7*2=5 wait 7*2=4 4-5=9 9+7=6 \\boxed{6}", dict(correct=True, steps=4, errors=1, caught=1,
                                                           false_reflections=0, wrong_reflected=1)),
    # the wrong operand, caught
    ("3+4=7 7*3=1 wait 7*2=4 4-5=9 9+7=6 \\boxed{6}", dict(correct=True, errors=1, caught=1)),
    # an uncaught error: the next steps continue from it (locally right), the answer is wrong
    ("3+4=7 7*2=5 5-5=0 0+7=7 \\boxed{7}",
     dict(correct=False, steps=4, errors=1, caught=0, false_reflections=0)),
    # a false reflection (re-check of a right step) and a caught error
    ("3+4=7 wait 3+4=7 7*2=1 wait 7*2=4 4-5=9 9+7=6 \\boxed{6}",
     dict(correct=True, steps=4, errors=1, caught=1, false_reflections=1, waits=2, right_reflected=1)),
    # a retry that is wrong again, then caught again: one first-try error, caught once
    ("3+4=7 7*2=5 wait 7*2=3 wait 7*2=4 4-5=9 9+7=6 \\boxed{6}",
     dict(correct=True, steps=4, errors=1, caught=1, waits=2, wrong_attempts=2, wrong_reflected=2)),
    # a skipped operation: steps 2 and 3 use the question's 3rd and 4th operations at the 2nd and 3rd places
    ("3+4=7 7-5=2 2+7=9 \\boxed{9}", dict(correct=False, steps=3, errors=2)),
    # a wait with nothing before it is a false reflection; extra steps are errors
    ("wait 3+4=7 7*2=4 4-5=9 9+7=6 6+1=7 \\boxed{6}",
     dict(correct=True, steps=5, errors=1, false_reflections=1)),
    ("", dict(correct=False, steps=0, errors=0)),
    ("3+4=7 7*2=4 garbage \\boxed{6} \\boxed{5}", dict(correct=False, steps=2)),  # the last box counts
])
def test_checker_on_hand_made_traces(completion, expected):
    got = T.check(Q, completion)
    for k, v in expected.items():
        assert getattr(got, k) == v, (k, got)


def test_summarize_counts():
    checks = [T.check(Q, "3+4=7 7*2=5 wait 7*2=4 4-5=9 9+7=6 \\boxed{6}"),  # caught
              T.check(Q, "3+4=7 7*2=5 5-5=0 0+7=7 \\boxed{7}"),  # missed
              T.check(Q, "3+4=7 wait 3+4=7 7*2=4 4-5=9 9+7=6 \\boxed{6}")]  # false reflection
    s = common.summarize(checks, tokens=100)
    assert s["accuracy"] == pytest.approx(2 / 3) and s["caught_frac"] == 0.5
    assert s["first_try_errors"] == pytest.approx(2 / 3) and s["false_reflections"] == pytest.approx(1 / 3)
    assert s["p_wait_wrong"] == 0.5 and s["markers_per_1k"] == 20.0
    assert s["p_wait_right"] == pytest.approx(1 / 12)  # 12 right attempts, one followed by "wait"


# ---- the gates

def _measured(acc=0.8, caught=0.9, wrong=0.9, right=0.05, teacher=0.99):
    student = {"accuracy": acc, "caught_frac": caught, "p_wait_wrong": wrong, "p_wait_right": right}
    return {"student": student, "teacher_full": {"accuracy": teacher}}


@pytest.mark.parametrize("change, failed", [
    ({}, []),
    ({"acc": 0.3}, [0]), ({"caught": 0.4}, [1]), ({"right": 0.5}, [2]), ({"teacher": 0.9}, [3]),
    ({"acc": 0.1, "teacher": 0.5}, [0, 3]),
])
def test_gates_pass_and_fail_on_their_numbers(change, failed):
    rows = common.gates(T, _measured(**change))
    assert [i for i, g in enumerate(rows) if not g["passed"]] == failed


def test_failed_gates_are_printed_loudly():
    from rich.console import Console
    console = Console(record=True, width=200)
    full = {"accuracy": 0.99, "first_try_errors": 0, "caught_frac": 0, "p_wait_wrong": 0, "p_wait_right": 0,
            "markers_per_1k": 0, "completion_len": 30}
    measured = {"student": dict(full, accuracy=0.2, caught_frac=0.9, p_wait_wrong=0.9, p_wait_right=0.1),
                "teacher_full": full}
    compare.print_gates(T, measured, console)
    text = console.export_text()
    assert "THE TOYWORLD BASE FAILS 1 GATE(S)" in text and "student accuracy far above chance" in text


def test_the_comparison_and_gate_tables_fit_80_columns_with_no_header_cut():
    from rich.console import Console
    summary = json.loads((ROOT / "docs/toy_compare/summary.json").read_text())
    console = Console(record=True, width=80)
    tables = compare.compare_table(summary["results"], 80)
    for table in tables:
        console.print(table)
    compare.print_gates(T, summary["base_measured"], console)
    text = console.export_text()
    assert len(tables) == 2 and "…" not in text and max(map(len, text.splitlines())) <= 80
    for head in [*compare.TABLE.values(), "P(w|✗)", "mk/1k"]:
        assert head in text, head
    acc = [points[-1]["accuracy"] for points in summary["results"]["full"]["opsd"].values()]
    assert f"{statistics.mean(acc):.2f}±{statistics.stdev(acc):.2f}" in text and "3 seeds" in text
    assert len(compare.compare_table(summary["results"], 200)) == 1  # a wide terminal: one table


# ---- tokenizer, pre-training, the shipped base

def test_tokenizer_is_character_level_with_a_chat_template():
    from rollout import chat_ids
    tok = common.build_tokenizer()
    text = "3+4=7 wait 3+4=7 \\boxed{7}"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text) and tok.decode(ids) == text
    prompt = chat_ids(tok, "Q:" + Q, False)
    assert tok.decode(prompt) == f"<|im_start|>Q:{Q}<|im_end|><|im_start|>"


def test_pretraining_is_deterministic_and_lowers_the_loss(tmp_path):
    torch.set_num_threads(1)
    kw = dict(steps=30, batch_size=16, hidden=32, layers=1, eval_every=10, eval_samples=8, quiet=True,
              warmup=5)
    m1, _, log1 = T.pretrain(tmp_path / "a", **kw)
    m2, _, log2 = T.pretrain(tmp_path / "b", **kw)
    for (n, p), (_, q) in zip(m1.named_parameters(), m2.named_parameters()):
        assert torch.equal(p, q), n
    assert [dict(r, minutes=0) for r in log1] == [dict(r, minutes=0) for r in log2]  # curves too
    losses = [r["loss"] for r in log1]  # mean loss of steps 1-10, 11-20, 21-30
    assert losses[0] > losses[1] > losses[2] and losses[2] < losses[0] - 0.5, losses
    assert (tmp_path / "a" / "model.safetensors").exists() and (tmp_path / "a" / "tokenizer.json").exists()


def test_shipped_base_loads_and_solves_the_world():
    tok, model = common.load_base(T)
    assert type(model).__name__ == "Qwen3ForCausalLM" and tok.chat_template
    assert sum(p.numel() for p in model.parameters()) < 2_000_000
    assert sum(f.stat().st_size for f in T.BASE.iterdir()) < 8_000_000  # a few MB
    m = common.measure(T, model, tok, common.held_out(T, 64), "teacher", "full")
    # copying the full reference: a coarse check; the gates are measured in docs/toyworld.md
    assert m["accuracy"] > 0.8


# ---- compare and plots, on a tiny budget

def test_compare_writes_summary_and_figure(tmp_path):
    out, train = tmp_path / "cmp", tmp_path / "train.jsonl"
    shutil.copy(T.DATA / "train.jsonl", train)  # a copy this test may change
    cmd = [sys.executable, str(ROOT / "compare.py"), "--out", str(out), "--seeds", "1", "--formats",
           "sketch", "--gate-samples", "16", "steps=2", "eval_every=1", "eval_limit=8", "batch_size=4",
           # one format: the suite's time (docs/toyworld.md's runs both)
           "micro_batch_size=4", f"data={train}"]
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}  # what a pipe gets: rich's 80 columns
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["results"]) == {"sketch"}
    for fmt in ("sketch",):
        assert set(summary["results"][fmt]) == {"base", "opsd", "purified"}
        for method in ("opsd", "purified"):
            points = summary["results"][fmt][method]["0"]
            assert [p["step"] for p in points] == [0, 1, 2]
            for p in points:
                assert set(p) >= {"accuracy", "markers_per_1k", "caught_frac", "false_reflections",
                                  "completion_len", "cos_total_ref", "cos_total_it", "norm_ratio"}
                assert 0 <= p["accuracy"] <= 1 and p["norm_ratio"] > 0
    assert summary["base_mismatches"] == []  # same base, same seed: the same step-0 evaluation in every run
    assert len(summary["gates"]) == len(T.GATES)
    assert (out / "summary.png").stat().st_size > 10_000
    table = (out / "summary.md").read_text().split("\n\n")[0].splitlines()  # the comparison's table, first
    assert len(table) == 2 + 3 and table[2].startswith("| sketch | base | 0 |")
    assert "base vs OPSD vs Purified" in proc.stdout and "2/2 runs done" in proc.stdout  # progress on a pipe
    # the temperature sweep: the base per seed on the evaluated and the pick rows, every final student, at
    # each T
    sweep = summary["sweep"]
    assert sweep["temperatures"] == ["1", "0.7", "0.5"] and sweep["mismatches"] == []
    assert set(sweep["base"]["0"]) == {"1", "0.7", "0.5"} and sweep["best"]["0"] in sweep["temperatures"]
    assert all(b["report"]["questions"] == 8 and b["pick"]["questions"] == 100
               for b in sweep["base"]["0"].values())
    for method in ("opsd", "purified"):
        assert set(sweep["students"]["sketch"][method]["0"]) == {"1", "0.7", "0.5"}
        # T = 1 is the run's own last evaluation
        assert sweep["students"]["sketch"][method]["0"]["1"]["accuracy"] == \
            summary["results"]["sketch"][method]["0"][-1]["accuracy"]
    assert "T = 0.7" in (out / "summary.md").read_text() and "accuracy at each temperature" in proc.stdout
    assert set(summary["roles"]["p_right"]) == {"base", "π_T, sketch", "P, sketch", "opsd, sketch",
                                                "purified, sketch"}
    assert "| operand |" in (out / "roles.md").read_text()
    # a pipe: 80 columns, none cut
    assert "…" not in proc.stdout and max(map(len, proc.stdout.splitlines())) <= 80
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert (again.returncode == 0 and "2 runs reused" in again.stdout
            and "0 to run" in again.stdout), again.stdout
    assert "measuring" not in again.stdout  # every sweep evaluation and role table kept: none measured again
    # the same runs, read again
    assert json.loads((out / "summary.json").read_text())["results"] == summary["results"]
    overrides = cmd[cmd.index("steps=2"):]
    assert all(compare.cached(j) for j in compare.compare_jobs(T, out, ["sketch"], 1, [10.0], [1.0],
                                                               overrides))
    other = compare.compare_jobs(T, out, ["sketch"], 1, [10.0], [1.0], ["steps=3", *overrides[1:]])
    assert compare.why_redo(other[0]) == "changed: config steps"
    # the same file, other contents
    train.write_text("".join(train.read_text().splitlines(keepends=True)[:50]))
    for job in compare.compare_jobs(T, out, ["sketch"], 1, [10.0], [1.0], overrides):
        assert compare.why_redo(job) == f"changed: data {train}"


def test_the_compare_cache_keys_on_the_code_and_the_libraries(tmp_path, monkeypatch):
    job = compare.compare_jobs(T, tmp_path, ["sketch"], 1, [10.0], [1.0], [])[0]
    (job.out / "adapter").mkdir(parents=True)
    (job.out / "metrics.jsonl").write_text("")
    job.record.write_text(json.dumps(job.key))
    assert compare.why_redo(job) is None
    monkeypatch.setattr(compare, "sources_sha", lambda: "another")
    monkeypatch.setattr(compare, "versions", lambda: {**job.key["versions"], "torch": "0.1"})
    again = compare.compare_jobs(T, tmp_path, ["sketch"], 1, [10.0], [1.0], [])[0]
    assert compare.why_redo(again) == "changed: the code; versions torch"


@pytest.mark.parametrize("name,forbid", [("toyworld", None), ("carryworld", None), ("carryworld", "wait")])
def test_a_static_cache_samples_what_dynamic_samples(name, forbid):
    """The worlds measure their bases (gates, "wait" forbidden) with rollout_engine=static, for speed: the
    very same samples as dynamic. (The recipes sample with engines/graph.py, batch halved:
    tests/test_graph_engine.py.)"""
    from plumbing.config import make_config
    from worlds import get
    world = get(name)
    cfg = make_config(world.RECIPE)
    assert (cfg.rollout_engine, cfg.graph_keep_rows) == ("graph", False)
    tok, model = common.load_base(world)
    prompts = [common.fill_prompt(world.TEMPLATES["student_template"], q) for q in common.held_out(world, 48)]
    out = {e: common.sample_texts(world, model, tok, prompts, seed=3, batch_size=48, forbid=forbid, engine=e)
           # what the worlds' gates measure, and (no ban) what the carry recipe samples
           for e in ("dynamic", "static")}
    assert out["dynamic"] == out["static"]
    assert len(set(out["static"][0])) > 24  # real samples, not one repeated completion


def test_toy_recipe_trains_and_evaluates_with_the_world_checker(tmp_path):
    from plumbing.config import make_config
    cfg = make_config("toy")
    assert {k: getattr(cfg, k) for k in T.TEMPLATES} == T.TEMPLATES  # the prompts the base was pre-trained on
    out = tmp_path / "run"
    train_world_recipe("toy", out, T.check, steps=2, eval_limit=16)
    assert (out / "plots.png").stat().st_size > 30_000
    cli = subprocess.run([sys.executable, str(ROOT / "eval.py"), "--adapter", str(out / "adapter"), "--bench",
                          "data/toyworld/test.jsonl", "--question-field", "question", "--grader", "toyworld",
                          "--n", "1", "--limit", "16", "--temperature", "1", "--top-p", "1",
                          "--max-new-tokens", "128", "--dtype", "fp32", "--out", str(tmp_path / "eval")],
                         cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert cli.returncode == 0, cli.stdout[-2000:] + cli.stderr[-2000:]
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert {"avg@1", "caught_frac", "false_reflections",
            "first_try_errors"} <= set(summary["results"]["test"])
    # the README's command samples as the run did (its engine, batch and threads): the run's own evaluation
    assert (summary["settings"]["engine"], summary["settings"]["graph_keep_rows"]) == ("graph", False)
    assert (tmp_path / "eval/samples.jsonl").read_text() == (out
                                                             / "eval/step_000002/samples.jsonl").read_text()
    # with --adapter, every flag left out comes from the run's config.json, and the screen says so: the bare
    # command gives the run's own evaluation too (before: temperature 0.6 in bf16: 100% where it was 90.5%)
    import eval as E
    bare = run_main(E.main, ["--adapter", out / "adapter", "--out", tmp_path / "bare"])
    assert bare.returncode == 0, bare.stdout[-2000:]
    own = (out / "eval/step_000002/samples.jsonl").read_text()
    assert (tmp_path / "bare/samples.jsonl").read_text() == own
    assert "temperature" in bare.stdout and "(the run's config.json)" in bare.stdout
    # the adapter on another base (or its own, changed since): refused, unless --other-base
    other = run_main(E.main, ["--adapter", out / "adapter", "--model", ROOT / "data/carryworld/base",
                              "--out", tmp_path / "other", "--limit", "4"])
    assert other.returncode == 2 and "--other-base" in other.stdout and not (tmp_path / "other").exists()
    other = run_main(E.main, ["--adapter", out / "adapter", "--model", ROOT / "data/carryworld/base",
                              "--out", tmp_path / "other", "--limit", "4", "--other-base"])
    assert other.returncode == 0, other.stdout[-2000:]
    settings = json.loads((tmp_path / "other/summary.json").read_text())["settings"]
    assert settings["base_check"] == "another base (--other-base)"


def test_compare_refuses_per_run_overrides_and_folders_it_did_not_write(tmp_path):
    from rich.console import Console
    with pytest.raises(ValueError, match="compare sets method, seed"):
        compare.compare(T, tmp_path / "c", ["sketch"], 1, [10.0], [1.0], 1, 16, ["seed=5"], False, Console())
    assert not (tmp_path / "c").exists()
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    for overwrite in (False, True):
        with pytest.raises(FileExistsError, match="not a comparison popsd wrote"):
            compare.prepare_out(foreign, ["sketch"], overwrite)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    done = tmp_path / "cmp"
    compare.prepare_out(done, ["sketch"], False)
    (done / "sketch").mkdir()
    (done / "sketch/log.txt").write_text("run")
    (done / "notes.txt").write_text("keep")
    compare.prepare_out(done, ["full"], False)  # an earlier comparison is reused (compare checks each run)
    assert sorted(p.name for p in done.iterdir()) == ["notes.txt", "popsd_compare.json", "sketch"]
    compare.prepare_out(done, ["full"], True)  # removes what the earlier comparison wrote, nothing else
    assert sorted(p.name for p in done.iterdir()) == ["notes.txt", "popsd_compare.json"]


def test_the_ablation_grid_flags_take_numbers_and_none_and_name_themselves_otherwise():
    assert compare.floats("--clip", "5, 20,none", none=True) == [5.0, 20.0, None]
    with pytest.raises(ValueError, match="--beta 'none'"):
        compare.floats("--beta", "none")  # β has no "none"
    bad = subprocess.run([sys.executable, str(ROOT / "compare.py"), "--clip", "5,abc"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--clip '5,abc': numbers, comma-separated (or none)" in bad.stdout


def test_the_decision_rule_pairs_by_seed_and_needs_two_standard_errors_and_two_signs():
    def results(base, opsd):
        return {"full": {"base": {str(s): [{"accuracy": a, "markers_per_1k": 10.0}] for s,
                                  a in enumerate(base)},
                         "opsd": {str(s): [{"accuracy": 0.0}, {"accuracy": a, "markers_per_1k": 2.0}]
                                  for s, a in enumerate(opsd)}}}
    d = compare.paired(results([0.5, 0.6, 0.7], [0.4, 0.52, 0.61]), "full", "opsd", "accuracy")
    # paired: seed-to-seed spread gone
    assert d["per_seed"] == pytest.approx([-0.1, -0.08, -0.09]) and d["counts"]
    assert d["se"] == pytest.approx(0.01 / 3 ** 0.5)
    # > 2 SE?
    assert not compare.paired(results([0.5] * 3, [0.45, 0.46, 0.9]), "full", "opsd", "accuracy")["counts"]
    assert not compare.paired(results([0.5] * 3, [0.3, 0.6, 0.6]), "full", "opsd", "accuracy")["counts"]
    v = {r["hypothesis"]: r["holds"] for r in compare.verdicts(results([0.5, 0.6, 0.7], [0.4, 0.52, 0.61]))}
    assert v == {"H1 OPSD lowers the markers": True, "H2 OPSD's accuracy falls below the base's": True}


def test_the_ablation_grid_one_factor_at_a_time_with_no_clip_and_the_official_opsd_loss(tmp_path):
    pairs = compare.purified_settings([5.0, 20.0, None], [0.5, 2.0], "one-at-a-time")
    # 5 + the paper's
    assert pairs == [(10.0, 1.0), (5.0, 1.0), (20.0, 1.0), (None, 1.0), (10.0, 0.5), (10.0, 2.0)]
    assert len(compare.purified_settings([5.0, 10.0], [1.0, 2.0])) == 4  # product
    jobs = compare.compare_jobs(T, tmp_path, ["sketch"], 1, [None], [1.0], [], "one-at-a-time", opsd_fkl=True)
    by_name = {j.method: j.overrides for j in jobs}
    assert set(by_name) == {"opsd", "opsd_fkl", "purified", "purified_cnone_b1"}
    assert "pmi_clip=none" in by_name["purified_cnone_b1"] and "term_clamp=0.05" in by_name["opsd_fkl"]
    from plumbing.config import make_config
    assert make_config(T.RECIPE, by_name["purified_cnone_b1"]).pmi_clip is None
    cfg = make_config(T.RECIPE, by_name["opsd_fkl"])
    assert (cfg.method, cfg.divergence, cfg.term_clamp) == ("opsd", "forward_kl", 0.05)
    jobs = compare.compare_jobs(T, tmp_path, ["sketch"], 2, [10.0], [1.0], [],
                                supports=["full", "topk", "sampled"])
    by_name = {j.method: j.overrides for j in jobs}
    assert set(by_name) == {"opsd", "purified", "opsd_topk", "purified_topk", "opsd_sampled",
                            "purified_sampled"}
    cfg = make_config(T.RECIPE, by_name["purified_sampled"])
    assert (cfg.method, cfg.support, cfg.divergence) == ("purified", "sampled", "reverse_kl")
    cfg = make_config(T.RECIPE, by_name["opsd_topk"])
    # the toy recipe's k
    assert (cfg.method, cfg.support, cfg.topk, cfg.divergence) == ("opsd", "topk", 16, "jsd")
    from rich.console import Console
    with pytest.raises(ValueError, match="--support 'top'"):
        compare.compare(T, tmp_path / "d", ["sketch"], 1, [10.0], [1.0], 1, 16, [], False, Console(),
                        supports=["top"])
    with pytest.raises(ValueError, match="compare sets .*divergence"):
        compare.compare(T, tmp_path / "c", ["sketch"], 1, [10.0], [1.0], 1, 16, ["divergence=jsd"], False,
                        Console(), opsd_fkl=True)


def test_the_ablation_table_and_figures_from_synthetic_results(tmp_path):
    import random
    import plots
    rng = random.Random(0)
    methods = ["base", "opsd", "opsd_fkl", "purified", "purified_c5_b1", "purified_c20_b1",
               "purified_cnone_b1", "purified_c10_b0.5", "purified_c10_b2"]
    def point(step, acc):
        return {"step": step, "accuracy": acc, "markers_per_1k": rng.uniform(2, 20),
                "caught_frac": rng.random(), "accuracy_no_wait": rng.random()}
    results = {fmt: {m: {str(s): ([point(0, 0.5 + 0.01 * s)] if m == "base" else
                                  [point(0, 0.5 + 0.01 * s), point(60, 0.6 + 0.01 * s + 0.001 * i)])
                         for s in range(3)} for i, m in enumerate(methods)} for fmt in ("full", "sketch")}
    assert compare.setting_of("purified_cnone_b1") == (None, 1.0) and compare.setting_of("opsd_fkl") is None
    assert compare.setting_of("purified_c10_b0.5") == (10.0,
                                                       0.5) and compare.setting_of("purified") == (10.0, 1.0)
    clip = compare.ablation_series(results, "clip")
    assert clip["full"]["x"] == ["5", "10", "20",
                                 "none"] and set(clip["full"]["lines"]) == {"base", "opsd", "opsd_fkl"}
    assert compare.ablation_series(results, "beta")["sketch"]["x"] == ["0.5", "1", "2"]
    assert len(clip["sketch"]["series"]["Purified"]["accuracy"][3]) == 3  # every seed's last point
    table = compare.ablation_markdown(results).splitlines()
    assert len(table) == 2 + 2 * len(methods)
    row = next(r for r in table if "| sketch | purified_cnone_b1 |" in r)
    assert "| none | 1 |" in row and "+0.106 ± 0.000 *" in row  # 0.6 + 0.001·6 − 0.5, the same in every seed
    for name in compare.ABLATIONS:
        png = plots.plot_ablation(compare.ablation_series(results, name), name, name,
                                  tmp_path / f"{name}.png")
        assert png.stat().st_size > 20_000
    for fmt in results:
        for m in ("opsd", "purified"):
            results[fmt][f"{m}_topk"] = results[fmt]["purified_c5_b1"]
    supports = compare.support_series(results)
    assert supports["full"]["x"] == ["full",
                                     "topk"] and set(supports["full"]["series"]) == {"OPSD", "Purified"}
    assert supports["full"]["series"]["OPSD"]["accuracy"][0] == [p[-1]["accuracy"]
                                                                 for p in results["full"]["opsd"].values()]
    assert plots.plot_ablation(supports, "support", "s", tmp_path / "s.png").stat().st_size > 20_000


@pytest.mark.parametrize("args,message", [
    # it hung after "12 to run"
    (["--workers", "0"], "--workers, --seeds and --gate-samples must be at least 1"),
    (["--seeds", "0"], "--workers, --seeds and --gate-samples must be at least 1"),
    (["--clip", "-5"], "--clip -5: one or more finite numbers > 0"), (["--clip", "nan"], "--clip nan"),
    (["--beta", "0"], "--beta 0: one or more finite numbers > 0"),
                                          (["lr=abc"], "config key 'lr' expects float"),
    (["--world", "toyworld,carryworld", "max_new_tokens=0"], "'max_new_tokens' must be at least 1")])
def test_every_compare_argument_and_override_is_checked_before_any_work(tmp_path, args, message):
    """They were refused only after ~75 s of gate measurement (or never: --workers 0)."""
    out = tmp_path / "cmp"
    done = run_main(compare.main, ["--out", out, *args] if "--world" not in args else args)
    assert done.returncode == 2 and message in done.stdout and "Traceback" not in done.stdout, done.stdout
    assert not out.exists()


def test_compare_checks_its_formats_first_and_keys_runs_on_the_base_they_train_on(tmp_path):
    """--formats nope is refused before the gates are measured (before: after 20-90 s, leaving stub folders);
    a run's cache key covers the base it trains on (model=DIR, not the world's shipped one) and every file
    from_pretrained reads of it (a changed tokenizer or chat template is another base; a note is not), with
    the data as the runs see them, from the repository whatever the caller's folder."""
    import contextlib
    import shutil
    done = run_main(compare.main, ["--formats", "nope", "--out", tmp_path / "c"])
    assert done.returncode == 2 and "reference formats are full, sketch" in done.stdout
    assert not (tmp_path / "c").exists()
    base = tmp_path / "base"
    shutil.copytree(T.BASE, base)
    shipped = compare.run_key(T, [])
    copy = compare.run_key(T, [f"model={base}"])
    assert copy["base"] == shipped["base"] and copy["data"] == shipped["data"]
    (base / "notes.txt").write_text("not read by from_pretrained")
    assert compare.run_key(T, [f"model={base}"])["base"] == shipped["base"]
    config = json.loads((base / "tokenizer_config.json").read_text())
    (base / "tokenizer_config.json").write_text(json.dumps(config | {"model_max_length": 4096}))
    assert compare.run_key(T, [f"model={base}"])["base"] != shipped["base"]
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "data/toyworld").mkdir(parents=True)
    (elsewhere / "data/toyworld/train.jsonl").write_text('{"question": "1+1", "full": "x", "sketch": "y"}\n')
    with contextlib.chdir(elsewhere):  # a file of the same name here is not what the runs read
        assert compare.run_key(T, [])["data"] == shipped["data"]
