"""Every relative link and image in the README and docs/ resolves, as it must on the repository's web page.

The README points into docs/ and docs/ points back and between its pages; a file moved or a heading
renamed would leave a dead link that no other test notices. Checked statically over the Markdown text:
inline links and images ``[text](target)`` / ``![alt](target)``, reference definitions
``[label]: target`` and HTML ``src=`` / ``href=`` attributes, outside fenced code blocks and inline code
spans (commands shown as code are not links). A relative target must name a file or folder inside the
repository that git does not ignore (a run's output under ``runs/`` exists only on the machine that
made it); a ``#fragment`` must name a heading of the target Markdown file, slugged the way GitHub
slugs headings, or an explicit ``<a name=...>`` / ``id=...``. A path starting with ``/`` is refused:
on the web page it resolves against the host, not the repository. Web addresses (http, https, mailto)
are not fetched.
"""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import unquote

import pytest

REPO = Path(__file__).resolve().parents[1]

WEB_SCHEMES = ("http", "https", "mailto")
_FENCE = re.compile(r"^\s*(```|~~~)")
_CODE_SPAN = re.compile(r"(`+)(.+?)\1")
# [text](target "optional title"); the text may hold one level of brackets, the target one level of parentheses
_INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*(<[^>]*>|(?:[^()\s]|\([^()\s]*\))+)(?:\s+(?:\"[^\"]*\"|'[^']*'))?\s*\)")
_REFERENCE_DEFINITION = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)")
_HTML_ATTRIBUTE = re.compile(r"\b(?:src|href)\s*=\s*[\"']([^\"']+)[\"']", re.IGNORECASE)
_HTML_ANCHOR = re.compile(r"<a\s[^>]*\b(?:name|id)\s*=\s*[\"']([^\"']+)[\"']|\bid\s*=\s*[\"']([^\"']+)[\"']", re.IGNORECASE)
_ATX_HEADING = re.compile(r"^\s{0,3}#{1,6}\s+(.*?)\s*#*\s*$")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def documentation_files(root: Path = REPO) -> list[Path]:
    """The README, every page of docs/ and the Markdown notes inside the package."""
    return [root / "README.md", *sorted((root / "docs").glob("*.md")), *sorted((root / "care_megatron").rglob("*.md"))]


def fenced(text: str) -> list[tuple[str, bool]]:
    """Each line of the file with whether it lies in a fenced code block (the fences included)."""
    lines, fence = [], None
    for line in text.splitlines():
        opened = _FENCE.match(line)
        if fence is not None:
            if opened and opened.group(1) == fence:
                fence = None
            lines.append((line, True))
        elif opened:
            fence = opened.group(1)
            lines.append((line, True))
        else:
            lines.append((line, False))
    return lines


