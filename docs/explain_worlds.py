"""docs/explain_worlds.py: the runs behind docs/explain.md's outcome, and its verdicts on E1-E8.

    python docs/explain_worlds.py            # about 1.5 min on 2 CPU cores: 2 trainings, 5 students

It trains the two world-one students the expectations name (the toy recipe's 60 steps, sketch reference,
seed 0, method=opsd and method=purified; nothing else changed), runs explain.py on 32 held-out questions
(seed 0) for each of the five students, and writes docs/explain/summary.json (every student's means by
token kind), docs/explain/summary.md (the table and each expectation's verdict, by the thresholds written
before looking) and two screenshots of one page (Debian's chromium through selenium; skipped, and said,
when it is not installed). The pages themselves go to runs/explain_worlds/<student>/explain.html.
"""
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import explain  # noqa: E402

RUNS = ROOT / "runs/explain_worlds"
DOCS = ROOT / "docs/explain"
SAMPLES, SEED = 32, 0
# the students of docs/explain.md, by name: explain.py's arguments
STUDENTS = {
    "toy_base_full": ["data/toyworld/base", "--recipe", "toy", "reference_field=full"],
    "toy_base_sketch": ["data/toyworld/base", "--recipe", "toy", "reference_field=sketch"],
    "carry_base_sketch": ["data/carryworld/base", "--recipe", "carry", "reference_field=sketch"],
    "toy_opsd_sketch": [str(RUNS / "train_opsd")],
    "toy_purified_sketch": [str(RUNS / "train_purified")],
}


def train(method: str):
    """The toy recipe as it ships, sketch reference, seed 0; evaluations off (explain.py samples its own)."""
    out = RUNS / f"train_{method}"
    if (out / "adapter/adapter_model.safetensors").is_file():
        print(f"{out}: trained already (delete it to train again)")
        return
    print(f"training {out} ...", flush=True)
    subprocess.run([sys.executable, str(ROOT / "popsd.py"), "--recipe", "toy", f"out_dir={out}",
                    "overwrite=true", f"method={method}", "reference_field=sketch", f"seed={SEED}",
                    "eval_every=0"],
                   cwd=ROOT, check=True, stdout=subprocess.DEVNULL)


def verdicts(s: dict) -> list[tuple[str, bool, str]]:
    """E1-E8 exactly as docs/explain.md wrote them before the runs: (name, held, the numbers it rests on)."""
    def k(student, kind, key):
        return s[student]["by_kind"][kind][key]

    def per_token(student):  # marker tokens per completion token
        return k(student, "marker", "tokens") / k(student, "all", "tokens")
    full, sk, carry, opsd, pur = STUDENTS
    out = []
    e = k(full, "all", "abs_delta_it")
    out.append(("E1", e < 0.1, f"mean |Δ_it| over all tokens {e:.3f} (< 0.1)"))
    a, b = k(full, "marker", "delta_ref"), k(full, "marker", "abs_delta_it")
    out.append(("E2", a < -1 and b < 0.2,
                f"markers: mean Δ_ref {a:+.3f} (< −1), mean |Δ_it| {b:.3f} (< 0.2)"))
    for name, student in (("E3", sk), ("E5", carry)):
        d, o = k(student, "digit", "delta_it"), k(student, "other", "delta_it")
        out.append((name, d > o and d > 0, f"mean Δ_it on digits {d:+.3f}, on other tokens {o:+.3f} "
                                           "(digits > other, and > 0)"))
    for name, student, bound in (("E4", sk, -1.0), ("E6", carry, -0.5)):
        a, b = k(student, "marker", "delta_ref"), k(student, "marker", "delta_it")
        out.append((name, a < bound and abs(b) < 0.2,
                    f"markers: mean Δ_ref {a:+.3f} (< {bound:+.1f}), mean Δ_it {b:+.3f} (|·| < 0.2)"))
    t_opsd, t_base = k(opsd, "all", "abs_delta_total"), k(sk, "all", "abs_delta_total")
    m_opsd, m_base = per_token(opsd), per_token(sk)
    out.append(("E7", t_opsd < t_base and m_opsd < m_base,
                f"mean |Δ_total| {t_opsd:.3f} against the base's {t_base:.3f}; marker tokens per token "
                f"{m_opsd:.4f} against {m_base:.4f} (both smaller)"))
    m_pur, r_pur = per_token(pur), k(pur, "marker", "abs_delta_ref")
    out.append(("E8", abs(m_pur / m_base - 1) <= 1 / 3 and r_pur > 0.5,
                f"marker tokens per token {m_pur:.4f} against the base's {m_base:.4f} "
                f"(ratio {m_pur / m_base:.2f}, within 1 ± 1/3); mean |Δ_ref| on markers {r_pur:.3f} (> 0.5)"))
    return sorted(out)


