"""docs/ against the code: every option, config key and metric the code has is documented, and nothing else is.

The option sets come from the real argparse parsers; the TOML keys from the loader's own "allowed: ..." error
messages (fed an unknown key, the loader lists every key it accepts there); the metric names from the collector.
Pure: nothing is started, nothing is written.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from kwatch.cli import build_parser
from kwatch.metrics.exporter import KwatchCollector
from kwatch.metrics.stats import DaemonStats, TargetStats
from kwatch.rules.build import KEYWORDS
from kwatch.rules.tomlconf import parse_toml

DOCS = Path(__file__).resolve().parents[2] / "docs"


def section(doc: str, heading: str) -> str:
    """The text under ``heading`` (a whole heading line, e.g. ``### [runner]``) up to the next heading of any level."""
    text = (DOCS / doc).read_text()
    lines = text.split("\n")
    try:
        start = lines.index(heading)
    except ValueError:
        pytest.fail(f"docs/{doc} has no heading {heading!r}")
    out: list[str] = []
    for line in lines[start + 1 :]:
        if line.startswith("#"):
            break
        out.append(line)
    return "\n".join(out)


def table_column(text: str, column: int) -> list[str]:
    """Cells of one column of the Markdown tables in ``text`` (header and rule rows left out)."""
    cells: list[str] = []
    for line in text.split("\n"):
        if not line.startswith("|") or set(line) <= set("|-: "):
            continue
        row = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]
        cells.append(row[column] if column < len(row) else "")
    return cells[1:]  # the header row


def code_words(cells: list[str]) -> set[str]:
    """The first word of every `code span` in the cells."""
    return {m.split()[0] for c in cells for m in re.findall(r"`([^`]+)`", c)}


# -- command-line options ------------------------------------------------------------------------------------------


def subparser(name: str) -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    parser: argparse.ArgumentParser = sub.choices[name]
    return parser


def options_of(name: str) -> set[str]:
    return {o for a in subparser(name)._actions for o in a.option_strings if o not in ("-h", "--help")}


@dataclass(frozen=True)
class CommandCase:
    command: str
    heading: str


COMMANDS = [
    CommandCase("trace", "### `kwatch trace`"),
    CommandCase("run", "### `kwatch run`"),
    CommandCase("agent", "### `kwatch agent`"),
    CommandCase("doctor", "### `kwatch doctor`"),
    CommandCase("replicate", "## Replication options"),
]


@pytest.mark.parametrize("case", COMMANDS, ids=[c.command for c in COMMANDS])
def test_command_options_documented(case: CommandCase) -> None:
    documented = {w for w in code_words(table_column(section("config.md", case.heading), 0)) if w.startswith("-")}
    assert documented == options_of(case.command), (
        f"docs/config.md {case.heading}: missing {sorted(options_of(case.command) - documented)}, "
        f"not in the code {sorted(documented - options_of(case.command))}"
    )


def test_check_config_has_no_options() -> None:
    assert options_of("check-config") == set(), "docs/config.md says `kwatch check-config` takes no options"


def test_every_command_has_a_section() -> None:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name in sub.choices:
        section("config.md", f"### `kwatch {name}`")


# -- TOML keys, as the loader itself lists them ----------------------------------------------------------------------


def allowed_keys(toml: str) -> set[str]:
    """The keys the loader accepts where ``bogus_key`` stands in ``toml``, from its "unknown key" error."""
    _, errors = parse_toml(toml, "t.toml")
    for e in errors:
        m = re.search(r"'bogus_key'.*?(?:allowed|known): ([^()]*)\)?$", e.reason)
        if m:
            return set(m.group(1).split(", "))
    raise AssertionError(f"no 'unknown key' error for bogus_key in {toml!r}: {[str(e) for e in errors]}")


RULE = "match = '^/x/'\non = ['ANY']\nrun = 'true'\n"


@dataclass(frozen=True)
class TomlCase:
    name: str
    toml: str
    heading: str
    #: keys the page documents in the row "option keys" instead of one row each
    option_keys: bool = False


TOML_CASES = [
    TomlCase("top level", "bogus_key = 1\n", "### Top level"),
    TomlCase("runner", "[runner]\nbogus_key = 1\n", "### [runner]"),
    TomlCase("defaults", "[defaults]\nbogus_key = 1\n", "### [defaults], and option keys of a rule or an action"),
    TomlCase("ruleset", "[[ruleset]]\nbogus_key = 1\n", "### [[ruleset]]"),
    TomlCase("process", "[[ruleset]]\n[ruleset.process]\nbogus_key = 1\n", "### [ruleset.process]"),
    TomlCase("rule", f"[[rule]]\n{RULE}bogus_key = 1\n", "### [[ruleset.rule]] and [[rule]]", option_keys=True),
    TomlCase("action", "[[rule]]\nmatch = '^/x/'\n[[rule.action]]\non = ['ANY']\nrun = 'true'\nbogus_key = 1\n",
             "### [[ruleset.rule.action]]", option_keys=True),
]


