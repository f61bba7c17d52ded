import pytest

from maelab.config import load_config
from maelab.transfer.config import (
    TASKS,
    ConfigError,
    DetectionConfig,
    FineTuneConfig,
    KnnProbeConfig,
    SegmentationConfig,
    SegProbeConfig,
    task_config,
)


def test_a_misspelt_key_names_the_key_and_the_task():
    transfer = {"tasks": {"finetune": {"layer_decayy": 0.7}}}
    with pytest.raises(ConfigError, match=r"transfer\.tasks\.finetune: unknown key 'layer_decayy'"):
        task_config("finetune", transfer)
    with pytest.raises(ConfigError, match=r"transfer\.tasks\.detection\.data: unknown key 'evaluatr'"):
        task_config("detection", {"tasks": {"detection": {"data": {"evaluatr": "lvis"}}}})
    with pytest.raises(ConfigError, match=r"transfer\.tasks: unknown task\(s\) \['segmentaton'\]"):
        task_config("finetune", {"tasks": {"segmentaton": {}}})


def test_defaults_are_held_by_the_config_and_parameters_override_them():
    cfg = task_config("finetune", {"device": "cpu", "data": {"max_eval_images": 9}, "tasks": {}})
    assert isinstance(cfg, FineTuneConfig)
    assert (cfg.layer_decay, cfg.blr, cfg.device, cfg.data.max_eval_images) == (0.75, 5e-4, "cpu", 9)
    det = task_config("detection", {"tasks": {"detection": {"layer_decay": 0.5, "lsj": [0.5, 1.5]}}})
    assert isinstance(det, DetectionConfig) and det.layer_decay == 0.5 and det.lsj == (0.5, 1.5)
    assert det.data.evaluator == "coco" and SegmentationConfig().layer_decay == 0.65


def test_bad_values_fail_with_the_field():
    with pytest.raises(ConfigError, match="detection.img_size: 100 must be a multiple of 32"):
        task_config("detection", {"tasks": {"detection": {"img_size": 100}}})
    with pytest.raises(ConfigError, match="linear_probe.pool: expected cls | mean"):
        task_config("linear_probe", {"tasks": {"linear_probe": {"pool": "max"}}})
    with pytest.raises(ConfigError, match=r"transfer\.tasks\.segmentation\.data: expected a mapping"):
        task_config("segmentation", {"tasks": {"segmentation": {"data": [1]}}})


@pytest.mark.parametrize("env", [None, "coco", "imagenet", "ade20k", "benchmark"])
def test_every_configured_env_parses(env):
    transfer = load_config("parameters", env)["transfer"]
    for task in TASKS:
        task_config(task, transfer)


def test_the_probes_hold_their_papers_defaults_and_the_envs_their_budgets():
    knn = task_config("knn_probe", {})
    assert isinstance(knn, KnnProbeConfig) and (knn.k, knn.temperature, knn.pool) == (20, 0.07, "cls")
    assert task_config("linear_probe", {}).seeds == (0,)
    base = load_config("parameters")["transfer"]
    assert task_config("linear_probe", base).seeds == (0, 1, 2)
    # the segmentation probe: off in the embedded default (time budget), on in the benchmark env
    assert not task_config("seg_probe", base).enabled
    bench = task_config("seg_probe", load_config("parameters", "benchmark")["transfer"])
    assert isinstance(bench, SegProbeConfig) and bench.enabled and bench.seeds == (0, 1, 2)
    with pytest.raises(ConfigError, match=r"knn_probe\.pool: expected cls \| mean"):
        task_config("knn_probe", {"tasks": {"knn_probe": {"pool": "max"}}})
    with pytest.raises(ConfigError, match=r"seg_probe: unknown key 'kk'"):
        task_config("seg_probe", {"tasks": {"seg_probe": {"kk": 3}}})
