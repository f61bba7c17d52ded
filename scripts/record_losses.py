"""Per-step losses of ``mae`` and ``rmae`` on the embedded default (fp32, CPU, seed 0, no MLflow), as exact
``float.hex`` strings: record them before a refactor, again after, and ``cmp`` the two files.

usage (from the project root, after `make run` or `kedro run --pipelines=ingest,regions`):
    python scripts/record_losses.py OUT.json [STEPS]   # default 50 steps
"""

import json
import sys
import tempfile
from pathlib import Path

from maelab.config import load_config, load_recipe
from maelab.train.engine import train


def main(out: str, steps: int = 50) -> None:
    store = Path(load_config("catalog")["region_store"]["path"]).resolve()
    losses = {}
    for name in ("mae", "rmae"):
        recipe = load_recipe(name)
        train_cfg = dict(steps=steps, precision="fp32", seed=0, device="cpu", ckpt_every=0, image_every=0)
        recipe["train"].update(train_cfg)
        regions = recipe.get("data", {}).get("regions")
        if regions:
            regions["store"] = str(store / regions.get("source", "fh"))
        with tempfile.TemporaryDirectory() as out_dir:
            result = train(recipe, None, out_dir=out_dir, mlflow=None)
        history = {k: v for k, v in result.history.items() if k.startswith("loss")}
        losses[name] = {k: [float(x).hex() for x in v] for k, v in history.items()}
        print(name, "first", result.history["loss"][0], "last", result.history["loss"][-1], flush=True)
    Path(out).write_text(json.dumps(losses, indent=1))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 50)
