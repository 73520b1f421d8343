"""docs/results.md reports what the files in results/ hold.

Every table row of the page that names a run folder (a backticked ``results/...`` path with a
``result.json``) must show that file's test score, validation score and seconds per meta-step as the
page rounds them, and say "shipped" exactly when the folder ships ``meta_params.pt``. The summary
table at the top must agree with the settings' tables, and every finished run of a setting folder
must have its row.
"""

import json
import re
from pathlib import Path

import pytest

import fewshot

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "results.md"
SETTINGS = {"5-way 1-shot": None, "5-way 5-shot": "omniglot-5w5s-2000",
            "20-way 1-shot": "omniglot-20w1s-2000",
            "20-way 5-shot": "omniglot-20w5s-2000"}
SCORE_RE = re.compile(r"(\d+\.\d\d) \+- (\d+\.\d\d)")
FOLDER_RE = re.compile(r"`(results/[\w./-]+)`")


def cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def tables(text: str):
    """``(section, header, rows)`` of every table; ``section`` is the last ``## `` heading above it."""
    found, section, lines = [], None, text.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith("## "):
            section = lines[i][3:].strip()
        if lines[i].startswith("|") and i + 1 < len(lines) and lines[i + 1].startswith("| ---"):
            header, rows = cells(lines[i]), []
            i += 2
            while i < len(lines) and lines[i].startswith("|"):
                rows.append(cells(lines[i]))
                i += 1
            found.append((section, header, rows))
            continue
        i += 1
    return found


def score(cell: str):
    match = SCORE_RE.search(cell)
    return None if match is None else (float(match[1]), float(match[2]))


def row_test_score(named: dict):
    """The test score of a row: the "test" column, or "test, tuned" in the 5-way 1-shot table."""
    return score(next(named[k] for k in ("test", "test, tuned") if k in named))


def run_rows():
    """``(section, method, columns, folder)`` of every row naming a run folder with a result.json."""
    rows = []
    for section, header, body in tables(PAGE.read_text()):
        for row in body:
            named = dict(zip(header, row))
            folders = FOLDER_RE.findall(named.get("folder", ""))
            if folders and (ROOT / folders[0] / "result.json").is_file():
                rows.append((section, row[0], named, ROOT / folders[0]))
    return rows


def test_the_page_has_a_row_for_each_run_it_names():
    assert len(run_rows()) >= 19


@pytest.mark.parametrize("section, method, named, folder",
                         [pytest.param(*row, id=f"{row[0]}:{row[1]}") for row in run_rows()])
def test_each_row_shows_its_result_file(section, method, named, folder):
    result = json.loads((folder / "result.json").read_text())
    assert result["method"] == method.strip("*")
    assert row_test_score(named) == (round(100 * result["score_mean"], 2),
                                     round(100 * result["score_ci95"], 2))
    if result.get("val_score_mean") is not None:
        assert score(named["validation"]) == (round(100 * result["val_score_mean"], 2),
                                              round(100 * result["val_score_ci95"], 2))
    step = named["s / step"]
    assert float(step.split()[0]) == round(result["s_per_step"], 2)
    assert ("(2 threads)" in step) == (result["threads"] == 2)  # one thread unless the row says so
    assert ("(shipped)" in named["folder"]) == (folder / "meta_params.pt").is_file()


def test_every_finished_run_of_a_setting_has_its_row():
    named = {folder for *_, folder in run_rows()}
    for name in filter(None, SETTINGS.values()):
        for result in (ROOT / "results" / name).glob("*/result.json"):
            assert result.parent in named, f"{result.parent.relative_to(ROOT)} has no row in docs/results.md"


def test_the_summary_agrees_with_the_settings_tables():
    by_setting = {}
    for section, method, named, _ in run_rows():
        if section in SETTINGS:
            by_setting.setdefault(section, {})[method.strip("*")] = row_test_score(named)
    section, header, body = tables(PAGE.read_text())[0]
    assert section == "The four settings at a glance" and header[1:] == list(SETTINGS)
    solvers = [row for row in body if row[0] in fewshot.SOLVERS]
    assert len(solvers) == len(fewshot.SOLVERS)
    for row in solvers:
        for setting, cell in zip(SETTINGS, row[1:]):
            assert score(cell) == by_setting.get(setting, {}).get(row[0]), (row[0], setting)
    for setting, scores in by_setting.items():
        best = max(scores.values())
        column = 1 + list(SETTINGS).index(setting)
        bold = [row[0] for row in solvers if row[column].startswith("**")]
        assert bold == [m for m, s in scores.items() if s == best], f"{setting}: bold is not the best"
