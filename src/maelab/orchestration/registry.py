"""MLflow model registry for encoders: ``maelab-<recipe>-<arch>`` with aliases ``candidate`` and ``champion``.

A model version points at the run's MLflow pytorch model (the LoggedModel ``encoder`` that pre-training
logs: ``mlflow.pytorch.load_model("models:/NAME@champion")`` gives an images -> embeddings module); the
version's ``encoder_artifact`` tag names the safetensors the run logged beside it. A run with no logged
model (older runs, an encoder torch.export cannot trace) is registered from its ``encoder/`` artifact
directory as before. Both work against the local sqlite store with no server. ``resolve_encoder`` turns
``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, ``runs:/RUN/PATH`` or a plain path into a local
safetensors file that any stage can load as its backbone.
"""

from __future__ import annotations

import argparse
import hashlib
import re
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from maelab.files import metadata_encoder_config, read_metadata
from maelab.orchestration.decision import DECISIONS_FILE, Decision, DecisionRecord, append_decision, decide
from maelab.paths import project_root

CANDIDATE, CHAMPION = "candidate", "champion"
ENCODER_ARTIFACT_DIR = "encoder"
MODEL_ID_TAG = "maelab.encoder_model_id"  # run tag set by the engine's tracker (maelab.train.tracking)
# ViT sizes by width and their standard depth (Dosovitskiy et al. Table 1; DeiT for T/S)
_SIZES = {192: ("t", 12), 384: ("s", 12), 768: ("b", 12), 1024: ("l", 24), 1280: ("h", 32)}


# ---------------------------------------------------------------------------------------------- names
def arch_name(encoder_cfg: dict[str, Any]) -> str:
    """A short stable name: ``vit-b16-224``; ``vit-t8-64-d6`` for a non-standard depth; ``vit-w256p8-64``."""
    try:
        dim, depth = int(encoder_cfg["embed_dim"]), int(encoder_cfg["depth"])
        patch, img = int(encoder_cfg["patch_size"]), encoder_cfg["img_size"]
    except KeyError as err:
        raise KeyError(f"encoder config lacks {err.args[0]!r}: has {sorted(encoder_cfg)}") from err
    img = int(img[0] if isinstance(img, list | tuple) else img)
    letter, std_depth = _SIZES.get(dim, (None, None))
    name = f"vit-{letter}{patch}-{img}" if letter else f"vit-w{dim}p{patch}-{img}"
    return name if depth == std_depth else f"{name}-d{depth}"


def model_name(recipe: str, arch: str) -> str:
    return f"maelab-{recipe}-{arch}"


def encoder_config(path: str | Path) -> dict[str, Any]:
    """The ``encoder_config`` JSON stored in an encoder safetensors file's metadata."""
    meta = read_metadata(path)
    config = metadata_encoder_config(meta, path)
    if config is None:
        raise KeyError(f"{path}: safetensors metadata has no 'encoder_config' (has {sorted(meta)})")
    return config


# --------------------------------------------------------------------------------------------- client
def tracking_uri(env: str | None = None) -> str:
    """``$MLFLOW_TRACKING_URI``, else ``tracking_uri`` of ``conf/<env>/mlflow.yml``; relative paths are
    resolved against the project root (``sqlite:///mlruns/mlflow.db`` -> ``sqlite:////<root>/mlruns/mlflow.db``)."""
    from maelab.config import mlflow_settings  # conf/<env>/mlflow.yml, read as the engine's callers do
    from maelab.mlflow_http import bounded_http

    bounded_http()  # every registry call goes through here: short timeouts, bounded retries
    uri = mlflow_settings(env)["tracking_uri"]
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    return uri


def client(env: str | None = None):
    """An ``MlflowClient`` on the project's tracking + registry URI (no server needed for sqlite)."""
    import mlflow
    from mlflow import MlflowClient

    uri = tracking_uri(env)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _alias_version(c, name: str, alias: str):
    from mlflow.exceptions import MlflowException

    try:
        return c.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def _find_encoder_artifact(c, run_id: str, filename: str) -> str | None:
    """Artifact path (from the run root) of a logged file named ``filename``, searched two levels deep."""
    stack, depth = [(None, 0)], {}
    while stack:
        path, level = stack.pop()
        for info in c.list_artifacts(run_id, path):
            if info.is_dir and level < 2:
                stack.append((info.path, level + 1))
            elif not info.is_dir and Path(info.path).name == filename:
                depth[info.path] = level
    return min(depth, key=lambda p: (depth[p], p)) if depth else None


