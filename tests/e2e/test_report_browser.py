"""`rayattr report` rendered by a real browser: headless Chromium loads the pages of a small per-token TrackStar
run, and the tests read the DOM it dumps (queries listed, proponent texts, token spans coloured by their score)
and keep a screenshot. Chromium missing is a failure, not a skip: CI installs it (.ci/run)."""

from __future__ import annotations

import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import lancedb
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from rayattr.cli import app
from rayattr.report.html import NEGATIVE, POSITIVE
from rayattr.store import TOKEN_SCORES, ScoreTable, read_topk

runner = CliRunner()
QUERIES, K = 3, 4
VOID = {"meta", "br", "img", "input", "link", "hr", "col", "source", "wbr"}


class Element:
    def __init__(self, tag: str, attrs: dict[str, str]) -> None:
        self.tag, self.attrs, self.text = tag, attrs, ""

    @property
    def classes(self) -> set[str]:
        return set(self.attrs.get("class", "").split())


class Dom(HTMLParser):
    """Every element of a page with its attributes and its whole text (textContent), in document order."""

    def __init__(self, markup: str) -> None:
        super().__init__()
        self.elements: list[Element] = []
        self.open: list[Element] = []
        self.feed(markup)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        element = Element(tag, {name: value or "" for name, value in attrs})
        self.elements.append(element)
        if tag not in VOID:
            self.open.append(element)

    def handle_endtag(self, tag: str) -> None:
        while self.open and self.open.pop().tag != tag:
            pass

    def handle_data(self, data: str) -> None:
        for element in self.open:
            element.text += data

    def find(self, tag: str, cls: str | None = None, **attrs: str) -> list[Element]:
        return [e for e in self.elements if e.tag == tag and (cls is None or cls in e.classes)
                and all(e.attrs.get(name) == value for name, value in attrs.items())]

    def within(self, outer: Element, tag: str, cls: str | None = None) -> list[Element]:
        """Elements after ``outer`` up to the next element of ``outer``'s tag (a table's rows, a row's cells)."""
        start = self.elements.index(outer) + 1
        end = next((i for i in range(start, len(self.elements)) if self.elements[i].tag == outer.tag),
                   len(self.elements))
        return [e for e in self.elements[start:end] if e.tag == tag and (cls is None or cls in e.classes)]


def chromium(*args: str) -> subprocess.CompletedProcess:
    browser = shutil.which("chromium")
    if browser is None:
        pytest.fail("chromium is not installed: `apt-get install -y chromium` (.ci/run installs it before the tests)")
    return subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", *args], capture_output=True,
                          text=True, timeout=120, check=True)


def rendered(page: Path, profile: Path) -> Dom:
    """The DOM Chromium holds after loading ``page``."""
    return Dom(chromium(f"--user-data-dir={profile}", "--dump-dom", page.as_uri()).stdout)


@pytest.fixture(scope="module")
def run(offline_fixture, ray_session, tmp_path_factory) -> str:
    """TrackStar with per-token scores on 32 training documents and 3 queries (untrained model, tiny projection)."""
    path = str(tmp_path_factory.mktemp("report") / "run")
    result = runner.invoke(app, [
        "trackstar", path, "--model", str(offline_fixture.neox), "--dataset", str(offline_fixture.train),
        "--split", "train[:32]", "--query-dataset", str(offline_fixture.queries), "--query-split", f"train[:{QUERIES}]",
        "--query-prompt-column", "prompt", "--query-completion-column", "completion", "--projection-dim", "4",
        "--no-mix", "--per-token", "--top-k", "8",
    ])
    assert result.exit_code == 0, result.output
    return path


def colour(style: str) -> tuple[int, int, int]:
    red, green, blue = map(int, re.fullmatch(r"background: rgb\((\d+), (\d+), (\d+)\)", style).groups())
    return red, green, blue


