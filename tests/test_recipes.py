"""Merges and dotted overrides (OmegaConf): the behaviour of the hand-written helpers they replace."""

from __future__ import annotations

import pytest

from maelab.recipes import apply_dotlist, deep_merge, nest_dotted, resolve_recipe
from maelab.train.__main__ import apply_sets


def test_deep_merge_merges_mappings_and_replaces_the_rest() -> None:
    base = {"a": 1, "b": {"c": [1, 2], "d": 3}, "e": {"f": 1}, "s": "${x}"}
    out = deep_merge(base, {"b": {"c": [9]}, "e": None, "g": {"h": 1}}, {"a": 2})
    assert out == {"a": 2, "b": {"c": [9], "d": 3}, "e": None, "g": {"h": 1}, "s": "${x}"}
    assert base["b"]["c"] == [1, 2] and base["e"] == {"f": 1}  # inputs untouched
    assert deep_merge({"a": None}, {"a": {"x": 1}}) == {"a": {"x": 1}}
    out["b"]["c"].append(0)
    assert base["b"]["c"] == [1, 2]  # no shared lists


def test_apply_dotlist_parses_values() -> None:
    recipe = {"train": {"steps": 5, "lr": 0.1}, "masker": {"ratio": 0.75}}
    out = apply_dotlist(recipe, ["train.steps=10", "train.lr=1e-3", "masker.sizes=[1,2]", "new.key=null"])
    assert out == {
        "train": {"steps": 10, "lr": 0.001},
        "masker": {"ratio": 0.75, "sizes": [1, 2]},
        "new": {"key": None},
    }
    assert recipe["train"]["steps"] == 5


@pytest.mark.parametrize(
    ("item", "named"), [("train.steps", "KEY.PATH=VALUE"), ("train.steps.x=1", "'steps'")]
)
def test_bad_set_items_are_named(item: str, named: str) -> None:
    with pytest.raises(ValueError, match=named):
        apply_dotlist({"train": {"steps": 5}}, [item])
    with pytest.raises(SystemExit, match="--set"):
        apply_sets({"train": {"steps": 5}}, [item])


def test_nest_dotted_is_kedro_params_nesting() -> None:
    params = {"recipe_defaults.train.steps": 2, "recipe_defaults.train.lr": 0.5, "x": {"y": 1}, "x.z": 2}
    assert nest_dotted(params) == {
        "recipe_defaults": {"train": {"steps": 2, "lr": 0.5}},
        "x": {"y": 1, "z": 2},
    }
    assert nest_dotted(None) == {}


def test_resolve_recipe() -> None:
    params = {
        "recipe_defaults": {"train": {"steps": 1, "lr": 2}},
        "recipes": {"mae": {"train": {"steps": 3}}},
    }
    assert resolve_recipe(params, "mae") == {"train": {"steps": 3, "lr": 2}, "name": "mae"}
    with pytest.raises(KeyError, match="unknown recipe 'x'"):
        resolve_recipe(params, "x")


def test_a_list_replaces_a_mapping_and_back() -> None:
    assert deep_merge({"data": {"a": 1}, "b": [1]}, {"data": [1], "b": {"x": 1}}) == {
        "data": [1],
        "b": {"x": 1},
    }