# ------------------------------------------------------------------------------------------- register
def register_encoder(
    run_id: str,
    encoder_path: str | Path,
    recipe: str,
    arch: str | None = None,
    *,
    env: str | None = None,
    decisions_path: str | Path | None = None,
) -> int:
    """Register the run's encoder as a new version of ``maelab-<recipe>-<arch>``; returns the version.

    The version's source is the run's logged artifact directory holding the safetensors (logged here
    under ``encoder/`` if the run does not have it yet). The new version gets alias ``candidate``; the
    first version of a model with no ``champion`` also becomes ``champion`` and that decision is logged.
    Registering the same run twice returns the existing version.
    """
    encoder_path = Path(encoder_path)
    arch = arch or arch_name(encoder_config(encoder_path))
    name = model_name(recipe, arch)
    c = client(env)

    existing = c.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    if existing:
        return int(existing[0].version)

    artifact = _find_encoder_artifact(c, run_id, encoder_path.name)
    if artifact is None:
        if not encoder_path.is_file():
            raise FileNotFoundError(f"encoder file not found: {encoder_path} (run {run_id} has no copy)")
        c.log_artifact(run_id, str(encoder_path), ENCODER_ARTIFACT_DIR)
        artifact = f"{ENCODER_ARTIFACT_DIR}/{encoder_path.name}"
    source, model_id = _version_source(c, run_id, artifact)

    if not c.search_registered_models(f"name = '{name}'"):
        c.create_registered_model(
            name, tags={"recipe": recipe, "arch": arch}, description=f"maelab {recipe} encoder, {arch}"
        )
    tags = {"recipe": recipe, "arch": arch, "encoder_file": Path(artifact).name, "encoder_artifact": artifact}
    version = c.create_model_version(name, source=source, run_id=run_id, tags=tags, model_id=model_id).version
    c.set_registered_model_alias(name, CANDIDATE, version)

    if _alias_version(c, name, CHAMPION) is None:
        decision = decide(None, None, has_champion=False)
        c.set_registered_model_alias(name, CHAMPION, version)
        record = DecisionRecord.of(decision, name, int(version), None, source="register")
        record_decision(record, env=env, decisions_path=decisions_path)
    return int(version)


def _version_source(c, run_id: str, artifact: str) -> tuple[str, str | None]:
    """(source, model id) of a new version: the run's LoggedModel ``models:/<model_id>`` if the run logged
    one, else the run's artifact directory holding the safetensors ``artifact``."""
    run = c.get_run(run_id)
    model_id = (run.data.tags or {}).get(MODEL_ID_TAG)
    if model_id:
        return f"models:/{model_id}", model_id
    parent = Path(artifact).parent.as_posix()
    return run.info.artifact_uri.rstrip("/") + ("" if parent == "." else f"/{parent}"), None


def _encoder_of_logged_model(mv, cache: Path, uri: str) -> Path:
    """The safetensors beside a LoggedModel version: the run's ``encoder_artifact`` (local, or downloaded)."""
    import mlflow

    artifact = (mv.tags or {}).get("encoder_artifact")
    if not (artifact and mv.run_id):
        raise FileNotFoundError(f"{uri}: version {mv.version} has no encoder_artifact tag or run")
    run_root = client().get_run(mv.run_id).info.artifact_uri.rstrip("/")
    local = _local_dir(f"{run_root}/{artifact}")
    if local is not None and local.is_file():
        return local
    dst = cache / mv.name / str(mv.version)
    dst.mkdir(parents=True, exist_ok=True)
    got = mlflow.artifacts.download_artifacts(artifact_uri=f"runs:/{mv.run_id}/{artifact}", dst_path=str(dst))
    return _pick_safetensors(Path(got), Path(artifact).name, uri)


def record_decision(
    record: DecisionRecord, *, env: str | None = None, decisions_path: str | Path | None = None
) -> Path:
    """Tags on the candidate version (``decision.*``) and one JSON line in the decision log."""
    c = client(env)
    for key, value in {
        "decision.action": record.action,
        "decision.reason": record.reason,
        "decision.metric": record.metric,
        "decision.champion_version": record.champion_version,
        "decision.source": record.source,
        "decision.time": record.time,
    }.items():
        c.set_model_version_tag(
            record.model, str(record.candidate_version), key, "" if value is None else str(value)
        )
    return append_decision(record, decisions_path or project_root() / DECISIONS_FILE)


