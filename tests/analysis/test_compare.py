"""The compare table: a row from one recipe's pre-training report and transfer metrics; the Markdown."""

from __future__ import annotations

from maelab.analysis.compare import compare_row, markdown_table, plot_vs_cost


def test_rows_and_markdown():
    metrics = {
        "tasks": {
            "linear_probe": {"status": "ok", "top1": 21.25, "top1_std": 1.0},
            "finetune": {"status": "disabled"},
        }
    }
    report = {
        "steps": 10,
        "wall_s": 4.0,
        "images_per_s": 80.0,
        "peak_mem_mb": 900.4,
        "first_loss": 1.0,
        "last_loss": 0.5,
    }
    recipe = {"train": {"batch_size": 32, "accum_steps": 1}}
    metric_map = {"linear_top1": ["linear_probe", "top1"], "finetune_top1": ["finetune", "top1"]}
    a = compare_row("a", recipe, report, metrics, metric_map, 1.23456)
    assert a == {
        "recipe": "a", "gmacs": 1.2346, "steps": 10, "images": 320, "pretrain_wall_s": 4.0,
        "images_per_s": 80.0, "peak_mem_mb": 900.0, "first_loss": 1.0, "last_loss": 0.5,
        "linear_top1": 21.25, "linear_top1_std": 1.0,
    }  # fmt: skip
    b = {**a, "recipe": "b", "linear_top1": 30.0, "pretrain_wall_s": 9.0}
    lines = markdown_table([a, b]).splitlines()
    assert lines[0].startswith("| pre-training | GMACs | steps | images | pre-train s | img/s | peak MiB")
    assert "lin. top-1" in lines[0] and "ft. top-1" not in lines[0]  # a task that did not run: no column
    assert "| 21.2 ± 1.0 |" in lines[2] and "**30.0** ± 1.0" in lines[3]
    assert "**9.0**" not in lines[3]  # costs are never "best"


def test_plot_has_a_panel_per_cost_and_skips_rows_without_the_metric():
    rows = [
        {"recipe": "a", "gmacs": 1.0, "images": 100, "pretrain_wall_s": 3.0, "linear_top1": 20.0},
        {"recipe": "b", "gmacs": None, "images": 100, "pretrain_wall_s": 5.0, "linear_top1": None},
    ]
    fig = plot_vs_cost(rows, "linear_top1")
    wall, compute = fig.axes
    assert wall.get_xlabel().startswith("pre-training wall time") and "TMACs" in compute.get_xlabel()
    assert [t.get_text() for t in wall.texts] == ["a"] and [t.get_text() for t in compute.texts] == ["a"]
    assert compute.texts[0].xy == (0.1, 20.0)  # 1 GMAC x 100 images = 0.1 TMACs
