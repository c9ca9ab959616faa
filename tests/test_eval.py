"""eval.py: the grader on real-world answer pairs, pass@k against brute force, metrics, the CLI end to end."""
import itertools
import json
import shutil
import threading
import time

import pytest
import torch

import eval as E
from plumbing import grading as G
from conftest import ROOT, run_main

FIVE = ROOT / "tests/data/five_questions.jsonl"

# (completion, gold, verdict): what a careful human grader says
PAIRS = [
    # fractions and decimals
    ("So the probability is \\boxed{\\frac{1}{2}}.", "0.5", True),
    ("The answer is $\\boxed{0.5}$", "\\frac{1}{2}", True),
    ("\\boxed{\\dfrac{3}{4}}", "\\frac{3}{4}", True),
    ("\\boxed{\\tfrac{3}{4}}", "3/4", True),
    ("\\boxed{\\frac34}", "0.75", True),
    ("\\boxed{0.33}", "\\frac{1}{3}", False),
    ("\\boxed{\\frac{2}{3}}", "\\frac{1}{3}", False),
    ("\\boxed{-\\frac{1}{2}}", "-0.5", True),
    ("\\boxed{2.0}", "2", True),
    # integers: commas, leading zeros, signs
    ("The total is \\boxed{1,000}.", "1000", True),
    ("\\boxed{1000}", "1,000", True),
    ("\\boxed{1{,}234{,}567}", "1234567", True),
    ("\\boxed{033}", "33", True),
    ("\\boxed{-3}", "-3", True),
    ("\\boxed{3}", "-3", False),
    ("\\boxed{-7}", "7", False),
    ("\\boxed{204}", "204", True),
    ("\\boxed{205}", "204", False),
    # intervals and sets
    ("\\boxed{[1, 2)}", "[1,2)", True),
    ("\\boxed{(1,2]}", "[1,2]", False),
    ("\\boxed{(-\\infty, 2]}", "(-\\infty,2]", True),
    ("The solution set is \\boxed{x \\le 2}.", "(-\\infty, 2]", True),
    ("\\boxed{\\{2, 1\\}}", "\\{1,2\\}", True),
    ("\\boxed{3, 2}", "2, 3", True),
    ("\\boxed{2, 4}", "2, 3", False),
    ("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "(3,\\frac{\\pi}{2})", True),
    # degrees, units, percent, money
    ("Each angle is \\boxed{120^\\circ}.", "120", True),
    ("\\boxed{720}", "720^\\circ", True),
    ("\\boxed{5\\text{ cm}}", "5", True),
    ("\\boxed{9\\,\\text{m}^2}", "9", True),
    ("\\boxed{\\$12}", "12", True),
    ("\\boxed{18\\%}", "18\\%", True),
    # radicals, pi, expressions
    ("\\boxed{2\\sqrt{3}}", "\\sqrt{12}", True),
    ("\\boxed{\\frac{\\sqrt{2}}{2}}", "\\sqrt2/2", True),
    ("\\boxed{\\sqrt{3}}", "2\\sqrt{3}", False),
    ("\\boxed{\\frac{\\pi}{2}}", "\\pi/2", True),
    ("\\boxed{3.14}", "\\pi", False),
    ("\\boxed{x = 5}", "5", True),
    ("\\boxed{2x+1}", "1+2x", True),
    # LaTeX spacing and \boxed forms
    ("\\boxed{1\\,000}", "1000", True),
    ("\\boxed{10\\ 000}", "10{,}000", True),
    ("\\boxed{ 12 }", "12", True),
    ("\\boxed {42}", "42", True),
    ("\\fbox{42}", "42", True),
    ("Thus the answer is \\boxed 7.", "7", True),
    ("\\boxed{\\frac{\\sqrt{\\frac{1}{4}}}{1}}", "\\frac{1}{2}", True),
    ("\\boxed{\\text{(C)}}", "C", True),
    # several boxes: the last one counts
    ("First \\boxed{3}, but I made an error. The answer is \\boxed{5}.", "5", True),
    ("First \\boxed{5}, but I made an error. The answer is \\boxed{3}.", "5", False),
    ("\\boxed{7} ... final: \\boxed{7", "7", True),  # truncated last box: the last complete one
    # no box
    ("So the answer is 42.", "42", True),
    ("Therefore, the final answer is $\\frac{3}{4}$.", "0.75", True),
    ("we get 186 186 and then 69", "69", False),  # a stray last number is not an answer
    ("I could not solve it.", "3", False),
    ("\\boxed{}", "0", False),
]


@pytest.mark.parametrize("completion,gold,verdict", PAIRS)
def test_grader_real_world_pairs(completion, gold, verdict):
    assert G.is_correct(completion, gold) is verdict


def test_grader_has_forty_pairs():
    assert len(PAIRS) >= 40 and sum(v for *_, v in PAIRS) >= 20 and sum(not v for *_, v in PAIRS) >= 10


@pytest.mark.parametrize("text,boxed", [
    ("\\boxed{\\frac{a}{b}}", "\\frac{a}{b}"),
    ("x \\boxed{1} y \\boxed{\\{1, 2\\}} z", "\\{1, 2\\}"),
    ("\\boxed {  3 }", "3"),
    ("\\fbox{\\sqrt{2}}", "\\sqrt{2}"),
    ("\\boxed 5$", "5"),
    ("so \\boxed -3.5.", "-3.5"),
    ("\\boxed \\pi", "\\pi"),
    ("\\boxed{a} and \\boxed{b", "a"),
    ("\\boxed{{{}}}", "{{}}"),
    ("\\boxedx{3}", None),
    ("no box here", None),
    ("", None),
    ("\\boxed{", None),
])
def test_extract_boxed(text, boxed):
    assert G.extract_boxed(text) == boxed


@pytest.mark.parametrize("completion", ["\\boxed{\\frac{", "}}}{{{\\boxed{)(]", "\\boxed{\\sqrt[}", "$$$$",
                                        "\\boxed{" * 500, "\x00\ufffd\\boxed{\x01}", "1/0 = \\boxed{1/0}"])
def test_grader_never_raises_on_malformed_text(completion):
    assert G.is_correct(completion, "3") is False
    assert G.is_correct(None, "3") is False  # not even on a wrong type


def test_grader_bounds_time_on_pathological_expressions():
    t0 = time.time()
    assert G.is_correct("\\boxed{9^{9^{9^{9}}}!}", "5", timeout=1) is False  # sympy would run for ever
    assert time.time() - t0 < 20


def test_grader_off_the_main_thread_uses_a_helper_process():
    results = {}

    def work():
        results["right"] = G.is_correct("\\boxed{\\frac12}", "0.5")
        results["wrong"] = G.is_correct("\\boxed{3}", "0.5")
    t = threading.Thread(target=work)
    t.start()
    t.join(120)
    assert results == {"right": True, "wrong": False}


def brute_pass_at_k(n, c, k):
    """Fraction of all k-subsets of n samples (c correct) with at least one correct."""
    subsets = list(itertools.combinations([True] * c + [False] * (n - c), k))
    return sum(any(s) for s in subsets) / len(subsets)


def test_pass_at_k_matches_brute_force_over_all_subsets():
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert G.pass_at_k(n, c, k) == pytest.approx(brute_pass_at_k(n, c, k), abs=1e-12), (n, c, k)
    assert G.pass_at_k(100, 3, 1) == pytest.approx(0.03)
    for bad in [(4, 5, 1), (4, -1, 1), (4, 2, 0), (4, 2, 5)]:
        with pytest.raises(ValueError):
            G.pass_at_k(*bad)


def test_bench_metrics():
    m = E.bench_metrics([[True, False, False, True], [False] * 4], lengths=[10, 20, 30, 40, 50, 60, 70, 80],
                        truncated=[False] * 7 + [True], markers=9)
    assert m["avg@4"] == 0.25 and m["pass@1"] == 0.25 and m["pass@4"] == 0.5
    assert (m["len_mean"], m["len_median"], m["truncated"]) == (45, 45, 0.125)
    assert m["markers_per_1k"] == pytest.approx(1000 * 9 / 360)
    assert set(E.bench_metrics([[True]], [5], [False], 0)) >= {"avg@1", "pass@1"}


def test_evaluate_grades_what_was_generated(tiny):
    """Generation rigged to return known texts: verdicts, extracted answers and metrics follow them."""
    from rollout import Rollout
    tok, model = tiny
    texts = {0: ["\\boxed{720}", "\\boxed{360}"], 1: ["\\boxed{0.75}", "no answer"],
             2: ["\\boxed{3, 2}", "\\boxed{2}"], 3: ["\\boxed{x \\le 2}", "\\boxed{x<2}"],
             4: ["\\boxed{\\sqrt{12}}", "\\boxed{2\\sqrt3}"]}
    seen = {}

    class Rigged:  # a sampler (engines/' interface) that returns known texts
        def generate(self, prompts, *, n, on_batch, seeds, **kw):
            seen["prompts"], seen["seeds"] = prompts, seeds
            flat = [t for i in range(len(prompts)) for t in texts[i]]
            on_batch(len(flat))
            return Rollout(torch.zeros(len(flat), 3, dtype=torch.long),
                           torch.ones(len(flat), 3, dtype=torch.bool),
                           torch.zeros(len(flat), dtype=torch.bool), flat)
    name, rows = E.load_bench(str(FIVE))
    metrics, records = E.evaluate(model, tok, {name: rows}, n=2, max_new_tokens=3, temperature=1.0, top_p=1.0,
                                  top_k=0, eos_ids=[tok.eos_token_id], batch_size=4, device="cpu",
                                  thinking=False, sampler=Rigged())
    assert len(set(seen["seeds"])) == 5  # engines get a seed per question
    verdicts = [[s["correct"] for s in r["samples"]] for r in records[name]]
    assert verdicts == [[True, False], [True, False], [True, False], [True, False], [True, True]]
    assert (records[name][2]["samples"][0]["extracted"] == "3, 2"
            and records[name][1]["samples"][1]["extracted"] is None)
    assert (metrics[name]["avg@2"] == 0.6 and metrics[name]["pass@2"] == 1.0 and metrics[name]["questions"]
            == 5)
    prompt = tok.decode(seen["prompts"][1])  # student template, chat template, thinking off
    assert "Simplify $\\frac{6}{8}$." in prompt and "\\boxed{}" in prompt and "<think>\n\n</think>" in prompt


@pytest.mark.parametrize("completion, gold, thinking, correct, closed", [
    ("<think>so maybe \\boxed{3}</think>\n\nThe answer is \\boxed{4}.", "4", True, True, True),
    # mid-thought box
    ("<think>so maybe \\boxed{3}</think>\n\nThe answer is \\boxed{4}.", "3", True, False, True),
    ("<think>first \\boxed{3}, then wait", "3", True, False, False),  # cut inside the reasoning: wrong
    ("reasoning without an opening tag (R1 style) \\boxed{2}</think> \\boxed{5}", "5", True, True, True),
    ("\\boxed{3}", "3", False, True, None),  # thinking off: the whole completion
    ("a</think> \\boxed{7}", "7", False, True, None),
])
def test_thinking_completions_are_graded_after_the_reasoning_block(completion, gold, thinking, correct,
                                                                   closed):
    samples = [{"completion": completion}]
    G.grade(samples, "q", gold, thinking=thinking)
    assert samples[0]["correct"] is correct and samples[0].get("reasoning_closed") is closed
    recs = [{"samples": [dict(samples[0], tokens=10, truncated=not closed)]}]
    m = E.records_metrics(recs)
    assert ("unclosed_reasoning" in m) is thinking and m.get("unclosed_reasoning",
                                                             0) == (thinking and not closed)


def test_cli_thinking_defaults_on_and_says_so(tiny_dir, tmp_path):
    out = eval_cli("--model", str(tiny_dir), "--bench", str(FIVE), "--n", "2", "--max-new-tokens", "8",
                   "--dtype", "fp32", "--limit", "2", "--out", str(tmp_path))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "thinking mode: on" in out.stdout and "--thinking off" in out.stdout
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["settings"]["thinking"] is True
    flat = [s for line in (tmp_path / "samples.jsonl").read_text().splitlines()
            for s in json.loads(line)["samples"]]
    for s in flat:
        assert s["reasoning_closed"] == ("</think>" in s["completion"])
        assert s["correct"] is False or s["reasoning_closed"]
    assert summary["results"]["five_questions"]["unclosed_reasoning"] == sum(
        not s["reasoning_closed"] for s in flat) / 4


def test_load_bench_errors(tmp_path):
    with pytest.raises(E.PopsdError, match="unknown benchmark 'aime2024'.*aime24"):
        E.load_bench("aime2024")
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"problem": "1+1?", "answer": "2"}\n{"problem": "2+2?"}\n')
    with pytest.raises(E.PopsdError, match="line 2: field 'answer' is missing"):
        E.load_bench(str(bad))
    with pytest.raises(E.PopsdError, match="field 'question'"):
        E.load_bench(str(FIVE), question_field="question")
    assert len(E.load_bench(str(FIVE), limit=2)[1]) == 2