def set_metric(name: str, version: int | str, metric: str, value: float, env: str | None = None) -> None:
    """Store an evaluation result on a version (``metric.<name>`` tag) so later candidates compare to it."""
    client(env).set_model_version_tag(name, str(version), f"metric.{metric}", repr(float(value)))


def get_metric(name: str, version: int | str, metric: str, env: str | None = None) -> float | None:
    tags = client(env).get_model_version(name, str(version)).tags or {}
    raw = tags.get(f"metric.{metric}")
    return None if raw in (None, "") else float(raw)


def promote(name: str, version: int | str, alias: str = CHAMPION, env: str | None = None) -> None:
    client(env).set_registered_model_alias(name, alias, str(version))


# -------------------------------------------------------------------------------------------- resolve
def _parse_models_uri(uri: str) -> tuple[str, str | None, str | None]:
    """``models:/NAME@ALIAS`` -> (NAME, None, ALIAS); ``models:/NAME/VERSION`` -> (NAME, VERSION, None)."""
    body = uri[len("models:/") :].strip("/")
    if "@" in body:
        name, alias = body.rsplit("@", 1)
        return name, None, alias
    if "/" in body:
        name, version = body.rsplit("/", 1)
        if version.isdigit():
            return name, version, None
    raise ValueError(f"model URI {uri!r}: expected models:/NAME@ALIAS or models:/NAME/VERSION")


def get_version(ref: str, env: str | None = None):
    """The ``ModelVersion`` for ``NAME@ALIAS``, ``NAME/VERSION`` or the same with ``models:/`` in front."""
    from mlflow.exceptions import MlflowException

    uri = ref if ref.startswith("models:/") else f"models:/{ref}"
    name, version, alias = _parse_models_uri(uri)
    c = client(env)
    try:
        return c.get_model_version_by_alias(name, alias) if alias else c.get_model_version(name, version)
    except MlflowException as err:
        raise LookupError(f"{ref}: not in the registry at {tracking_uri(env)} ({err.message})") from err


def _local_dir(uri: str) -> Path | None:
    if uri.startswith("file:"):
        return Path(unquote(urlparse(uri).path))
    return Path(uri) if "://" not in uri else None


def _pick_safetensors(path: Path, want: str | None, what: str) -> Path:
    if path.is_file():
        return path
    if want and (path / want).is_file():
        return path / want
    found = sorted(path.rglob("*.safetensors"))
    if len(found) != 1:
        raise FileNotFoundError(
            f"{what}: expected one .safetensors under {path}, found {[str(p) for p in found]}"
        )
    return found[0]


def resolve_encoder(uri: str | Path, *, env: str | None = None, cache_dir: str | Path | None = None) -> Path:
    """A local path to the encoder safetensors named by ``uri`` (downloaded into ``cache_dir`` if remote).

    ``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, ``runs:/RUN_ID/PATH``, any other artifact URI MLflow
    can download (``mlflow-artifacts:/...``, ``s3://...``), ``file://...`` or a plain path.
    """
    import mlflow

    uri = str(uri)
    cache = Path(cache_dir) if cache_dir else project_root() / "data" / "06_models" / "registry"
    if uri.startswith("models:/"):
        mv = get_version(uri, env)
        want = (mv.tags or {}).get("encoder_file")
        if str(mv.source).startswith("models:/"):  # a LoggedModel: the safetensors is the run's artifact
            return _encoder_of_logged_model(mv, cache, uri)
        local = _local_dir(mv.source)
        if local is not None and local.exists():
            return _pick_safetensors(local, want, uri)
        dst = cache / mv.name / str(mv.version)
        dst.mkdir(parents=True, exist_ok=True)
        got = mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{mv.name}/{mv.version}", dst_path=str(dst)
        )
        return _pick_safetensors(Path(got), want, uri)
    if uri.startswith("runs:/"):
        client(env)
        run_id = uri[len("runs:/") :].split("/", 1)[0]
        dst = cache / "runs" / run_id
        dst.mkdir(parents=True, exist_ok=True)
        return _pick_safetensors(
            Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst))), None, uri
        )
    if re.match(r"^[a-z][a-z0-9+.-]*:/", uri) and not uri.startswith(
        "file:"
    ):  # mlflow-artifacts:/, s3://, ...
        client(env)
        dst = cache / "uri" / hashlib.sha1(uri.encode()).hexdigest()[:16]
        dst.mkdir(parents=True, exist_ok=True)
        return _pick_safetensors(
            Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst))), None, uri
        )
    path = _local_dir(uri)
    assert path is not None
    if not path.is_absolute():
        path = project_root() / path
    if not path.exists():
        raise FileNotFoundError(f"encoder file not found: {path}")
    return _pick_safetensors(path, None, uri)


