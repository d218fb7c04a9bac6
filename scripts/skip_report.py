#!/usr/bin/env python
"""Explain every skip of the differential suite (tests/integration/test_all_architectures.py).

Runs the suite with pytest (``-rs -q -p no:cacheprovider``, plus ``--junitxml`` for the outcome of
every test; about 4 minutes on 2 cores; the ``transformers_slow`` cases run by default, they are
only deselected with ``-m "not transformers_slow"``), reads the skip reasons, and prints markdown:

- default: the skips grouped into categories, one line per category with its count and 2-3
  example classes. A category is the reason with the class-specific parts normalised out: class
  names of transformers (``Qwen2Config``, ``LlamaForCausalLM`` -> ``<Class>``), the registry keys
  in ``(mapping ...)`` and ``not served (...)``, quoted state dict keys (``'model.x.weight'`` ->
  ``'<key>'``) and numbers (``N``). A table of the skip sites (the ``pytest.skip`` call of the test
  that gave the reason) comes first.
- ``--per-class``: a table class -> outcome of each of the two tests -> reason.

The totals are cross-checked: the skips of the junit report must add up to the counts of the
``-rs`` lines and to pytest's closing line.

    .venv/bin/python scripts/skip_report.py --keep /tmp/skips > /tmp/skip_report.md
    .venv/bin/python scripts/skip_report.py --from /tmp/skips --per-class > per_class.md
"""

from __future__ import annotations

import argparse
import functools
import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEST_FILE = "tests/integration/test_all_architectures.py"
TESTS = {"test_apply_of_saved_files_equals_from_pretrained": "apply",
         "test_revert_of_memory_equals_saved_files": "revert"}

# The skip sites of the test file, by the start of their reason (most specific first).
SITES = (
    ("cannot instantiate from a shrunk default config", "cannot build the tiny model"),
    ("transformers converts nothing for this class", "transformers converts nothing"),
    ("cannot save the model of a shrunk default config", "cannot save the tiny model"),
    ("transformers does not load", "transformers does not load its own save"),
    ("not served (", "documented gap (GAPS)"),
    ("no shipped rule serves", "no shipped rule serves the class"),
)


@dataclass
class Case:
    cls: str
    test: str  # "apply" / "revert"
    outcome: str  # passed / skipped / failed / error
    reason: str = ""


# --- running and reading ----------------------------------------------------------------------


def run_pytest(out_dir: Path, extra: list[str]) -> None:
    cmd = [sys.executable, "-m", "pytest", TEST_FILE, "-rs", "-q", "-p", "no:cacheprovider",
           f"--junitxml={out_dir / 'junit.xml'}", *extra]
    print(f"running: {' '.join(cmd)}", file=sys.stderr)
    with open(out_dir / "pytest.out", "w") as f:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, check=False)
    if proc.returncode not in (0, 1):  # 1: some test failed; the report still says which
        tail = (out_dir / "pytest.out").read_text()[-2000:]
        sys.exit(f"pytest exited {proc.returncode}:\n{tail}")


def read_junit(path: Path) -> list[Case]:
    cases = []
    for tc in ET.parse(path).getroot().iter("testcase"):
        m = re.fullmatch(r"(\w+)\[(.+)\]", tc.get("name", ""))
        if not m or m.group(1) not in TESTS:
            continue
        test, cls = TESTS[m.group(1)], m.group(2)
        skipped, failure = tc.find("skipped"), tc.find("failure")
        error = tc.find("error")
        if skipped is not None:
            cases.append(Case(cls, test, "skipped", skipped.get("message", "")))
        elif failure is not None:
            cases.append(Case(cls, test, "failed", failure.get("message", "")))
        elif error is not None:
            cases.append(Case(cls, test, "error", error.get("message", "")))
        else:
            cases.append(Case(cls, test, "passed"))
    return cases


def read_rs(text: str) -> tuple[int, str]:
    """(skips counted by the -rs lines, pytest's closing line)."""
    total = sum(int(n) for n in re.findall(r"^SKIPPED \[(\d+)\] ", text, re.M))
    closing = next((line.strip("= ") for line in reversed(text.splitlines())
                    if re.search(r"\d+ (passed|skipped|failed)", line)), "")
    return total, closing


# --- categories -------------------------------------------------------------------------------


@functools.cache
def transformers_names() -> frozenset[str]:
    try:
        import transformers
    except ImportError:
        return frozenset()
    return frozenset(n for n in dir(transformers) if n[:1].isupper())


_CAMEL = re.compile(r"\b[A-Z][a-z0-9]+(?:[A-Z][A-Za-z0-9]*)+\b")
_CLASSLIKE = re.compile(r"(Config|Model|Backbone|Encoder|Decoder)$")


def _normalise_class(m: re.Match[str]) -> str:
    """A class of transformers (exported, or named like one) becomes <Class>; other CamelCase
    words (exception types, transform names) stay."""
    word = m.group(0)
    return "<Class>" if word in transformers_names() or _CLASSLIKE.search(word) else word