def prose_lines(text: str) -> list[str]:
    """The file's lines with fenced code blocks blanked and inline code spans replaced by a placeholder,
    so line numbers stay true and nothing shown as code is read as a link."""
    return ["" if in_code else _CODE_SPAN.sub("code", line) for line, in_code in fenced(text)]


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: its rendered text lower-cased, punctuation other than ``-`` and
    ``_`` dropped, every space a ``-`` (github-slugger's rule; duplicates are numbered by the caller)."""
    rendered = _CODE_SPAN.sub(lambda match: match.group(2), heading)  # code spans keep their text
    rendered = re.sub(r"!?\[((?:[^\[\]]|\[[^\[\]]*\])*)\]\([^)]*\)", r"\1", rendered)  # a link shows its text
    rendered = re.sub(r"<[^>]+>", "", rendered)
    return re.sub(r"[^\w\- ]", "", rendered.lower()).replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every fragment a link into this Markdown text may name: heading slugs (a repeated slug gets
    ``-1``, ``-2``, ... as on GitHub) and explicit HTML anchors."""
    found, repeats = set(), {}  # repeats: slug -> how many times it has been numbered
    for line, in_code in fenced(text):
        if in_code:
            continue
        heading = _ATX_HEADING.match(line)
        if heading:
            base = slug = github_slug(heading.group(1))
            while slug in repeats:  # taken, also by an earlier heading whose own text ended in "-1"
                repeats[base] += 1
                slug = f"{base}-{repeats[base]}"
            repeats[slug] = 0
            found.add(slug)
        for match in _HTML_ANCHOR.finditer(_CODE_SPAN.sub("code", line)):
            found.add(match.group(1) or match.group(2))
    return found


def link_targets(text: str) -> list[tuple[int, str]]:
    """(line number, target) of every link, image, reference definition and HTML src / href."""
    targets = []
    for number, line in enumerate(prose_lines(text), start=1):
        for match in _INLINE_LINK.finditer(line):
            targets.append((number, match.group(1)))
        definition = _REFERENCE_DEFINITION.match(line)
        if definition:
            targets.append((number, definition.group(1)))
        targets.extend((number, match.group(1)) for match in _HTML_ATTRIBUTE.finditer(line))
    return [(number, target[1:-1] if target.startswith("<") else target) for number, target in targets]


def git_ignored(path: Path, root: Path) -> bool:
    """Whether git ignores ``path`` in the checkout at ``root`` (False where there is no git checkout)."""
    if not (root / ".git").exists() or shutil.which("git") is None:
        return False
    result = subprocess.run(["git", "-C", str(root), "check-ignore", "-q", str(path)], capture_output=True)
    return result.returncode == 0


def broken_links(markdown: Path, root: Path = REPO) -> list[str]:
    """One line per link of ``markdown`` that would not resolve on the repository's web page."""
    text = markdown.read_text(encoding="utf-8")
    where = markdown.relative_to(root)
    problems = []
    for number, target in link_targets(text):
        scheme = _SCHEME.match(target)
        if scheme:
            if scheme.group(0)[:-1].lower() not in WEB_SCHEMES:
                problems.append(f"{where}:{number}: {target}: not a relative path or a web address")
            continue
        path_part, _, fragment = target.partition("#")
        if path_part.startswith("/"):
            problems.append(f"{where}:{number}: {target}: absolute path, resolves against the host on the web page")
            continue
        resolved = (markdown.parent / unquote(path_part)).resolve() if path_part else markdown.resolve()
        if not resolved.is_relative_to(root.resolve()):
            problems.append(f"{where}:{number}: {target}: outside the repository")
            continue
        if not resolved.exists():
            problems.append(f"{where}:{number}: {target}: no such file")
            continue
        if git_ignored(resolved, root):
            problems.append(f"{where}:{number}: {target}: ignored by git, so not in the repository")
            continue
        if fragment and resolved.suffix == ".md":
            if unquote(fragment) not in anchors(resolved.read_text(encoding="utf-8")):
                problems.append(f"{where}:{number}: {target}: no heading or anchor #{fragment} in {resolved.name}")
    return problems


@pytest.mark.parametrize("markdown", documentation_files(), ids=lambda path: str(path.relative_to(REPO)))
def test_every_relative_link_resolves(markdown):
    assert markdown.exists(), f"{markdown} is missing"
    problems = broken_links(markdown)
    assert not problems, "dead links:\n" + "\n".join(problems)


def test_the_readme_links_every_page_of_docs():
    """A page nobody links to is a page nobody finds from the repository's front page."""
    linked = {
        (REPO / target.partition("#")[0]).resolve()
        for _, target in link_targets((REPO / "README.md").read_text(encoding="utf-8"))
        if not _SCHEME.match(target)
    }
    unlinked = [page.name for page in sorted((REPO / "docs").glob("*.md")) if page.resolve() not in linked]
    assert not unlinked, f"docs pages the README does not link: {unlinked}"


def test_github_slugs_of_headings():
    # hand-slugged as GitHub renders them: punctuation dropped, code text kept, spaces to hyphens
    assert github_slug("Measured on GPU (NVIDIA H100 80GB HBM3, torch 2.11.0+cu130, triton 3.6.0, 2026-11-26)") == (
        "measured-on-gpu-nvidia-h100-80gb-hbm3-torch-2110cu130-triton-360-2026-11-26")
    assert github_slug("9. Metrics of a step (`algorithm/diagnostics.py`, `metrics.py`)") == (
        "9-metrics-of-a-step-algorithmdiagnosticspy-metricspy")
    assert github_slug("The embedded default's learning check over seeds") == "the-embedded-defaults-learning-check-over-seeds"
    assert github_slug("GPUs and Slurm: quick start") == "gpus-and-slurm-quick-start"
    assert github_slug("See [the docs](docs/x.md) now") == "see-the-docs-now"
    text = "# Setup\n\n## Setup\n\n```\n# not a heading\n```\n<a name=\"custom\"></a>\n"
    assert anchors(text) == {"setup", "setup-1", "custom"}
    # a heading that already slugs to "a-1" pushes the second "a" on to "a-2"
    assert anchors("# a\n# a-1\n# a\n") == {"a", "a-1", "a-2"}


def test_broken_links_are_reported(tmp_path):
    """The checker fails on each kind of dead link and passes the live ones beside them."""
    (tmp_path / "docs" / "images").mkdir(parents=True)
    (tmp_path / "docs" / "images" / "curve.png").write_bytes(b"\x89PNG")
    (tmp_path / "docs" / "guide.md").write_text("# Guide\n\n## Install, convert, train\n\n[back](../README.md#top-section)\n")
    (tmp_path / "README.md").write_text(
        "# Top section\n\n"
        "[guide](docs/guide.md) [its section](docs/guide.md#install-convert-train) ![curve](docs/images/curve.png)\n"
        "[web](https://example.org/x) [here](#top-section)\n"
        "[gone](docs/missing.md)\n"
        "![no picture](docs/images/missing.png)\n"
        "[no such heading](docs/guide.md#install)\n"
        "[absolute](/docs/guide.md)\n"
        "[outside](../elsewhere.md)\n"
        "[not here](#nowhere)\n"
        "<img src=\"docs/images/gone.png\">\n"
        "`[shown as code](docs/not_a_link.md)`\n"
        "```\n[in a code block](docs/not_a_link_either.md)\n```\n"
    )
    assert broken_links(tmp_path / "README.md", root=tmp_path) == [
        "README.md:5: docs/missing.md: no such file",
        "README.md:6: docs/images/missing.png: no such file",
        "README.md:7: docs/guide.md#install: no heading or anchor #install in guide.md",
        "README.md:8: /docs/guide.md: absolute path, resolves against the host on the web page",
        "README.md:9: ../elsewhere.md: outside the repository",
        "README.md:10: #nowhere: no heading or anchor #nowhere in README.md",
        "README.md:11: docs/images/gone.png: no such file",
    ]
    assert broken_links(tmp_path / "docs" / "guide.md", root=tmp_path) == []


def test_links_to_files_git_ignores_are_reported(tmp_path):
    """A run's output exists where it was made, but not in the repository the web page shows."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / ".gitignore").write_text("runs/\n")
    (tmp_path / "runs" / "tiny_cpu").mkdir(parents=True)
    (tmp_path / "runs" / "tiny_cpu" / "curves.png").write_bytes(b"\x89PNG")
    (tmp_path / "README.md").write_text("![curves](runs/tiny_cpu/curves.png)\n")
    assert broken_links(tmp_path / "README.md", root=tmp_path) == [
        "README.md:1: runs/tiny_cpu/curves.png: ignored by git, so not in the repository"]