# ------------------------------------------------------------------------------------------------ CLI
def list_models(env: str | None = None) -> list[dict[str, Any]]:
    c = client(env)
    rows = []
    for rm in c.search_registered_models(max_results=1000):
        by_version: dict[str, list[str]] = {}
        for alias, version in (rm.aliases or {}).items():
            by_version.setdefault(str(version), []).append(alias)
        for mv in c.search_model_versions(f"name = '{rm.name}'", max_results=1000):
            tags = mv.tags or {}
            rows.append(
                {
                    "name": rm.name,
                    "version": int(mv.version),
                    "aliases": sorted(by_version.get(str(mv.version), [])),
                    "run_id": mv.run_id,
                    "metrics": {k[7:]: v for k, v in tags.items() if k.startswith("metric.")},
                    "decision": tags.get("decision.action", ""),
                }
            )
    return sorted(rows, key=lambda r: (r["name"], r["version"]))


def cli(args: argparse.Namespace) -> int:
    """``maelab registry list | get NAME@ALIAS | promote NAME VERSION ALIAS``."""
    env = getattr(args, "env", None)
    if args.action == "list":
        rows = list_models(env)
        if not rows:
            print(f"no registered models at {tracking_uri(env)}")
        for r in rows:
            metrics = " ".join(f"{k}={v}" for k, v in r["metrics"].items())
            aliases = ",".join(r["aliases"]) or "-"
            print(f"{r['name']}\tv{r['version']}\t{aliases}\t{r['run_id']}\t{metrics}".rstrip())
        return 0
    if args.action == "get":
        try:
            mv = get_version(args.ref, env)
            path = resolve_encoder(f"models:/{mv.name}/{mv.version}", env=env)
        except (LookupError, FileNotFoundError, ValueError) as err:
            print(f"error: {err}")
            return 1
        print(f"name: {mv.name}\nversion: {mv.version}\npath: {path}")
        return 0
    if args.action == "promote":
        c = client(env)
        before = _alias_version(c, args.name, args.alias)
        try:
            promote(args.name, args.version, args.alias, env)
        except Exception as err:  # MlflowException: unknown model or version
            print(f"error: cannot set {args.name}@{args.alias} -> {args.version}: {err}")
            return 1
        if args.alias == CHAMPION:
            decision = Decision(True, "manual promotion", "", None, None)
            old = None if before is None else int(before.version)
            record_decision(
                DecisionRecord.of(decision, args.name, int(args.version), old, source="manual"), env=env
            )
        print(f"{args.name}@{args.alias} -> version {args.version}")
        return 0
    raise ValueError(f"unknown registry action {args.action!r}")


# ------------------------------------------------------------------------------- full training states
# Beside each encoder version, the run's complete pre-training state: every head, the optimiser, the
# scaler, the data position, the RNG states, the loss history and the resolved recipe, in one
# weights-only file (``torch.load(weights_only=True)``; the recipe as a JSON string). It is logged to the
# version's run under ``state/`` and named by the version's ``state_file`` tag, so ``models:/NAME@ALIAS``
# means the same run whether a stage wants the encoder or the whole state.
STATE_ARTIFACT_DIR = "state"
STATE_FILE = "state.pt"
STATE_KEYS = ("model", "optimizer", "scaler", "step", "data", "history", "rng", "recipe_json")


