"""The docs stay usable: every relative link resolves, and no product file carries project history."""

import csv
import pathlib
import re
import subprocess
import urllib.parse

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PRODUCT = ("README.md", "docs", "configs", "sage_opd_jax", "benchmarks", "experiments", "tests", "setup.py",
           ".ci/run")
_BINARY = (".png", ".jpg", ".jpeg", ".gif", ".pdf", ".npz", ".npy", ".safetensors", ".msgpack")

# Each names a work period, an issue number or a machine path, none of which a user can follow.
# (The examples below are f-strings, so that this file does not match what it looks for.)
HISTORY = (
    re.compile(r"[Ss]essions?[ -][0-9]"),  # A work period and its number.
    re.compile(r"\(s(?:1|2)?[0-9]\)"),  # Its short label; code's "(s32)" is a variable.
    re.compile(r"\(#[0-9]+\)"),  # An issue number in brackets,
    re.compile(r"#[0-9]+'s"),  # as a possessive,
    # or in prose: at most 4 digits, so a hex colour (#1f77b4, #123456) passes; not after a word
    # character, "&" or "/" (an anchor, an HTML entity, a URL fragment).
    re.compile(r"(?<![\w&/])#[0-9]{1,4}\b"),
    re.compile(r"METHOD\.md"),  # The spec users have is docs/method.md.
    re.compile(r"/(?:root|work)/"),  # Machine paths.
)


def _product_files():
  """Every tracked or new (not ignored) text file of the product."""
  try:
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "--", *PRODUCT],
                            cwd=REPO, capture_output=True, text=True, check=True).stdout.splitlines()
  except (OSError, subprocess.CalledProcessError):
    pytest.skip("not a git checkout: the product's files are the ones git lists")
  return [REPO / name for name in listed if not name.endswith(_BINARY) and (REPO / name).is_file()]


def history_hits(text):
  """(line number, line) of every line that matches a HISTORY pattern."""
  return [(n, line) for n, line in enumerate(text.splitlines(), 1) if any(p.search(line) for p in HISTORY)]


@pytest.mark.parametrize("text, caught", [
    (f"measured in session {22}", True),
    (f"Sessions {17}-18 ran it", True),
    (f"its session-{13} subsection", True),
    (f"figures marked (s{12})", True),
    (f"the issue's target (#{7})", True),
    (f"#{7}'s figure", True),
    (f"so the #{7} step targets are met", True),
    (f"see {'METHOD'}.md section 4", True),
    (f"--workdir=/{'root'}/x", True),
    (f'export ALFWORLD_DATA="$(/{"work"}/shared/alfworld/unpack)"', True),
    ("color='#1f77b4'", False),
    ("color='#123456'", False),
    ("[the table](docs/results.md#headline-1)", False),
    ("### 2. Equations", False),
    ("def pytest_sessionstart(session):", False),
    ("value, grad = jax.value_and_grad(f)(s32)", False),
    ("&#8212; an HTML dash", False),
])
def test_history_patterns_catch_history_and_pass_what_code_needs(text, caught):
  assert bool(history_hits(text)) == caught


def test_no_product_file_names_a_work_period_an_issue_or_a_machine_path():
  files = _product_files()
  assert any(f.name == "README.md" for f in files) and any(f.suffix == ".py" for f in files)  # It scans something.
  hits = [f"{f.relative_to(REPO)}:{n}: {line.strip()}"
          for f in files for n, line in history_hits(f.read_text(encoding="utf-8", errors="replace"))]
  assert not hits, "\n".join(hits)


_FENCE = re.compile(r"^ {0,3}(```|~~~).*?^ {0,3}\1", re.M | re.S)
_CODE_SPAN = re.compile(r"(`+).+?\1", re.S)
_INLINE = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+[\"'(][^)]*)?\)")  # [text](path "title"), images too.
_REFERENCE = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.M)  # [label]: path


def relative_links(markdown):
  """The relative targets of a markdown text's links and images, without #anchors; code is no link."""
  text = _CODE_SPAN.sub("", _FENCE.sub("", markdown))
  targets = []
  for target in _INLINE.findall(text) + _REFERENCE.findall(text):
    if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):  # http(s), mailto, anchors.
      continue
    targets.append(urllib.parse.unquote(target.split("#", 1)[0]))
  return targets


def broken_links(path):
  """The relative links of the markdown file `path` whose file or folder does not exist."""
  return [t for t in relative_links(path.read_text(encoding="utf-8")) if not (path.parent / t).exists()]


def test_broken_links_are_found(tmp_path):
  (tmp_path / "docs" / "results" / "run").mkdir(parents=True)
  (tmp_path / "docs" / "method.md").write_text("# Method\n")
  page = tmp_path / "docs" / "page.md"
  page.write_text(
      "[method](method.md#e5) and [its folder](results/run/) and ![plot](results/run/plot.png)\n"
      "[web](https://example.com/x.md), [mail](mailto:a@b.c), [here](#method), [gone](notes.md)\n"
      "`[not a link](code.md)`\n```\n[nor this](block.md)\n```\n"
      "[ref]: ../README.md\n")
  assert broken_links(page) == ["results/run/plot.png", "notes.md", "../README.md"]


@pytest.mark.parametrize("page", [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))],
                         ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_relative_link_resolves(page):
  assert not broken_links(page), f"{page.relative_to(REPO)} links to missing files: {broken_links(page)}"


def _readme_results_rows():
  """{row label: {split: cell}} of the README's headline table (the first table under "## Results")."""
  section = (REPO / "README.md").read_text(encoding="utf-8").split("\n## Results", 1)[1].split("\n## ", 1)[0]
  lines = [line for line in section.splitlines() if line.startswith("|")]
  header = [cell.strip() for cell in lines[0].strip("|").split("|")]
  rows = {}
  for line in lines[2:]:
    cells = [cell.strip().strip("*") for cell in line.strip("|").split("|")]
    rows[cells[0]] = dict(zip(header[1:], cells[1:]))
  return rows


def test_readme_headline_table_equals_its_csv():
  section = (REPO / "README.md").read_text(encoding="utf-8").split("\n## Results", 1)[1]
  csv_path = REPO / re.search(r"\]\((docs/results/[^)]+/results\.csv)\)", section).group(1)
  with csv_path.open(newline="") as f:
    by_method = {row["method"]: row for row in csv.DictReader(f)}
  rows = _readme_results_rows()
  checked = 0
  for label, cells in rows.items():
    method = "student (warm start, no distillation)" if label == "student start" else label
    if method not in by_method:
      continue  # A row the CSV does not hold (the README says where it comes from).
    for split, cell in cells.items():
      mean, std = (float(by_method[method][f"{split}/success_{stat}"]) for stat in ("mean", "std"))
      want = f"{mean:.3f}" if int(by_method[method]["seeds"]) == 1 else f"{mean:.3f} ± {std:.3f}"
      assert cell == want, f"README's {label} / {split}: {cell!r}, its CSV {csv_path.name} says {want!r}"
      checked += 1
  # Every method of the CSV is in the README's table, on both splits.
  assert checked == 2 * len(by_method), (sorted(rows), sorted(by_method))