def marker_starts(result: dict) -> dict:
    """Exploratory, chosen after the pages were looked at (not one of E1-E8): the first non-space token of
    each marker word alone (in the toy worlds, the "w" of "wait"), where a reflection is decided."""
    picked = []
    for r in result["completions"]:
        before = "other"
        for t, (kind, text) in enumerate(zip(r["kinds"], r["tokens"])):
            if kind == "marker" and text.strip() and before != "marker_word":
                picked.append((r, t))
            before = "marker_word" if kind == "marker" and text.strip() else kind
    row = {"tokens": len(picked)}
    for key in ("delta_ref", "delta_it", "delta_total"):
        row[key] = sum(r[key][t] for r, t in picked) / len(picked) if picked else None
    return row


def table(s: dict) -> list[str]:
    rows = ["| student | kind | tokens | Δ_ref | Δ_it | Δ_total | \\|Δ_ref\\| | \\|Δ_it\\| | "
            "loss Purified | loss OPSD |",
            "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for name, result in s.items():
        for kind, r in result["by_kind"].items():
            if not r["tokens"]:
                rows.append(f"| {name} | {kind} | 0 | | | | | | | |")
                continue
            rows.append(f"| {name} | {kind} | {r['tokens']} | {r['delta_ref']:+.3f} | "
                        f"{r['delta_it']:+.3f} | {r['delta_total']:+.3f} | {r['abs_delta_ref']:.3f} | "
                        f"{r['abs_delta_it']:.3f} | "
                        f"{r['loss_purified']:.2e} | {r['loss_opsd']:.2e} |")
    return rows


def screenshots(page: Path):
    """The page in its Δ_ref view with the largest |Δ_ref| of the first completion selected, then Δ_it."""
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver_path):
        print("no screenshots: Debian's chromium and chromium-driver are not installed")
        return
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,820"):
        options.add_argument(flag)
    options.binary_location = chromium
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        driver.get(page.as_uri())
        driver.find_element(By.XPATH, "//button[text()='largest |Δ_ref|']").click()
        driver.execute_script("document.getElementById('main').scrollTop = 0")
        driver.save_screenshot(str(DOCS / "page_delta_ref.png"))
        driver.find_element(By.CSS_SELECTOR, 'input[value="delta_it"]').click()
        driver.find_element(By.XPATH, "//button[text()='largest |Δ_it|']").click()
        driver.execute_script("document.getElementById('main').scrollTop = 0")
        driver.save_screenshot(str(DOCS / "page_delta_it.png"))
    finally:
        driver.quit()


def main():
    for method in ("opsd", "purified"):
        train(method)
    summary = {}
    for name, args in STUDENTS.items():
        out = RUNS / name
        print(f"explaining {name} ...", flush=True)
        explain.main([*args[:1], "--samples", str(SAMPLES), "--seed", str(SEED), "--quiet", "--out", str(out),
                      *args[1:]])
        result = json.loads((out / "explain.json").read_text())
        summary[name] = {"explained": result["settings"]["explained"], "by_kind": result["by_kind"],
                         "correct": sum(bool(r["correct"]) for r in result["completions"]),
                         "markers": sum(r["markers"] for r in result["completions"]),
                         "marker_starts": marker_starts(result)}
    DOCS.mkdir(exist_ok=True)
    (DOCS / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    lines = [f"Written by `python docs/explain_worlds.py`: {SAMPLES} held-out questions per student, "
             f"seed {SEED}.",
             "", *table(summary), "",
             "| student | right of 32 | marker words |", "|---|--:|--:|",
             *(f"| {n} | {r['correct']} | {r['markers']} |" for n, r in summary.items()), "",
             "| expectation | held | the numbers |", "|---|---|---|",
             *(f"| {n} | {'held' if ok else 'FAILED'} | {why.replace('|', chr(92) + '|')} |"
               for n, ok, why in verdicts(summary)), "",
             "Exploratory, chosen after looking (not pre-registered): the first token of each marker word "
             "alone", "", "| student | marker words' first tokens | Δ_ref | Δ_it | Δ_total |",
             "|---|--:|--:|--:|--:|",
             *(f"| {n} | {m['tokens']} | {m['delta_ref']:+.3f} | {m['delta_it']:+.3f} | "
               f"{m['delta_total']:+.3f} |"
               for n, m in ((n, r["marker_starts"]) for n, r in summary.items()) if m["tokens"])]
    (DOCS / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    screenshots(RUNS / "toy_base_sketch/explain.html")


if __name__ == "__main__":
    main()
