"""``openmednet.models.describe``: diagram, tables and FLOP counts are read from the model itself."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import openmednet
from openmednet.cli.app import app
from openmednet.models.describe import (
    architecture_sections,
    block_table,
    complexity_table,
    count_flops,
    mermaid_diagram,
    update_generated,
)
from openmednet.models.mednet import CONNECTIONS

DOC = Path(__file__).resolve().parents[2] / "docs" / "architecture.md"
EDGE = re.compile(r'^\s*b(\d) (-->|-\.->)\|"c(\d)_(\d): ([^"]+)"\| b(\d)$', re.MULTILINE)


@pytest.fixture(scope="module")
def model():
    return openmednet.create_model("mednet_test", num_classes=5).eval()


def test_diagram_has_stem_eight_blocks_twelve_connections_and_head(model):
    text = mermaid_diagram(model)
    assert text.startswith("flowchart TB")
    nodes = re.findall(r'^\s*b(\d)\["', text, re.MULTILINE)
    assert nodes == [str(i) for i in range(9)]  # stem (b0) + blocks 1..8, in order
    for i in range(1, 9):
        assert f"b{i - 1} --> b{i}\n" in text  # the main path
    edges = EDGE.findall(text)
    assert len(edges) == 12
    assert {(int(s), int(d)) for s, _, _, _, _, d in edges} == {(c.src, c.dst) for c in CONNECTIONS}
    for src, arrow, key_src, key_dst, label, dst in edges:
        spec = next(c for c in CONNECTIONS if (c.src, c.dst) == (int(src), int(dst)))
        assert (key_src, key_dst) == (src, dst)
        assert arrow == ("-.->" if spec.kind == "long" else "-->")
        assert (label == "identity") == spec.identity
    assert "FC 200->5" in text and "dropout 0.5" in text


def test_diagram_labels_are_read_from_the_modules(model):
    text = mermaid_diagram(model)
    for i, block in enumerate(model.blocks, start=1):
        branch_chs = block.branches[0].conv.out_channels
        stride = block.branches[0].conv.stride[0]
        assert f'b{i}["block {i}: 1x1/3x3/5x5/7x7 x {branch_chs} ch, s{stride}; concat + BN -> {block.out_chs} ch"]' in text
    conn = model.connections["c0_8"]
    assert f"c0_8: avgpool /8, 1x1 conv {conn.conv.in_channels}->{conn.conv.out_channels}" in text


def test_block_table_rows(model):
    rows = [line.split(" | ") for line in block_table(model, size=64).splitlines()[2:]]
    assert [r[0].strip("| ") for r in rows] == ["stem"] + [f"block {i}" for i in range(1, 9)]
    # stride and 64 px map size per row: 2 2 2 4 4 8 8 16 16 -> 32 32 32 16 16 8 8 4 4
    assert [int(r[3]) for r in rows] == [2, 2, 2, 4, 4, 8, 8, 16, 16]
    assert [int(r[4]) for r in rows] == [32, 32, 32, 16, 16, 8, 8, 4, 4]
    assert [int(r[2]) for r in rows[1:]] == [b.out_chs for b in model.blocks]


def test_complexity_table_rows_are_numeric_and_exact(model):
    lines = complexity_table({"mednet_test": model}, sizes=(32, 64)).splitlines()
    assert lines[0] == "| model | params (M) | conv layers | GFLOPs at 32 px | GFLOPs at 64 px |"
    cells = [c.strip() for c in lines[2].strip("|").split("|")]
    assert cells[0] == "mednet_test"
    assert float(cells[1]) == round(sum(p.numel() for p in model.parameters()) / 1e6, 3)
    assert int(cells[2]) == 44
    assert 0 < float(cells[3]) < float(cells[4])


def _flops_by_hand(model: nn.Module, size: int) -> int:
    """Independent count: 2 * MACs of every Conv2d / Linear, from their output shapes (hooks)."""
    total = 0

    def hook(m, inputs, out):
        nonlocal total
        if isinstance(m, nn.Conv2d):
            k = m.kernel_size[0] * m.kernel_size[1] * m.in_channels // m.groups
            total += 2 * out.numel() * k
        else:
            total += 2 * out.numel() * m.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model(torch.zeros(1, model.in_chans, size, size))
    for h in handles:
        h.remove()
    return total


@pytest.mark.parametrize("size", [32, 64])
def test_count_flops_matches_hand_count(model, size):
    assert count_flops(model, size) == _flops_by_hand(model, size)


def test_conv_flops_scale_with_area(model):
    # 32 and 64 are multiples of the output stride 16, so every map grows by exactly 4x; only the
    # two FC layers of the head (2 * (C*200 + 200*5) FLOPs) do not scale.
    head = 2 * (model.num_features * 200 + 200 * 5)
    assert count_flops(model, 64) - head == 4 * (count_flops(model, 32) - head)


def test_non_mednet_gets_a_clear_error():
    with pytest.raises(ValueError, match="use a mednet_\\* model"):
        mermaid_diagram(nn.Sequential(nn.Conv2d(3, 8, 3)))


def test_update_generated_replaces_only_marked_sections():
    doc = "prose\n<!-- generated:a -->\nold\n<!-- /generated:a -->\nmore prose\n"
    assert update_generated(doc, {"a": "new"}) == "prose\n<!-- generated:a -->\nnew\n<!-- /generated:a -->\nmore prose\n"
    with pytest.raises(ValueError, match=r"markers for \['b'\]"):
        update_generated(doc, {"b": "x"})


def test_architecture_doc_is_up_to_date():
    """docs/architecture.md's diagram and block table equal what the code draws today."""
    if not DOC.is_file():
        pytest.skip(f"{DOC} not written yet")
    text = DOC.read_text()
    fresh = architecture_sections(include=("diagram", "blocks"))
    assert update_generated(text, fresh) == text, (
        "docs/architecture.md is stale: run `python benchmarks/make_architecture_doc.py`"
    )


def test_cli_describe_markdown():
    result = CliRunner().invoke(app, ["models", "describe", "mednet_test", "--markdown", "--size", "32"])
    assert result.exit_code == 0, result.output
    assert "```mermaid" in result.output
    assert len(EDGE.findall(result.output)) == 12
