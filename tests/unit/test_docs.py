"""The README and the documentation site: the site builds in strict mode without a warning (a broken link,
a missing anchor or a page left out of the navigation fails), the README stays a newcomer's path (short,
its links resolve, its own model and data early in its contents), and the figures it states are the
code's."""

import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def _links(text: str) -> list[str]:
    """The targets of the Markdown links of a text, code blocks left out."""
    return LINK.findall(re.sub(r"```.*?```", "", text, flags=re.S))


def _github_anchor(heading: str) -> str:
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_the_docs_site_builds_strictly_without_a_warning(tmp_path):
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    run = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output
    warnings = [line for line in output.splitlines() if re.match(r"\s*(WARNING|ERROR)\b", line)]
    assert not warnings, output
    assert (tmp_path / "site" / "index.html").exists()


def test_every_page_of_the_docs_is_in_the_navigation():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())

    def pages(nav):
        for item in nav:
            for value in item.values() if isinstance(item, dict) else [item]:
                yield from pages(value) if isinstance(value, list) else [value]

    listed = set(pages(config["nav"]))
    assert listed == {p.name for p in (ROOT / "docs").glob("*.md")}
    assert all((ROOT / "docs" / page).exists() for page in listed)


def test_the_readme_is_short():
    assert len(README.read_bytes()) < 15_000, "the README is a newcomer's path: details go to docs/"


def test_every_relative_link_of_the_readme_resolves():
    text = README.read_text()
    anchors = {_github_anchor(h) for h in re.findall(r"^#+ (.*)$", text, flags=re.M)}
    links = _links(text)
    assert links
    for target in links:
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        if path:
            assert (ROOT / path).exists(), f"README links to {target}, which does not exist"
        else:
            assert anchor in anchors, f"README links to #{anchor}, which is no heading of it"


def test_the_readme_reaches_your_own_model_and_data_in_its_first_screenful():
    lines = README.read_text().splitlines()
    contents = [i for i, line in enumerate(lines) if re.match(r"\d+\. \[", line)]
    assert contents and contents[0] < 25, "the README opens with its contents"
    assert any("Your own model and data" in lines[i] for i in contents[:4])
    assert any(line == "## Your own model and data" for line in lines)


def test_the_readmes_figures_are_the_codes():
    """The README states no measured figure; what it does state (the demo's trials, splits, baseline and
    retrain, its example search space) is checked here against the code."""
    from loratune.config import StudyConfig
    from loratune.demo.dataset import TEST_FILE, TRAIN_FILE, VALIDATION_FILE
    from loratune.search_space import parse_search_space

    text = README.read_text()
    makefile = (ROOT / "Makefile").read_text()
    cfg = StudyConfig()
    base = cfg.base()
    assert f"--trials {cfg.trials} " in makefile and f"({cfg.trials} trials, offline tiny model)" in text
    assert f"ax_optimization.py --trials {cfg.trials} --output configs/optimization_results.json --overwrite" in makefile
    rows = [sum(1 for line in f.read_text().splitlines() if line.strip()) for f in (TRAIN_FILE, VALIDATION_FILE, TEST_FILE)]
    assert "{} for training, {} for validation and {} for the test split".format(*rows) in text
    assert (f"(rank {base.lora.rank}, alpha {base.lora.alpha:g}, learning rate {base.training.learning_rate:g}, "
            f"batch size {base.training.batch_size})").replace("0.0002", "2e-4") in " ".join(text.split())
    assert f"for {cfg.retrain_epochs:g} epochs" in text and f"retrain with them ({cfg.retrain_epochs:g} epochs)" in text
    block = re.search(r"```yaml\n(search_space:.*?)```", text, flags=re.S).group(1)
    example = yaml.safe_load(block)
    space = parse_search_space(example["search_space"], example["constraints"], base)
    assert [p.kind for p in space.params] == ["choice", "choice", "range", "choice", "fixed"]
    assert not re.search(r"\d+(\.\d+)? ?(s|min|ms)\b", text), "a timing in the README: it belongs in docs/benchmarks.md"