@pytest.mark.parametrize("case", TOML_CASES, ids=[c.name for c in TOML_CASES])
def test_toml_keys_documented(case: TomlCase) -> None:
    code = allowed_keys(case.toml)
    if case.option_keys:  # "option keys": every key of [defaults] that the code allows here
        defaults = allowed_keys(TOML_CASES[2].toml)
        code -= defaults
    documented = code_words(table_column(section("config.md", case.heading), 0))
    assert documented == code, f"{case.heading}: missing {sorted(code - documented)}, extra {sorted(documented - code)}"


def test_replicate_keys_documented() -> None:
    code = allowed_keys("[[replicate]]\nsource = '/x'\ntarget = '/y'\nbogus_key = 1\n") | {"target"}
    assert code >= {"source", "target", "delete", "exclude"}, code  # the error listed the keys, not something else
    documented = code_words(table_column(section("config.md", "## Replication options"), 1))
    assert documented == code, f"missing {sorted(code - documented)}, extra {sorted(documented - code)}"


def test_changedfiles_keywords_documented() -> None:
    documented = code_words(table_column(section("config.md", "### Keywords"), 0))
    assert documented == set(KEYWORDS)


# -- metrics ------------------------------------------------------------------------------------------------------


def exported_names() -> set[str]:
    """What /metrics shows for each family: counters get ``_total`` (prometheus_client adds it)."""
    stats = DaemonStats()
    stats.targets["t"] = TargetStats("t")
    names = set()
    for fam in KwatchCollector(stats).collect():
        names.add(fam.name + "_total" if fam.type == "counter" else fam.name)
    return names


def test_metrics_documented() -> None:
    documented = code_words(table_column((DOCS / "metrics.md").read_text(), 0))
    documented = {w for w in documented if w.startswith("kwatch_")}
    code = exported_names()
    assert documented == code, f"docs/metrics.md: missing {sorted(code - documented)}, extra {sorted(documented - code)}"


# -- the checks themselves can fail -------------------------------------------------------------------------------


def test_table_reader_sees_a_missing_row() -> None:
    text = "| option | meaning |\n|---|---|\n| `--a X` | a |\n| `-b`, `--bee` | b |\n"
    assert code_words(table_column(text, 0)) == {"--a", "-b", "--bee"}
    assert code_words(table_column(text, 0)) != {"--a", "-b", "--bee", "--new"}


# -- benchmarks: `make bench` rewrites docs/benchmarks.md, never the README ------------------------------------------

SUITE_MARKERS = ["capture", "replicate", "rsync", "startup"]


@pytest.mark.parametrize("suite", SUITE_MARKERS)
def test_bench_sections_live_in_benchmarks_md(suite: str) -> None:
    from bench.report import BENCH_DOC

    start, end = f"<!-- bench:{suite}:start -->", f"<!-- bench:{suite}:end -->"
    assert BENCH_DOC == DOCS / "benchmarks.md"
    text = BENCH_DOC.read_text()
    assert text.count(start) == 1 and text.count(end) == 1 and text.index(start) < text.index(end)
    assert start not in (DOCS.parent / "README.md").read_text(), "the README keeps a short hand-written table only"


def test_bench_update_section_rewrites_only_between_markers(tmp_path: Path) -> None:
    from bench.report import update_section

    doc = tmp_path / "benchmarks.md"
    doc.write_text("# hand\n<!-- bench:x:start -->\nold\n<!-- bench:x:end -->\nhand too\n")
    msg = update_section("new table\n", "<!-- bench:x:start -->", "<!-- bench:x:end -->", doc)
    assert doc.read_text() == "# hand\n<!-- bench:x:start -->\nnew table\n<!-- bench:x:end -->\nhand too\n", msg
    assert "not written" in update_section("t", "<!-- bench:y:start -->", "<!-- bench:y:end -->", doc)
    assert "new table" in doc.read_text()


# -- links between the pages -------------------------------------------------------------------------------------

#: written on another branch at the same time as these pages; a link to it may precede the file
NOT_YET_HERE = {"threat-model.md"}


def anchors(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces as hyphens."""
    out = set()
    for line in page.read_text().split("\n"):
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            out.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return out


PAGES = [DOCS.parent / "README.md", *sorted(DOCS.glob("*.md"))]


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_links_resolve(page: Path) -> None:
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
        if "://" in target:
            continue
        file, _, anchor = target.partition("#")
        path = (page.parent / file).resolve() if file else page
        if not path.exists():
            if path.name not in NOT_YET_HERE:
                broken.append(target)
            continue
        if anchor and path.suffix == ".md" and anchor not in anchors(path):
            broken.append(target)
    assert not broken, f"{page.name}: broken links {broken}"
