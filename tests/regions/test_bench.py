from __future__ import annotations

import argparse
import json

from maelab.regions import bench


def test_run_bench_measures_both_sides(tmp_path):
    out = bench.run_bench(
        3, fh={"type": "fh", "scales": [50, 100]}, workers=2, repeats=1, size=(48, 64), workdir=tmp_path
    )
    assert out["images"] == 3 and out["workers"] == 2 and out["scales"] == ["50", "100"]
    assert out["images_per_s_per_core"] > 0 and out["bare_s"] > 0 and out["pipeline_s"] > 0
    assert 0 < out["bytes_per_image"] < 48 * 64 * 2 * 2  # compressed below raw uint16
    assert abs(out["overhead_vs_felzenszwalb"] - (out["pipeline_s"] / out["bare_s"] - 1)) < 0.01


def test_cli_prints_one_json_line(monkeypatch, capsys, tmp_path):
    seen, real = {}, bench.run_bench

    def tiny(images, **kw):
        seen.update(kw, images=images)
        return real(images, fh=kw["fh"], workers=1, repeats=1, size=(32, 32), workdir=tmp_path)

    monkeypatch.setattr(bench, "run_bench", tiny)
    assert bench.cli(argparse.Namespace(env=None, images=2, json=True)) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert {"images_per_s_per_core", "bytes_per_image", "overhead_vs_felzenszwalb"} <= set(result)
    assert seen["fh"]["scales"] == [100, 200, 300] and seen["images"] == 2  # conf/base regions.sources.fh