def test_report_in_chromium(run, offline_fixture, tmp_path):
    written = runner.invoke(app, ["report", run, "--k", str(K)])
    assert written.exit_code == 0, written.output
    index = Path(run) / "report" / "index.html"
    assert str(index) in " ".join(written.output.split())
    profile = tmp_path / "chromium"

    summary = rendered(index, profile)
    queries = summary.find("tr", "query")
    assert len(queries) == QUERIES
    settings = summary.find("table", id="settings")[0].text
    assert "TrackStar" in settings and "per-token scores" in settings and "neox" in settings
    steps = summary.within(summary.find("table", id="steps")[0], "tr")[1:-1]  # under the header, above the total
    assert [summary.within(step, "td")[0].text for step in steps] == ["index_stats", "query", "score"]

    top, _ = read_topk(run)
    texts = pq.read_table(offline_fixture.train, columns=["text"]).column("text").to_pylist()
    tokens = ScoreTable.open(run, TOKEN_SCORES)
    link = summary.within(queries[0], "a")[0].attrs["href"]
    page = rendered(index.parent / link, profile)
    query = pq.read_table(offline_fixture.queries).slice(0, 1).to_pylist()[0]
    assert page.find("div", "query-text")[0].text == query["prompt"] + query["completion"]
    assert page.find("mark", "completion")[0].text == query["completion"]
    proponents = page.within(page.find("table", id="proponents")[0], "tr", "example")
    assert [int(row.attrs["data-id"]) for row in proponents] == top.ids[0, :K].tolist()
    assert len(page.within(page.find("table", id="opponents")[0], "tr", "example")) == K
    for row in proponents:
        doc = int(row.attrs["data-id"])
        assert texts[doc] in row.text  # the document, whole, from its token spans
        spans = [s for s in page.within(row, "span", "tok") if "data-score" in s.attrs]
        scored = tokens.table.count_rows(f"id = {doc}")
        assert len(spans) == scored > 0  # every token but the last has a score
    spans = [s for s in page.find("span", "tok") if "data-score" in s.attrs]
    scale = max(abs(float(s.attrs["data-score"])) for s in spans)
    for span in spans:
        score, (red, green, blue) = float(span.attrs["data-score"]), colour(span.attrs["style"])
        assert float(span.attrs["title"].split(": ")[1]) == pytest.approx(score, rel=1e-3)  # the score on hover
        end = POSITIVE if score > 0 else NEGATIVE
        expected = [round(255 + (c - 255) * abs(score) / scale) for c in end]
        assert max(abs(a - b) for a, b in zip((red, green, blue), expected)) <= 1
        assert (red > blue) == (score > 0) or abs(score) < 0.02 * scale  # red for positive, blue for negative
    assert min(float(s.attrs["data-score"]) for s in spans) < 0 < scale  # both ends of the scale are in use
    assert page.find("svg", "histogram") and len(page.find("rect", "bar")) == 40

    screenshot = tmp_path / "report.png"
    chromium(f"--user-data-dir={profile}", f"--screenshot={screenshot}", "--window-size=1200,900",
             (index.parent / link).as_uri())
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and screenshot.stat().st_size > 20_000


def test_report_without_token_scores_has_no_heatmap(run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("report"))
    lancedb.connect(str(copy)).drop_table(TOKEN_SCORES)
    out = tmp_path / "report"
    written = runner.invoke(app, ["report", str(copy), "--out", str(out), "--k", "2", "--queries", "2"])
    assert written.exit_code == 0, written.output
    assert sorted(p.name for p in (out / "queries").iterdir()) == ["0.html", "1.html"]
    page = Dom((out / "queries" / "0.html").read_text())
    assert not page.find("span", "tok") and not page.find("div", "heatmap") and not page.find("div", "legend")
    assert len(page.find("tr", "example")) == 4 and all(row.text.strip() for row in page.find("div", "doc"))


def test_report_of_a_score_run_reads_the_config_it_was_made_from(run, offline_fixture, tmp_path):
    model, train, queries = str(offline_fixture.neox), str(offline_fixture.train), str(offline_fixture.queries)
    reduced = runner.invoke(app, ["reduce", str(tmp_path / "query"), "--model", model, "--dataset", queries, "--split",
                                  "train[:2]", "--prompt-column", "prompt", "--completion-column", "completion",
                                  "--aggregation", "none", "--projection-dim", "4"])
    assert reduced.exit_code == 0, reduced.output
    config, scores = tmp_path / "score.yaml", str(tmp_path / "scores")
    saved = runner.invoke(app, ["score", scores, "--model", model, "--dataset", train, "--split", "train[40:56]",
                                "--query-path", str(tmp_path / "query"), "--projection-dim", "4",
                                "--save-config", str(config)])
    assert saved.exit_code == 0, saved.output
    assert runner.invoke(app, ["run", str(config)]).exit_code == 0
    refused = runner.invoke(app, ["report", scores])
    assert refused.exit_code == 1 and "pass --run-config CONFIG.yaml" in " ".join(refused.output.split())
    written = runner.invoke(app, ["report", scores, "--run-config", str(config), "--k", "3"])
    assert written.exit_code == 0, written.output
    index = Dom((Path(scores) / "report" / "index.html").read_text())
    prompts = pq.read_table(queries).column("prompt").to_pylist()
    assert [prompts[i] in row.text for i, row in enumerate(index.find("tr", "query"))] == [True, True]
    texts = pq.read_table(train, columns=["text"]).column("text").to_pylist()
    page = Dom((Path(scores) / "report" / "queries" / "1.html").read_text())
    rows = page.find("tr", "example")
    assert len(rows) == 6 and all(40 <= int(row.attrs["data-id"]) < 56 for row in rows)
    assert all(texts[int(row.attrs["data-id"])] in row.text for row in rows)
