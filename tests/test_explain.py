"""explain.py: its numbers against a float64 recomputation from scratch, its page in a real headless
browser (Debian's chromium through selenium and the system chromedriver, no downloaded browser), its terminal
view, and one clear line for each bad input. Under CI the browser test must not skip (.ci/run installs
chromium)."""
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

import explain
from conftest import ROOT, run_main
from rollout import build_contexts
from worlds import habitworld as H, toyworld as T

pytestmark = pytest.mark.xdist_group("explain")  # one trained run for the module, one worker


@pytest.fixture(scope="module")
def explained(tmp_path_factory):
    """A toy run that moved away from its base (3 OPSD steps at a high learning rate, a checkpoint at step 2)
    and explain.py's output on 4 of its held-out questions."""
    tmp = tmp_path_factory.mktemp("explain")
    run = tmp / "run"
    done = subprocess.run([sys.executable, str(ROOT / "popsd.py"), "--recipe", "toy", f"out_dir={run}",
                           "steps=3", "save_every=2", "eval_every=0", "lr=1e-2", "method=opsd",
                           "reference_field=sketch", "batch_size=4", "micro_batch_size=4"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    shown = run_main(explain.main, [run, "--samples", "4"])
    assert shown.returncode == 0, shown.stdout[-3000:]
    return run, shown.stdout, json.loads((run / "explain/adapter/explain.json").read_text())


def test_the_numbers_are_what_a_float64_recomputation_from_scratch_gives(explained):
    """For the first completions, every token: each context's prompt + ŷ through the model in float64 (no
    padding, one sequence at a time, the adapter loaded anew), then Δ_ref, Δ_it, Δ_total and both per-token
    JSDs by their definitions. A misaligned position, a swapped context or a wrong target shows here."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    run, _, result = explained
    cfg = explain.run_config(run)
    tok = AutoTokenizer.from_pretrained(run / "adapter")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(ROOT / cfg.model), run / "adapter")
    model = model.double().eval()
    tau, b, beta, c = cfg.temperature, cfg.jsd_mix, cfg.beta, cfg.pmi_clip
    templates = (cfg.student_template, cfg.teacher_template, cfg.refonly_template)
    checked = 0
    for rec in result["completions"][:2]:
        ctx = build_contexts(tok, rec["question"], rec["reference"], templates=templates,
                             student_thinking=False, teacher_thinking=False)
        y = rec["ids"]

        def logp(prompt, adapter):  # [T, V] float64 log-probs of the positions that predict ŷ
            with torch.no_grad():
                if adapter:
                    out = model(input_ids=torch.tensor([prompt + y])).logits[0]
                else:
                    with model.disable_adapter():
                        out = model(input_ids=torch.tensor([prompt + y])).logits[0]
            return torch.log_softmax(out[len(prompt) - 1:len(prompt) - 1 + len(y)] / tau, -1)
        s, t, r, base = logp(ctx.student, True), logp(ctx.teacher, False), logp(ctx.refonly, False), \
            logp(ctx.student, False)
        d = t - r
        d = d - d.mean(-1, keepdim=True)
        target = torch.log_softmax(base + c * torch.tanh(d / c) / beta, -1)

        def jsd(p_log):  # b·KL(P‖M) + (1−b)·KL(π_θ‖M)
            p, q = p_log.exp(), s.exp()
            m = b * p + (1 - b) * q
            return (b * p * (p_log - m.log()) + (1 - b) * q * (s - m.log())).sum(-1)
        idx = torch.tensor(y)[:, None]
        at = {k: x.gather(-1, idx)[:, 0] for k, x in (("s", s), ("t", t), ("r", r))}
        wants = (("delta_ref", at["r"] - at["s"]), ("delta_it", at["t"] - at["r"]),
                 ("delta_total", at["t"] - at["s"]), ("loss_purified", jsd(target)), ("loss_opsd", jsd(t)))
        for key, want in wants:
            got = torch.tensor(rec[key], dtype=torch.float64)
            torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-3)
        top = s[0].exp().topk(3)
        assert [i for i, _ in rec["top"]["student"][0][:3]] == top.indices.tolist()
        assert rec["tokens"] == [tok.decode(y[:i + 1])[len(tok.decode(y[:i])):] for i in range(len(y))]
        checked += len(y)
    assert checked > 50
    assert abs(sum(result["completions"][0]["delta_ref"]) - result["completions"][0]["sum_delta_ref"]) < 1e-9


def test_the_json_holds_per_token_rows_and_the_summary_by_kind(explained):
    _, output, result = explained
    assert len(result["completions"]) == 4 and result["settings"]["trained_with"] == "opsd"
    for rec in result["completions"]:
        n = len(rec["ids"])
        assert all(len(rec[k]) == n for k in ("tokens", "kinds", "delta_ref", "delta_it", "delta_total",
                                              "loss_purified", "loss_opsd"))
        assert all(len(rec["top"][k]) == n and len(rec["top"][k][0]) == 5 for k in explain.DISTRIBUTIONS)
        assert rec["correct"] in (True, False) and "".join(rec["tokens"]).startswith(rec["completion"][:5])
        for a, b2, c2 in zip(rec["delta_ref"], rec["delta_it"], rec["delta_total"]):
            assert math.isclose(a + b2, c2, abs_tol=1e-5)  # Δ_total = Δ_ref + Δ_it
    kinds = result["by_kind"]
    assert kinds["all"]["tokens"] == sum(kinds[k]["tokens"] for k in ("marker", "digit", "other"))
    # the world's roles (toyworld's), one per token or None, and their means
    assert result["roles"] == list(T.ROLES)
    marked = [(rec, t) for rec in result["completions"] for t, role in enumerate(rec["roles"]) if role]
    assert len(marked) > 20 and all(len(rec["roles"]) == len(rec["ids"]) for rec in result["completions"])
    for role, row in result["by_role"].items():
        mine = [rec["delta_it"][t] for rec, t in marked if rec["roles"][t] == role]
        assert row["tokens"] == len(mine) and math.isclose(row["delta_it"], sum(mine) / len(mine))
    assert "Δ_ref" in output and "Δ_it" in output and "explain.html" in output  # the terminal view


def test_each_token_gets_the_role_of_its_first_character_that_has_one():
    """Tokens of several characters: the first role the world names at the first of their characters that has
    one (habitworld: the start digit is a carried value; where a "wait" could follow a step, that role comes
    first; *3 at the step that asks *5 is an operand of a non-default operation)."""
    texts = ["3+3=6 ", "6*", "3=8", " \\boxed{", "8", "}"]
    assert explain.roles_of(H, "3+3*5", texts) == [
        "carried value", "wait after a right step", "operand, non-default operation",
        "wait after a wrong step", "boxed answer (the trace's own value)", None]
    assert explain.roles_of(None, "3+3*5", texts) == [None] * 6


CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")


def browser():
    if not (CHROMIUM and DRIVER):
        if os.environ.get("CI"):
            pytest.fail("chromium is missing under CI: .ci/run installs it (apt-get install chromium "
                        "chromium-driver)", pytrace=False)
        pytest.skip("Debian's chromium and chromium-driver are not installed")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1400,900"):
        options.add_argument(flag)
    options.binary_location = CHROMIUM
    return webdriver.Chrome(service=Service(DRIVER), options=options)


def test_the_page_in_a_real_browser_draws_every_token_coloured_and_shows_the_panel(explained, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select
    run, _, result = explained
    page = run / "explain/adapter/explain.html"
    assert "http" not in page.read_text().split("<script id=\"data\"")[0]  # nothing fetched: one file
    driver = browser()
    try:
        driver.get(page.as_uri())
        tokens = driver.find_elements(By.CSS_SELECTOR, ".tok")
        assert len(tokens) == sum(len(r["ids"]) for r in result["completions"])
        colours = {t.value_of_css_property("background-color") for t in tokens}
        assert len(colours) > 3  # coloured by Δ_ref, not all white
        driver.find_element(By.CSS_SELECTOR, 'input[value="delta_it"]').click()
        assert {t.value_of_css_property("background-color") for t in tokens} != colours  # the second view
        ActionChains(driver).move_to_element(tokens[3]).click().perform()
        panel = driver.find_element(By.ID, "panel").text
        rec = result["completions"][0]
        assert "π_T (teacher)" in panel and "P (Purified's target)" in panel and "π_0 (clean base)" in panel
        assert f"Δ_ref {rec['delta_ref'][3]:+.3f}" in panel
        assert len(driver.find_elements(By.CSS_SELECTOR, "#panel table")) == 6
        driver.find_element(By.XPATH, "//button[text()='largest |Δ_ref|']").click()
        chosen = driver.find_element(By.CSS_SELECTOR, ".tok.sel").get_attribute("id")
        largest = max(range(len(rec["ids"])), key=lambda i: abs(rec["delta_ref"][i]))
        assert chosen == f"t0_{largest}"  # the jump lands on the largest |Δ_ref| of completion 0
        role = result["completions"][0]["roles"][0]  # the start digit: world one's "carried value"
        Select(driver.find_element(By.ID, "role")).select_by_value(role)
        underlined = driver.find_elements(By.CSS_SELECTOR, ".tok.marked")
        assert len(underlined) == sum(r == role for rec in result["completions"] for r in rec["roles"])
        assert underlined[0].get_attribute("id") == "t0_0"
        driver.save_screenshot(str(tmp_path / "page.png"))
        assert (tmp_path / "page.png").stat().st_size > 20_000
    finally:
        driver.quit()


def test_a_checkpoint_step_and_bad_input_are_one_line_each(explained, tmp_path):
    run, _, _ = explained
    done = run_main(explain.main, [run, "--step", "2", "--samples", "1", "--quiet", "--out", tmp_path / "s2",
                                   "reference_field=full"])  # key=value after the options, as in --help
    settings = json.loads((tmp_path / "s2/explain.json").read_text())["settings"]
    assert done.returncode == 0 and settings["adapter"].endswith("step_000002"), done.stdout[-2000:]
    assert settings["reference_field"] == "full" and settings["trained_with"] == "opsd"
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain/notes.txt").write_text("x")
    orphan = tmp_path / "orphan"
    shutil.copytree(run / "adapter", orphan)
    config = json.loads((orphan / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "/nowhere/base"
    (orphan / "adapter_config.json").write_text(json.dumps(config))
    for args, said in (([tmp_path / "plain"], "is not a popsd run, a checkpoint or adapter"),
                       ([orphan], "model folder '/nowhere/base' does not exist"),
                       ([run, "--samples", "0"], "--samples and --topk must be at least 1"),
                       ([run, "--step", "7"], "step 7 has no checkpoint (checkpoints at steps: 2"),
                       ([tmp_path / "nope"], "no such folder"),
                       ([run, "--out", run / "adapter"], "is an adapter or checkpoint (adapter_config.json)"),
                       ([run, "--out", run], "is a training run"),
                       ([run, "--out", tmp_path / "plain"], "is not empty and holds no explain.json")):
        done = run_main(explain.main, args)
        text = done.stdout + done.stderr
        assert done.returncode == 2 and said in text and "Traceback" not in text, (args, text[-1500:])
    # someone's folder: untouched
    assert sorted(p.name for p in (tmp_path / "plain").iterdir()) == ["notes.txt"]


def test_each_methods_per_token_loss_is_the_runs_own_on_its_support(explained, tmp_path):
    """With support=sampled a run's per-token loss is −A·log π_θ(ŷ_t), A = log P(ŷ_t) − log π_θ(ŷ_t):
    explain.py shows that, not the full-vocabulary divergence (before: 0.51 summed where training's was
    0.20)."""
    run, _, _ = explained
    shown = run_main(explain.main, [run, "--samples", "2", "--out", tmp_path / "x", "--quiet",
                                    "support=sampled", "divergence=reverse_kl"])
    assert shown.returncode == 0, shown.stdout[-2000:]
    result = json.loads((tmp_path / "x/explain.json").read_text())
    assert result["settings"]["support"] == "sampled"
    checked = 0
    for r in result["completions"]:
        for t, y in enumerate(r["ids"]):
            p = dict((i, q) for i, q in r["top"]["student"][t]).get(y, 0)
            if p > 0.05:  # the panel's rounded probability is precise enough
                want = -r["delta_total"][t] * math.log(p)
                assert r["loss_opsd"][t] == pytest.approx(want, rel=2e-3, abs=1e-4)
                checked += 1
    assert checked > 20 and any(x < 0 for r in result["completions"] for x in r["loss_opsd"])  # can be < 0