def eval_cli(*args):
    # in this process: eval.py's own process is tested in test_safety, test_toyworld
    return run_main(E.main, args)


def test_cli_end_to_end_on_the_tiny_model(tiny_dir, tmp_path):
    common = ["--model", str(tiny_dir), "--bench", str(FIVE), "--n", "3", "--max-new-tokens", "12",
              "--dtype", "fp32", "--device", "cpu", "--temperature", "1.0", "--thinking", "off"]
    out = eval_cli(*common, "--out", str(tmp_path / "a"))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "avg@3" in out.stdout and "five_questions" in out.stdout
    assert "eval five_questions: 15/15 samples" in out.stdout  # not a terminal: progress as lines
    summary = json.loads((tmp_path / "a/summary.json").read_text())
    m = summary["results"]["five_questions"]
    assert summary["settings"]["n"] == 3 and m["questions"] == 5 and m["samples"] == 15
    recs = [json.loads(line) for line in (tmp_path / "a/samples.jsonl").read_text().splitlines()]
    assert [r["gold"] for r in recs] == ["720", "\\frac{3}{4}", "2, 3", "(-\\infty, 2]", "2\\sqrt{3}"]
    flat = [s for r in recs for s in r["samples"]]
    assert len(flat) == 15 and all(1 <= s["tokens"] <= 12 for s in flat)
    for r in recs:  # every stored verdict is the grader's verdict on the stored completion
        for s in r["samples"]:
            assert s["correct"] == G.is_correct(s["completion"], r["gold"])
            assert s["extracted"] == G.extract_boxed(s["completion"])
    assert m["avg@3"] == sum(s["correct"] for s in flat) / 15
    assert m["truncated"] == sum(s["truncated"] for s in flat) / 15
    assert m["len_mean"] == pytest.approx(sum(s["tokens"] for s in flat) / 15)
    again = eval_cli(*common, "--out", str(tmp_path / "b"))  # same seed: same completions
    assert again.returncode == 0
    assert (tmp_path / "b/samples.jsonl").read_text() == (tmp_path / "a/samples.jsonl").read_text()
    before = (tmp_path / "a/summary.json").read_text()
    same = eval_cli(*common, "--out", str(tmp_path / "a"))  # done already: read back, not redone
    assert (same.returncode == 0 and "already evaluated with these settings" in same.stdout
            and "avg@3" in same.stdout)
    # never replaced by another evaluation
    other = eval_cli(*common, "--limit", "2", "--out", str(tmp_path / "a"))
    assert other.returncode == 2 and "other settings" in other.stdout
    assert (tmp_path / "a/summary.json").read_text() == before


