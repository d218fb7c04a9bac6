"""The README's op x scheme table is what the lifting actually does.

``scripts/lifting_matrix.py`` runs every op (as a one-rule conversion) over data generated in
every shipped scheme through ``check_program`` (laws 1-4 and 6) and renders the table; this test
regenerates it and compares it with the README's copy, so the documented refusals are real and
every "exact" cell passed its round trips."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_readme_lifting_matrix_is_current() -> None:
    spec = importlib.util.spec_from_file_location("lifting_matrix",
                                                  ROOT / "scripts" / "lifting_matrix.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    ops, table = module.matrix()
    rendered = re.sub(r" \(group [^)]*\)", "", module.render(ops, table, True))
    readme = (ROOT / "README.md").read_text()
    start = readme.index("<!-- lifting-matrix:start -->\n") + len("<!-- lifting-matrix:start -->\n")
    end = readme.index("<!-- lifting-matrix:end -->")
    assert readme[start:end] == rendered, "README table is stale: rerun scripts/lifting_matrix.py"
    # the known refusals: interleaving rows through 128-row block scales needs requantizing
    assert table["deepseek_fp8_block"]["interleave"].startswith("interleave(0) moves rows")
    assert sum(v == "exact" for row in table.values() for v in row.values()) >= 7 * 20 - 3
