"""docs/world3_explain.py: Δ_ref and Δ_it at each role of worlds three and four, as explain.py shows them.

    python docs/world3_explain.py            # about a minute on 2 CPU cores

It runs explain.py on 32 held-out questions (seed 0) for each world's shipped base as the student (step 0 of
every run, the student the targets first act on) with the sketch reference, and writes
docs/world3_explain/summary.json and summary.md (the mean of each Δ over the tokens of each of the world's
roles) and two screenshots of the habitworld page in its Δ_it view (Debian's chromium through selenium;
skipped, and said, when it is not installed): with the role "operand, non-default operation" underlined,
and with "wait after a wrong step". The pages themselves go to runs/world3_explain/<world>/explain.html.
"""
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import explain  # noqa: E402

RUNS = ROOT / "runs/world3_explain"
DOCS = ROOT / "docs/world3_explain"
SAMPLES, SEED = 32, 0
STUDENTS = {  # explain.py's arguments
    "habitworld": ["data/habitworld/base", "--recipe", "habit", "reference_field=sketch"],
    "legendworld": ["data/legendworld/base", "--recipe", "legend", "reference_field=sketch"],
}
SHOTS = {"operand, non-default operation": "habit_operands.png", "wait after a wrong step": "habit_waits.png"}


def screenshots(page: Path):
    """The Δ_it view, each role of SHOTS underlined, the first completion that has one in view."""
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver_path):
        print("no screenshots: Debian's chromium and chromium-driver are not installed")
        return
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select
    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,820"):
        options.add_argument(flag)
    options.binary_location = chromium
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        driver.get(page.as_uri())
        driver.find_element(By.CSS_SELECTOR, 'input[value="delta_it"]').click()
        for role, name in SHOTS.items():
            Select(driver.find_element(By.ID, "role")).select_by_value(role)
            marked = driver.find_elements(By.CSS_SELECTOR, ".tok.marked")
            if not marked:
                print(f"no screenshot of {role!r}: no token of that role on the page")
                continue
            marked[0].click()  # its panel: every distribution's top tokens there
            driver.execute_script("document.getElementById('main').scrollTop = 0")
            driver.save_screenshot(str(DOCS / name))
    finally:
        driver.quit()


def table(summary: dict) -> list[str]:
    rows = ["| world | role | tokens | Δ_ref | Δ_it | Δ_total |", "|---|---|--:|--:|--:|--:|"]
    for name, by_role in summary.items():
        for role, r in by_role.items():
            rows.append(f"| {name} | {role} | {r['tokens']} | {r['delta_ref']:+.3f} | {r['delta_it']:+.3f} | "
                        f"{r['delta_total']:+.3f} |")
    return rows


def main():
    summary = {}
    for name, args in STUDENTS.items():
        out = RUNS / name
        print(f"explaining the {name} base ...", flush=True)
        explain.main([*args[:1], "--samples", str(SAMPLES), "--seed", str(SEED), "--quiet", "--out",
                      str(out), *args[1:]])
        result = json.loads((out / "explain.json").read_text())
        summary[name] = {role: result["by_role"][role] for role in result["roles"]
                         if role in result["by_role"]}
    DOCS.mkdir(exist_ok=True)
    (DOCS / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    lines = [f"Written by `python docs/world3_explain.py`: each world's base as the student, the sketch "
             f"reference, {SAMPLES} held-out questions, seed {SEED}; the mean of each Δ (nats) over the "
             "tokens of each role the base wrote there.", "", *table(summary)]
    (DOCS / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    screenshots(RUNS / "habitworld/explain.html")


if __name__ == "__main__":
    main()