def test_cli_errors_are_clear(tiny_dir, tmp_path):
    out = eval_cli("--model", str(tiny_dir), "--bench", "aime24", "--out", str(tmp_path))
    assert out.returncode == 2 and "could not load dataset 'HuggingFaceH4/aime_2024'" in out.stdout
    out = eval_cli("--model", str(tiny_dir), "--bench", str(FIVE), "--answer-field", "solution")
    assert out.returncode == 2 and "field 'solution' is missing" in out.stdout
    out = eval_cli("--model", "no-such-org/no-such-model", "--bench", str(FIVE))
    assert out.returncode == 2 and "could not load model 'no-such-org/no-such-model'" in out.stdout
    out = eval_cli("--bench", str(FIVE))
    assert out.returncode == 2 and "--model is required" in out.stdout


def test_generation_batch_fits_the_kv_cache_in_the_budget():
    from transformers import AutoModelForCausalLM, Qwen3Config
    from plumbing.models import generation_batch, kv_bytes_per_token
    fields = json.loads((ROOT / "bench/configs/qwen3_8b.json").read_text())
    config = Qwen3Config(**{k: v for k, v in fields.items() if not k.startswith("_")})
    assert kv_bytes_per_token(config, 2) == 2 * 36 * 8 * 128 * 2  # 144 KiB per token in bf16
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    batch, why = generation_batch(model, 300 + 32768, budget_bytes=(22 - 5.5) * 0.9 * 2 ** 30)  # nf4 on 24 GB
    assert batch == 3 and "4.5" in why  # 4.5 GiB per 33k-token sequence: 64 would need ~290 GB
    assert generation_batch(model, 1024, budget_bytes=2 ** 40)[0] == 256  # capped
    assert generation_batch(model, 10 ** 7, budget_bytes=2 ** 30)[0] == 1  # never 0


