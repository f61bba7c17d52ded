import pytest

from maelab.analysis.report import build_rows, make_report, markdown_table, plot_vs_gmacs

METRICS = {
    "linear_top1": ["linear_probe", "top1"],
    "finetune_top1": ["finetune", "top1"],
    "box_ap": ["detection", "box_ap"],
    "mask_ap": ["detection", "mask_ap"],
    "miou": ["segmentation", "miou"],
}
RESULTS = {
    "rmae": {
        "tasks": {
            "linear_probe": {"top1": 61.234},
            "finetune": {"top1": 80.0},
            "detection": {"box_ap": 12.5, "mask_ap": 10.0},
            "segmentation": {"miou": 40.0},
        }
    },
    "random_init": {
        "tasks": {
            "linear_probe": {"top1": 20.0},
            "finetune": {"status": "disabled"},
            "detection": {"box_ap": 1.0, "mask_ap": 0.5},
            "segmentation": {"miou": 10.0},
        }
    },
}


def test_rows_table_and_plot():
    rows = build_rows(RESULTS, METRICS, {"rmae": 9.8, "random_init": 0.0})
    assert rows[0] == {
        "recipe": "rmae",
        "gmacs": 9.8,
        "linear_top1": 61.234,
        "finetune_top1": 80.0,
        "box_ap": 12.5,
        "mask_ap": 10.0,
        "miou": 40.0,
    }
    assert rows[1]["finetune_top1"] is None
    md = markdown_table(rows)
    lines = md.strip().splitlines()
    assert len(lines) == 4 and lines[0].startswith("| pre-training | GMACs | lin. top-1")
    assert "**61.2**" in lines[2] and "—" in lines[3]
    fig = plot_vs_gmacs(rows, list(METRICS))
    assert len(fig.axes) == 5


def test_make_report_without_mlflow():
    params = {
        "report": {"metrics": METRICS, "mlflow": False},
        "transfer": {"encoders": {"rmae": "x.safetensors", "random_init": None}},
        "recipes": {},
    }
    report, md, df, fig = make_report(RESULTS, params)
    assert [r["recipe"] for r in report["rows"]] == ["rmae", "random_init"]
    assert (
        report["rows"][1]["gmacs"] == 0.0 and report["rows"][0]["gmacs"] is None
    )  # rmae: no recipe -> not countable
    assert list(df.columns) == ["recipe", "gmacs", *METRICS]
    assert df.loc[0, "box_ap"] == pytest.approx(12.5)


def test_seed_spread_becomes_a_std_column_and_mean_pm_std_in_the_table():
    results = {
        "mae": {"tasks": {"linear_probe": {"top1": 30.0, "top1_std": 1.25}, "finetune": {"top1": 40.0}}},
        "rmae": {"tasks": {"linear_probe": {"top1": 20.0, "top1_std": 0.03}}},
        "supervised_reference": {"tasks": {"finetune": {"top1": 70.0, "top1_std": 0.5}}},
    }
    rows = build_rows(results, METRICS, {})
    assert rows[0]["linear_top1"] == 30.0 and rows[0]["linear_top1_std"] == 1.25
    assert "finetune_top1_std" not in rows[0]  # one seed: no spread is reported
    assert rows[2]["recipe"] == "supervised_reference" and rows[2]["finetune_top1"] == 70.0
    assert rows[2]["finetune_top1_std"] == 0.5 and rows[2]["linear_top1"] is None
    md = markdown_table(rows)
    assert "_std" not in md and "**30.0** ± 1.2" in md
    assert "| 70.0 ± 0.5 |" in md  # the reference is never the column's best: it is not an encoder
    assert "| 20.0 ± 0.03 |" in md  # a small spread keeps two decimals: "± 0.0" would read as none