def normalise(reason: str, cls: str) -> str:
    text = reason.replace(cls, "<Class>")
    text = re.sub(r"\(mapping [^)]*\)", "(mapping <keys>)", text)
    text = re.sub(r"^not served \([^)]*\)", "not served (<key>)", text)
    text = re.sub(r"<class '[\w.]+'>", "<Class>", text)
    text = _CAMEL.sub(_normalise_class, text)
    text = re.sub(r"'[A-Za-z_]\w*(?:\.\w+)+'", "'<key>'", text)  # quoted state dict keys
    text = re.sub(r"(?<![A-Za-z_])\d+(?![A-Za-z_])", "N", text)  # numbers, not inside names
    text = re.sub(r"(?:'<key>', )+'<key>'", "'<key>', ...", text)
    return re.sub(r"\s+", " ", text).strip()


def site(reason: str) -> str:
    for prefix, name in SITES:
        if reason.startswith(prefix):
            return name
    if re.match(r"[a-z0-9_]+: ", reason):
        return "rule file not hub on save (NOT_HUB_ON_SAVE)"
    return "other"


def _cell(text: str, width: int = 400) -> str:
    text = text if len(text) <= width else text[: width - 3] + "..."
    return text.replace("|", "\\|").replace("\n", " ")


def _examples(classes: list[str], n: int = 3) -> str:
    shown = ", ".join(classes[:n])
    return shown + (f" (+{len(classes) - n})" if len(classes) > n else "")


def report(cases: list[Case], rs_total: int | None, closing: str) -> str:
    counts = Counter(c.outcome for c in cases)
    skipped = [c for c in cases if c.outcome == "skipped"]
    lines = [f"# Skips of {TEST_FILE}", ""]
    if closing:
        lines += [f"pytest: `{closing}`", ""]
    lines.append(f"junit: {len(cases)} tests of {len({c.cls for c in cases})} classes: "
                 + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) + ".")
    if rs_total is not None:
        ok = "equal" if rs_total == len(skipped) else "DIFFERENT"
        lines.append(f"Skips counted by the `-rs` lines: {rs_total} ({ok}).")
    lines.append("")

    by_site: dict[str, list[Case]] = defaultdict(list)
    by_cat: dict[tuple[str, str], list[Case]] = defaultdict(list)
    for c in skipped:
        by_site[site(c.reason)].append(c)
        by_cat[(site(c.reason), normalise(c.reason, c.cls))].append(c)

    lines += ["## Skip sites", "", "| skips | classes | site | example classes |",
              "| ---: | ---: | --- | --- |"]
    for name, group in sorted(by_site.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        classes = sorted({c.cls for c in group})
        lines.append(f"| {len(group)} | {len(classes)} | {name} | {_examples(classes)} |")
    lines += ["", "## Categories", "",
              "| skips | classes | site | category (normalised reason) | example classes |",
              "| ---: | ---: | --- | --- | --- |"]
    for (name, cat), group in sorted(by_cat.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        classes = sorted({c.cls for c in group})
        lines.append(f"| {len(group)} | {len(classes)} | {name} | {_cell(cat)} | "
                     f"{_examples(classes)} |")
    lines.append("")
    return "\n".join(lines)


def per_class(cases: list[Case]) -> str:
    by_cls: dict[str, dict[str, Case]] = defaultdict(dict)
    for c in cases:
        by_cls[c.cls][c.test] = c
    lines = [f"# Outcome per class of {TEST_FILE}", "",
             "| class | apply | revert | reason |", "| --- | --- | --- | --- |"]
    for cls in sorted(by_cls):
        row = by_cls[cls]
        reasons = list(dict.fromkeys(c.reason for c in row.values() if c.reason))
        outcome = [row[t].outcome if t in row else "-" for t in ("apply", "revert")]
        lines.append(f"| {cls} | {outcome[0]} | {outcome[1]} | "
                     f"{_cell(' / '.join(reasons), 600)} |")
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--per-class", action="store_true", help="table class -> outcome -> reason")
    ap.add_argument("--keep", type=Path, help="keep the run's junit.xml and pytest.out here")
    ap.add_argument("--from", dest="source", type=Path,
                    help="report on a kept run (a folder with junit.xml and pytest.out)")
    ap.add_argument("pytest_args", nargs="*", help="more pytest arguments (after --)")
    args = ap.parse_args(argv)

    if args.source:
        folder = args.source
    else:
        folder = args.keep or Path(tempfile.mkdtemp(prefix="skip_report_"))
        folder.mkdir(parents=True, exist_ok=True)
        run_pytest(folder, args.pytest_args)
    cases = read_junit(folder / "junit.xml")
    out = folder / "pytest.out"
    rs_total, closing = read_rs(out.read_text()) if out.exists() else (None, "")
    print(per_class(cases) if args.per_class else report(cases, rs_total, closing))
    return 0


if __name__ == "__main__":
    sys.exit(main())