def test_cli_evaluates_every_checkpoint_resumes_and_names_the_best(tmp_path):
    import popsd
    from plumbing.config import make_config
    run = tmp_path / "run"
    popsd.train(make_config("tiny", [f"out_dir={run}", "steps=3", "save_every=1", "eval_every=0"]))
    common = ["--bench", str(FIVE), "--n", "2", "--max-new-tokens", "8", "--dtype", "fp32", "--limit", "3",
              "--temperature", "1.0", "--out", str(tmp_path / "sweep")]
    out = eval_cli("--adapter", str(run / "checkpoints"), *common)
    assert out.returncode == 0, out.stdout + out.stderr
    settings = json.loads((tmp_path / "sweep/step_000001/summary.json").read_text())["settings"]
    # as the run sampled: its batch
    assert (settings["engine"], settings["generation_batch"]) == ("dynamic", 8)
    sweep = json.loads((tmp_path / "sweep/sweep.json").read_text())
    assert sorted(sweep["steps"], key=int) == ["1", "2", "3"] and sweep["metric"] == "avg@2"
    assert (sweep["best_mean"] == max(sweep["mean"].values())
            and f"best step {sweep['best_step']}" in out.stdout)
    assert (tmp_path / "sweep/sweep.png").stat().st_size > 10_000
    one = eval_cli("--adapter", str(run / "checkpoints/step_000002"), *common[:-1], str(tmp_path / "one"))
    assert one.returncode == 0  # a checkpoint in the sweep gives what eval.py gives for it alone
    assert (tmp_path / "one/samples.jsonl").read_text() == (tmp_path
                                                            / "sweep/step_000002/samples.jsonl").read_text()
    before = (tmp_path / "sweep/step_000003/samples.jsonl").read_text()
    for f in (tmp_path / "sweep/step_000003").iterdir():  # as if interrupted during the last checkpoint
        f.unlink()
    again = eval_cli("--adapter", str(run / "checkpoints"), *common)
    assert again.returncode == 0 and again.stdout.count("already evaluated") == 2
    assert (tmp_path / "sweep/step_000003/samples.jsonl").read_text() == before
    assert json.loads((tmp_path / "sweep/sweep.json").read_text()) == sweep
    other = eval_cli("--adapter", str(run / "checkpoints"), *common, "--n", "3")  # other settings, same --out
    assert other.returncode == 2 and "holds an evaluation with other settings" in other.stdout
    derived = tmp_path / "runs/eval/checkpoints_step_000003_five_questions"  # no --out: a folder of its own
    plain = run_main(E.main, ["--adapter", run / "checkpoints/step_000003", *common[:-2]], cwd=tmp_path)
    assert plain.returncode == 0 and (derived / "summary.json").exists(), plain.stdout


