"""The README and docs/*.md: links that resolve, pages that are reachable, commands that are CI's, every
`module.name` they cite exists, and the walkthrough's figure is what its script prints."""
import importlib
import re
import subprocess
import sys

from conftest import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_every_link_and_image_resolves_and_every_page_is_linked_from_the_readme():
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#\s]+)", page.read_text()):
            if not target.startswith(("http://", "https://")):
                assert (page.parent / target).exists(), f"{page.name}: {target}"
    readme = PAGES[0].read_text()
    for page in PAGES[1:]:
        assert f"](docs/{page.name})" in readme, page.name


def test_every_python_file_named_in_the_docs_exists():
    for page in PAGES:
        for name in set(re.findall(r"`((?:[\w-]+/)*[\w-]+\.(?:py|sh))\b", page.read_text())):
            assert (ROOT / name).exists() or (ROOT / "bench" / name).exists(), f"{page.name}: {name}"


def test_the_readme_opens_with_the_set_up_commands_ci_runs():
    first = "\n".join(PAGES[0].read_text().splitlines()[:40])
    ci = (ROOT / ".ci/run").read_text()
    assert "pip install torch==2.13.0" in first and "pip install -r requirements.txt" in first
    assert "python popsd.py --recipe toy" in first
    assert "reference_field=sketch" in first and "method=opsd" in first  # the two runs that show learning
    test_command = re.search(r"^python -m pytest.*$", ci, re.M).group(0)
    assert test_command in first and "requirements-test.txt" in first and "install_vllm.sh cpu" in first


FILE_ENDINGS = ("json", "jsonl", "py", "md", "png", "txt", "safetensors", "sh", "pt", "lock", "jinja", "log",
                "html")


def test_every_module_name_cited_in_the_docs_exists():
    """`popsd.frozen_passes`, `loss.purified_target`, `engines.make_sampler`: each names a function, class or
    constant of the project as the code stands (a rename cannot leave a pointer leading nowhere)."""
    from test_layout import project_modules
    modules = set(project_modules())
    short = {m.rsplit(".", 1)[1]: m for m in modules if "." in m}  # session → plumbing.session
    cited = 0
    for page in PAGES:
        for dotted in set(re.findall(r"`((?:[a-z_]+\.)+[A-Za-z_]\w*)", page.read_text())):
            parts = dotted.split(".")
            if parts[-1] in FILE_ENDINGS:
                continue  # a file (config.json, model.safetensors)
            k = max((i for i in range(1, len(parts)) if ".".join(parts[:i]) in modules), default=0)
            assert k or parts[0] not in short, f"{page.name}: `{dotted}`: the module is {short[parts[0]]}"
            if not k:
                continue  # not a project module (torch.compile, ...)
            target = importlib.import_module(".".join(parts[:k]))
            for name in parts[k:]:
                assert hasattr(target, name), f"{page.name}: `{dotted}` names nothing"
                target = getattr(target, name)
            cited += 1
    assert cited > 30  # the check looks at something


def test_every_test_a_module_cites_exists():
    """A test cited as tests/<file>.py::<name> in a module (loss_fused.py cites the tests that prove it
    equal to loss.py) names a test that is there."""
    cited = 0
    for path in [*ROOT.glob("*.py"), *ROOT.glob("*/*.py")]:
        for file, name in re.findall(r"(tests/test_\w+\.py)::(test_\w+)", path.read_text()):
            assert f"def {name}(" in (ROOT / file).read_text(), f"{path.name}: {file}::{name}"
            cited += 1
    assert cited >= 9


def test_the_walkthrough_shows_what_its_script_prints():
    done = subprocess.run([sys.executable, str(ROOT / "docs/walkthrough.py")], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    page = (ROOT / "docs/walkthrough.md").read_text()
    block = page.split("<!-- walkthrough.py: begin -->")[1].split("<!-- walkthrough.py: end -->")[0]
    figure, table = done.stdout.strip("\n").split("\n\n", 1)
    assert block.strip() == f"```\n{figure}\n```\n\n{table.strip()}"
