"""The README and docs/*.md: links that resolve, pages that are reachable, commands that are CI's."""
import re

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