def test_a_sweep_takes_complete_checkpoints_in_step_order_and_keys_results_on_the_adapter(tmp_path):
    import popsd
    from plumbing.config import make_config
    run = tmp_path / "run"
    popsd.train(make_config("tiny", [f"out_dir={run}", "steps=2", "save_every=1", "eval_every=0"]))
    ckpts = run / "checkpoints"
    shutil.copytree(ckpts / "step_000002", ckpts / "step_000010")  # 10 after 2 (text order puts it first)
    shutil.copytree(ckpts / "step_000001", ckpts / "step_000003.tmp")  # an unfinished save
    (ckpts / "step_abc").mkdir()
    (ckpts / "step_ 1;rm -rf x").mkdir()
    common = ["--bench", str(FIVE), "--n", "1", "--max-new-tokens", "4", "--dtype", "fp32", "--limit", "2",
              "--out", str(tmp_path / "sweep")]
    out = eval_cli("--adapter", ckpts, *common)
    assert out.returncode == 0, out.stdout
    assert ("left out of the sweep" in out.stdout and "'step_abc'" in out.stdout
            and "step_000003.tmp" in out.stdout)
    assert list(json.loads((tmp_path / "sweep/sweep.json").read_text())["steps"]) == ["1", "2", "10"]
    popsd.train(make_config("tiny", [f"out_dir={run}", "steps=2", "save_every=1", "eval_every=0",
                                           "lr=5e-3",
                                           # retrained: other adapters under the same names
                                           "overwrite=true"]))
    again = eval_cli("--adapter", ckpts, *common)
    # not the old scores read back as its own
    assert again.returncode == 2 and "another adapter" in again.stdout


