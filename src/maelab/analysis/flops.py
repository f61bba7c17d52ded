"""Multiply-accumulates of one training forward of one image, in fvcore's convention (the papers' GFLOPs).

fvcore counts one multiply-add as one "flop"; MAE-family papers report that figure (R-MAE Table 1e:
MAE ViT-B/16 with an 8x512 decoder at 224 px = 9.7b). Fused SDPA hides the attention matmuls from
fvcore on CPU, so the model is built with explicit attention (``fused_attn=False``) while counting.

    maelab flops --recipe mae --env imagenet --json   ->   {"recipe": "mae", "gmacs": 9.79...}
    maelab flops --recipe rmae --env imagenet --parts  ->   the count split by encoder / head sub-module
"""

from __future__ import annotations

import argparse
import json
import logging
import warnings
from typing import Any

import torch
from torch import Tensor, nn

from maelab.masking.plan import MaskPlan
from maelab.models.pretrainer import Pretrainer, build_pretrainer
from maelab.teachers.build import with_untrained_teachers


class _TraceableStep(nn.Module):
    """Tensors in, loss out: what ``torch.jit.trace`` (used by fvcore) can follow. The plan travels as its
    own fields and is rebuilt as ``plan_type`` (any ``MaskPlan`` subclass); no plan type: the model's
    in-step masker makes the plan inside the traced forward."""

    def __init__(
        self, model: Pretrainer, extras: dict[str, Tensor], plan_type: type[MaskPlan] | None
    ) -> None:
        super().__init__()
        self.model, self.extras, self.plan_type = model, extras, plan_type

    def forward(self, image: Tensor, *plan_tensors: Tensor) -> Tensor:
        plan = self.plan_type.from_tensors(*plan_tensors) if self.plan_type is not None else None
        return self.model({"image": image, "plan": plan, **self.extras}).loss


def count_gmacs(recipe: dict[str, Any], seed: int = 0) -> float:
    """GMACs of one training forward (encoder on the kept tokens + every head + losses) for one image."""
    return _analysis(recipe, seed)[0].total() / 1e9


def gmacs_by_part(recipe: dict[str, Any], seed: int = 0) -> dict[str, float]:
    """The same count split by part: ``encoder`` and each head's direct sub-modules (``region.predictor``,
    ``pixel.decoder_blocks``, ...), largest first; what no sub-module holds is ``<head>.other``."""
    return _split(*_analysis(recipe, seed))


def _split(analysis: Any, model: Pretrainer) -> dict[str, float]:
    per = analysis.by_module()
    parts = {"encoder": per.get("model.encoder", 0)}
    for name, head in model.heads.items():
        total = per.get(f"model.heads.{name}", 0)
        for child, _ in head.named_children():
            parts[f"{name}.{child}"] = per.get(f"model.heads.{name}.{child}", 0)
            total -= parts[f"{name}.{child}"]
        parts[f"{name}.other"] = total
    return {k: round(v / 1e9, 4) for k, v in sorted(parts.items(), key=lambda kv: -kv[1]) if v}


def _analysis(recipe: dict[str, Any], seed: int) -> tuple[Any, Pretrainer]:
    """The traced fvcore analysis of one training forward, and the model it traced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # fvcore scripts helpers with torch.jit at import
        from fvcore.nn import FlopCountAnalysis

    model = build_pretrainer(recipe, fused_attn=False).eval()
    enc = model.encoder
    image = torch.randn(1, enc.in_chans, *enc.img_size, generator=torch.Generator().manual_seed(seed))
    extras: dict[str, Tensor] = {}
    for head in model.heads.values():
        extras.update(head.example_batch(1))
    if model.masker is None:
        raise ValueError(f"recipe {recipe.get('name', '<recipe>')}: field 'masker' is missing")
    plan = None
    if not model.masker.in_step:
        plan = MaskPlan.collate([model.masker(torch.Generator().manual_seed(seed))])
    inputs = (image, *(plan.tensors() if plan is not None else ()))
    plan_type = type(plan) if plan is not None else None
    logging.getLogger("fvcore").setLevel(logging.ERROR)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # jit tracer / deprecation chatter
        analysis = FlopCountAnalysis(_TraceableStep(model, extras, plan_type), inputs)
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        analysis.total()  # runs the trace inside the warning filter
    return analysis, model


def cli(args: argparse.Namespace) -> int:
    """``maelab flops --recipe NAME [--env ENV] [--json]``."""
    from maelab.config import load_recipe

    recipe = with_untrained_teachers(load_recipe(args.recipe, args.env))  # FLOPs do not depend on weights
    analysis, model = _analysis(recipe, 0)  # one trace for the total and the parts
    gmacs = analysis.total() / 1e9
    parts = _split(analysis, model) if getattr(args, "parts", False) else None
    if args.json:
        out = {"recipe": args.recipe, "gmacs": round(gmacs, 4)}
        print(json.dumps({**out, "parts": parts} if parts else out))
    else:
        print(f"{args.recipe} ({args.env or 'base'}): {gmacs:.3f} GMACs per image (one training forward)")
        for name, value in (parts or {}).items():
            print(f"  {name:<28} {value:8.4f}")
    return 0