def write_full_state(checkpoint: str | Path, recipe: dict[str, Any], out: str | Path) -> Path:
    """The training ``checkpoint`` (``checkpoint.pt``) with the resolved ``recipe`` added, written atomically
    to ``out``; the checkpoint must hold everything a continued run restores."""
    import json

    import torch

    from maelab.files import atomic_write, torch_load_weights

    state = torch_load_weights(checkpoint)
    missing = [k for k in STATE_KEYS[:-1] if k not in (state if isinstance(state, dict) else {})]
    if missing:
        raise ValueError(f"{checkpoint}: not a full training checkpoint (no {missing})")
    state["recipe_json"] = json.dumps(recipe, sort_keys=True)
    return atomic_write(out, lambda tmp: torch.save(state, tmp))


def read_full_state(path: str | Path) -> dict[str, Any]:
    """A full state file as a dict (weights only), with its recipe decoded under ``recipe``."""
    import json

    from maelab.files import torch_load_weights

    state = torch_load_weights(path)
    if not isinstance(state, dict) or "recipe_json" not in state:
        raise ValueError(f"{path}: not a maelab full state (field 'recipe_json' missing)")
    state["recipe"] = json.loads(state["recipe_json"])
    return state


def register_state(
    run_id: str, checkpoint: str | Path, recipe: dict[str, Any], *, env: str | None = None
) -> tuple[str, int]:
    """Log the run's full state (:func:`write_full_state`) as ``state/state.pt`` and tag the run's encoder
    version of ``maelab-<recipe>-<arch>`` with it (``state_file``, ``state_step``, ``state_heads``);
    returns ``(model name, version)``. Register the encoder first (:func:`register_encoder`)."""
    import tempfile

    name = model_name(recipe["name"], arch_name(recipe["encoder"]))
    c = client(env)
    versions = c.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    if not versions:
        raise LookupError(f"{name}: no version from run {run_id}; register its encoder first")
    version = versions[0].version
    with tempfile.TemporaryDirectory(prefix="maelab-state-") as tmp:
        path = write_full_state(checkpoint, recipe, Path(tmp) / STATE_FILE)
        step = int(read_full_state(path)["step"])
        c.log_artifact(run_id, str(path), STATE_ARTIFACT_DIR)
    heads = ",".join(sorted(str(h.get("type", n)) for n, h in (recipe.get("heads") or {}).items()))
    for key, value in {
        "state_file": f"{STATE_ARTIFACT_DIR}/{STATE_FILE}",
        "state_step": str(step),
        "state_heads": heads,
    }.items():
        c.set_model_version_tag(name, version, key, value)
    return name, int(version)


def resolve_state(uri: str | Path, *, env: str | None = None, cache_dir: str | Path | None = None) -> Path:
    """A local path to the full state named by ``uri``: ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``
    (the version's ``state_file`` artifact, downloaded into ``cache_dir`` unless the store is local), or a
    plain path (a full state or a ``checkpoint.pt``), returned as it is."""
    import mlflow

    uri = str(uri)
    if not uri.startswith("models:/"):
        path = Path(uri)
        path = path if path.is_absolute() else project_root() / path
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such training state")
        return path
    mv = get_version(uri, env)
    artifact = (mv.tags or {}).get("state_file")
    if not artifact:
        raise LookupError(
            f"{uri} (version {mv.version} of {mv.name}) has no full training state: it was registered "
            "without one (tag 'state_file'); pre-train it again, or pass a checkpoint.pt path"
        )
    c = client(env)
    local = _local_dir(c.get_run(mv.run_id).info.artifact_uri)
    if local is not None and (local / artifact).is_file():
        return local / artifact
    cache = Path(cache_dir) if cache_dir else project_root() / "data" / "06_models" / "registry"
    dst = cache / mv.name / str(mv.version)
    dst.mkdir(parents=True, exist_ok=True)
    got = mlflow.artifacts.download_artifacts(artifact_uri=f"runs:/{mv.run_id}/{artifact}", dst_path=str(dst))
    return Path(got)


def resolve_init_from(recipe: dict[str, Any], env: str | None = None) -> dict[str, Any]:
    """The recipe with a ``train.init_from`` registry URI replaced by the local full-state path (the engine
    reads files only); the URI is kept as ``train.init_from_uri`` for the run's parameters."""
    ref = (recipe.get("train") or {}).get("init_from")
    if not ref or not str(ref).startswith("models:/"):
        return recipe
    train = {**recipe["train"], "init_from": str(resolve_state(ref, env=env)), "init_from_uri": str(ref)}
    return {**recipe, "train": train}