def test_merge_writes_one_model_that_computes_what_base_plus_adapter_does(tmp_path):
    import popsd
    from plumbing.config import make_config
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    run = popsd.train(make_config("tiny", [f"out_dir={tmp_path / 'run'}", "steps=2", "eval_every=0",
                                                 "lr=0.05"]))  # a large step: the adapter is far from zero
    out = eval_cli("merge", "--adapter", str(run / "adapter"), "--out", str(tmp_path / "merged"), "--dtype",
                   "fp32")
    assert out.returncode == 0, out.stdout + out.stderr
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    base = AutoModelForCausalLM.from_pretrained(run / "tiny_model")
    ids = torch.randint(0, 300, (2, 12))
    with torch.no_grad():
        plain = base(input_ids=ids).logits
        with_lora = PeftModel.from_pretrained(base, run / "adapter")(input_ids=ids).logits
        got = merged(input_ids=ids).logits
    assert (with_lora - plain).abs().max() > 1e-3  # the adapter matters
    torch.testing.assert_close(got, with_lora, atol=1e-4, rtol=1e-4)
    assert (tmp_path / "merged/tokenizer_config.json").exists()
    bad = eval_cli("merge", "--adapter", str(tmp_path), "--out", str(tmp_path / "x"))
    assert bad.returncode == 2 and "no adapter_config.json" in bad.stdout


def test_a_partial_server_evaluation_is_regraded_and_a_torn_line_dropped(tmp_path):
    from plumbing import remote
    benches = {"b": [("1+1?", "2"), ("2+2?", "4")]}
    forged = {"bench": "b", "index": 0, "question": "1+1?", "gold": "2",
              "samples": [{"completion": "\\boxed{3}", "tokens": 3, "truncated": False, "correct": True}]}
    partial = tmp_path / "partial.jsonl"
    # + a cut-short line
    partial.write_text(json.dumps(forged) + "\n" + json.dumps(forged | {"index": 1})[:30])
    warned = []
    done = remote.read_partial(partial, benches, lambda s, q, g: E.grade(s, q, g, None, False), warned.append)
    # re-graded: 3 is wrong
    assert list(done) == [("b", 0)] and done[("b", 0)]["samples"][0]["correct"] is False
    assert "cut short" in warned[0] and partial.read_text().count("\n") == 1
    partial.write_text(json.dumps(forged | {"question": "other?"}) + "\n")  # not this benchmark's question
    with pytest.raises(E.PopsdError, match="line 1 is not a finished question of this evaluation"):
        remote.read_partial(partial, benches, lambda *a: None, warned.append)


def test_two_benchmarks_with_one_file_name_stay_two(tmp_path):
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "test.jsonl").write_text(json.dumps({"problem": f"{d}?", "answer": "1"}) + "\n")
    specs = [str(tmp_path / "a/test.jsonl"), str(tmp_path / "b/test.jsonl")]
    benches = E.named_benches((s, E.load_bench(s)) for s in specs)
    assert benches == {"test": [("a?", "1")], "b_test": [("b?", "1")]}


def test_temperature_0_is_greedy(tiny_dir, tmp_path):
    common = ["--model", str(tiny_dir), "--bench", str(FIVE), "--n", "2", "--max-new-tokens", "8", "--dtype",
              "fp32", "--limit", "2", "--thinking", "off", "--temperature", "0"]
    out = eval_cli(*common, "--out", str(tmp_path / "g"))
    assert out.returncode == 0, out.stdout[-2000:]
    recs = [json.loads(x) for x in (tmp_path / "g/samples.jsonl").read_text().splitlines()]
    # greedy: n alike
    assert all(r["samples"][0]["completion"] == r["samples"][1]["completion"] for r in recs)
    bad = eval_cli(*common[:-2], "--temperature", "-1", "--out", str(tmp_path / "x"))
    assert bad.returncode == 2 and "--temperature must be >= 0" in bad.stdout


def test_the_results_table_fits_80_columns_without_cut_headers(monkeypatch):
    m = {"test": {"questions": 400, "samples": 400, "avg@1": 0.918, "pass@1": 0.918, "len_mean": 50.7,
                  "len_median": 50.0, "truncated": 0.0, "markers_per_1k": 18.5, "first_try_errors": 0.75,
                  "caught_frac": 0.82, "false_reflections": 0.31}}
    monkeypatch.setattr(E.console, "width", 80)
    with E.console.capture() as cap:
        E.console.print(E.results_table(m, "toy base"))
    text = cap.get()
    assert max(map(len, text.splitlines())) <= 80 and "…" not in text
    assert "markers/1k" in text and "false refl/sample" in text and "0.75" in text
