"""build_report: every figure is written and valid, the page is self-contained, edge cases still work."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from PIL import Image
from report_fixtures import Tuned

from lorascale.errors import OptionError, OutputError
from lorascale.report import build_report
from lorascale.store.schema import MATRICES

CORE_FIGURES = ("intruders-vs-epsilon", "intruders-vs-k", "intruder-locations", "spectra", "effective-rank")


def _links(index: Path) -> set[str]:
    return set(re.findall(r'(?:src|href)="([^"#][^"]*)"', index.read_text(encoding="utf-8")))


def _check_figure_files(report: Path) -> list[str]:
    """Every PNG opens, every SVG parses; returns the figure stems."""
    stems = sorted(p.stem for p in report.glob("*.png"))
    assert stems, "no figures written"
    for stem in stems:
        png, svg = report / f"{stem}.png", report / f"{stem}.svg"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(png) as image:
            image.verify()
        with Image.open(png) as image:
            width, height = image.size
            assert 400 <= width <= 2000 and 200 <= height <= 4000, (stem, image.size)
        root = ET.parse(svg).getroot()
        assert root.tag.endswith("svg")
    return stems


def _check_page(index: Path) -> str:
    text = index.read_text(encoding="utf-8")
    for link in _links(index):
        assert not link.startswith(("/", "file:")), link
        assert (index.parent / link).is_file(), f"page links to missing {link}"
    # Offline: no external scripts, styles, fonts or images, and no scripts at all.
    assert not re.search(r"https?://", text)
    assert "<script" not in text.lower()
    assert "@import" not in text and "url(" not in text
    return text


def test_mixed_run_writes_every_figure(mixed_report: Path) -> None:
    report = mixed_report.parent
    assert mixed_report.name == "index.html" and report.name == "report"
    stems = _check_figure_files(report)
    for stem in CORE_FIGURES:
        assert stem in stems
    assert "checkpoints" not in stems  # a full fine-tune and a LoRA are no training trajectory
    heatmaps = [s for s in stems if s.startswith("heatmap-")]
    assert len(heatmaps) == 3  # two with most intruders + one typical
    text = _check_page(mixed_report)
    for stem in stems:  # every figure is on the page, as image and as SVG link
        assert f'src="{stem}.png"' in text and f'href="{stem}.svg"' in text
    # Full references in the summary table, both models present.
    assert "org/full-ft" in text and "/scratch/runs/lora-r4/final" in text
    assert not list(report.parent.glob(".report*")), "temporary directories left behind"


def test_report_intruder_counts_on_page_match_tables(mixed_report: Path) -> None:
    text = mixed_report.read_text(encoding="utf-8")
    assert "intruders (k=10, ε=0.5)" in text
    # The LoRA adds intruders, the small full fine-tune none: the summary row shows both.
    # Rows start with the model's label and end with its reference.
    rows = re.findall(r"<tr><td class=\"text\">([^<]+)</td><td class=\"text\">(\w+)</td>"
                      r"<td class=\"\">(\d+)</td><td class=\"\">(\d+)</td>.*?<td class=\"text ref\">([^<]+)</td></tr>",
                      text)
    counts = {reference: int(intruders) for _, _, _, intruders, reference in rows}
    assert counts["org/full-ft"] == 0
    assert counts["/scratch/runs/lora-r4/final"] > 0
    assert [label for label, *_ in rows] == ["full-ft", "final"]


def test_checkpoint_series_ordered_by_name(make_run) -> None:
    steps = (1000, 100, 200)  # given out of order on purpose
    tuned = [Tuned(f"/scratch/run/checkpoint-{s}", "lora", strength=s / 1000) for s in steps]
    root = make_run(tuned, side="both", layers=1, modules=("q_proj",))
    index = build_report(root, order="name")
    stems = _check_figure_files(index.parent)
    assert "checkpoints" in stems
    text = _check_page(index)
    # Natural order: 100 < 200 < 1000, in the summary table and in the series caption.
    positions = [text.index(f"/scratch/run/checkpoint-{s}</td>") for s in (100, 200, 1000)]
    assert positions == sorted(positions)
    caption = text[text.index('id="checkpoints"'):]
    assert caption.index("checkpoint-100") < caption.index("checkpoint-200") < caption.index("checkpoint-1000")
    assert "ordered by step" in caption


def test_as_given_order_follows_manifest(make_run) -> None:
    tuned = [Tuned(f"run/checkpoint-{s}", "lora", strength=s / 300) for s in (300, 100)]
    root = make_run(tuned, layers=1, modules=("q_proj",))
    text = build_report(root, matrices=["model.layers.0.self_attn.q_proj.weight"]).read_text()
    assert text.index("run/checkpoint-300</td>") < text.index("run/checkpoint-100</td>")


def test_zero_intruder_run_still_reports(make_run) -> None:
    root = make_run([Tuned("org/full-only", "full")], layers=2, modules=("q_proj", "k_proj"))
    index = build_report(root)
    stems = _check_figure_files(index.parent)
    for stem in CORE_FIGURES:
        assert stem in stems
    assert "checkpoints" not in stems  # one tuned model: no series
    text = _check_page(index)
    assert "needs at least two tuned models" in text
    assert "largest relative change, no intruders" in text


def test_single_matrix_run(make_run) -> None:
    root = make_run([Tuned("adapters/tiny-lora", "lora")], layers=1, modules=("q_proj",))
    index = build_report(root)
    stems = _check_figure_files(index.parent)
    assert [s for s in stems if s.startswith("heatmap-")] == ["heatmap-1-model.layers.0.self_attn.q_proj.weight"]
    assert "effective-rank" in stems
    _check_page(index)


def test_unchanged_model_and_running_status(make_run) -> None:
    # W == W0 everywhere: no effective rank at all; the run is still going.
    root = make_run([Tuned("org/identical", "full", strength=0.0)], layers=1,
                    modules=("q_proj",), status="running")
    with pytest.raises(OutputError, match="interrupted.*partial"):  # nobody holds its lock: it died
        build_report(root)
    index = build_report(root, allow_partial=True)
    text = _check_page(index)
    assert "PARTIAL RESULTS" in text and "interrupted" in text and 'class="warning"' in text
    assert "Effective rank of dW: no matrix" in text
    assert not (index.parent / "effective-rank.png").exists()


def test_rebuild_replaces_and_crash_keeps_previous_report(make_run, monkeypatch: pytest.MonkeyPatch) -> None:
    from lorascale.report import figures

    root = make_run([Tuned("org/a", "lora")], layers=1, modules=("q_proj",))
    first = build_report(root)
    (first.parent / "stale.png").write_bytes(b"old")
    index = build_report(root)
    assert index == first
    assert not (index.parent / "stale.png").exists()
    before = index.read_text()

    def explode(*args: object, **kwargs: object) -> None:
        raise RuntimeError("disk full")

    # A crash mid-render leaves the previous report untouched and no temporary directory behind.
    monkeypatch.setattr(figures, "intruders_vs_epsilon", explode)
    with pytest.raises(RuntimeError, match="disk full"):
        build_report(root)
    assert index.read_text() == before
    assert (index.parent / "intruders-vs-epsilon.png").is_file()
    assert not [p for p in root.iterdir() if p.name.startswith(".report")]


def test_custom_out_and_refuses_foreign_directory(make_run, tmp_path: Path) -> None:
    root = make_run([Tuned("org/a", "lora")], layers=1, modules=("q_proj",))
    foreign = tmp_path / "my-notes"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    with pytest.raises(OutputError):
        build_report(root, foreign)
    assert (foreign / "thesis.tex").read_text() == "precious"
    index = build_report(root, tmp_path / "nested" / "out")
    assert index == tmp_path / "nested" / "out" / "index.html" and index.is_file()


def test_unknown_matrix_is_an_option_error(make_run) -> None:
    root = make_run([Tuned("org/a", "lora")], layers=1, modules=("q_proj",))
    with pytest.raises(OptionError, match="no.such"):
        build_report(root, matrices=["no.such.weight"])


@pytest.mark.parametrize("damage", ["missing", "file", "no-manifest", "bad-manifest", "no-tables", "empty",
                                    "corrupt-matrices", "corrupt-spectra"])
def test_unusable_results_directory(make_run, tmp_path: Path, damage: str) -> None:
    root = make_run([Tuned("org/a", "lora")], layers=1, modules=("q_proj",))
    if damage == "missing":
        root = tmp_path / "nowhere"
    elif damage == "file":
        root = root / "manifest.json"
    elif damage == "no-manifest":
        (root / "manifest.json").unlink()
    elif damage == "bad-manifest":
        (root / "manifest.json").write_text("{truncated")
    elif damage == "no-tables":
        shutil.rmtree(root / MATRICES)
    elif damage == "empty":
        for part in (root / MATRICES).iterdir():
            part.unlink()
    elif damage.startswith("corrupt"):
        table = root / damage.removeprefix("corrupt-")
        (table / "part-000000.parquet").write_bytes(b"PAR1 truncated by a crash")
    # A path that is not a run's results directory at all is a usage error (2); a damaged run is exit 6.
    usage = damage in ("missing", "file", "no-manifest")
    with pytest.raises(OptionError if usage else OutputError) as info:
        build_report(root)
    assert info.value.exit_code == (2 if usage else 6) and info.value.fix


def test_import_does_not_load_matplotlib() -> None:
    code = "import sys, lorascale.report; print('matplotlib' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=Path(__file__).resolve().parents[2])
    assert result.stdout.strip() == "False"


def test_manifest_extra_keys_and_missing_options_tolerated(make_run) -> None:
    root = make_run([Tuned("org/a", "lora")], layers=1, modules=("q_proj",))
    manifest = json.loads((root / "manifest.json").read_text())
    del manifest["options"]["side"], manifest["finished"]
    manifest["new_section"] = [1, 2, 3]
    (root / "manifest.json").write_text(json.dumps(manifest))
    _check_page(build_report(root))
