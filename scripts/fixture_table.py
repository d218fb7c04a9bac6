"""The README's producer x format x architecture table, from a run of the real-fixture tests.

Runs ``tests/integration/test_real_fixtures.py`` with a JUnit XML report and sums each fixture's
results per column: detection, round trip (apply then revert bit-exact, or refused by design
where a fusion would be lossy), dequantization commutes, reload (logits through transformers'
compressed-tensors integration for llm-compressor, vLLM's ModelOpt key/shape expectations for
ModelOpt), and the seed scenario (ModelOpt in-memory -> per-expert export). Fixtures that could not
be produced are listed with the producer's reason from MANIFEST.json.

    .venv/bin/python scripts/fixture_table.py > /tmp/table.md
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = {
    "detect": "test_every_stem_is_detected_as_its_producers_scheme",
    "round trip": "test_apply_then_revert_is_bit_exact_or_refused",
    "on disk": "test_checkpoint_folder_converts_on_disk_and_back",
    "law 3": "test_dequantization_commutes_with_the_conversion",
    "dequant ref": "test_reference_dequantizers_reproduce_the_original_weights",
    "seed scenario": "test_seed_scenario_memory_layout_reverts_to_modelopts_own_export",
    "reload": ("test_llmcompressor_export_reloads_with_the_producers_logits",
               "test_modelopt_export_has_what_vllms_modelopt_loader_creates"),
}
SHORT = {"passed": "ok", "skipped": "n/a", "xfail": "upstream", "failed": "FAIL"}


def results() -> dict[tuple[str, str], str]:
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "r.xml"
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        str(ROOT / "tests/integration/test_real_fixtures.py"),
                        f"--junitxml={xml}"], cwd=ROOT, capture_output=True, check=False)
        tree = ET.parse(xml)
    out: dict[tuple[str, str], str] = {}
    for case in tree.iter("testcase"):
        m = re.match(r"(\w+)\[(.+?)\]$", case.get("name", ""))
        if not m:
            continue
        test, fid = m.groups()
        status = "passed"
        for child in case:
            if child.tag == "skipped":
                status = "xfail" if child.get("type") == "pytest.xfail" else "skipped"
            elif child.tag in ("failure", "error"):
                status = "failed"
        out[(test, fid)] = status
    return out


def refused() -> dict[str, str]:
    """The fixtures whose fusion the tests expect refused as lossy (their REFUSED table)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "real_fixtures", ROOT / "tests/integration/test_real_fixtures.py")
    assert spec is not None and spec.loader is not None
    sys.path.insert(0, str(ROOT / "tests"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["real_fixtures"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return dict(module.REFUSED)


def main() -> int:
    import fnmatch

    found = results()
    lossy = refused()
    manifest = json.loads((ROOT / "tests/fixtures/real/MANIFEST.json").read_text())
    fids = sorted({fid for _, fid in found})
    lines = ["| producer | format | architecture | " + " | ".join(COLUMNS) + " |",
             "| --- | --- | --- |" + " --- |" * len(COLUMNS)]
    for fid in fids:
        producer, rest = fid.split("/", 1)
        fmt, arch = rest.split("-", 1)
        cells = []
        for tests in COLUMNS.values():
            names = (tests,) if isinstance(tests, str) else tests
            got = [found[(t, fid)] for t in names if (t, fid) in found]
            cell = SHORT[got[0]] if got else "-"
            if tests == COLUMNS["round trip"] and cell == "ok" and any(
                    fnmatch.fnmatch(fid, pat) for pat in lossy):
                cell = "refused (lossy)"
            cells.append(cell)
        lines.append(f"| {producer} | {fmt} | {arch} | " + " | ".join(cells) + " |")
    failed = [f for f in manifest["fixtures"].values() if f.get("status") != "ok"]
    if failed:
        lines += ["", "Not produced on CPU (the producer's reason):", ""]
        for f in failed:
            lines.append(f"- {f.get('producer')} {f.get('format')} {f.get('arch')}: "
                         f"{str(f.get('reason', f.get('error', '')))[:160]}")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
