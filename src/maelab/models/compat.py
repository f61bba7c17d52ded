"""Which parts of a recipe can go together (DESIGN.md: "recipes can combine, the parts are independent").

Every branch of a step reads the one ``MaskPlan`` the masker made, so a combination is sound when each
head gets the kind of plan it relies on. A masker states the *traits* of its plans (``plan_traits``), a
head what it needs and why (``plan_needs() -> {trait: reason}``); ``check_compatible`` runs when a recipe is
built, so a bad combination fails at start with the reason instead of training on a wrong plan.

Traits so far:

- ``full_grid``: a plan is ``[L]`` over the whole patch grid (``ids_restore`` restores raster order). Every
  masker but LoMaR's; the default for a masker that states nothing. LoMaR's window plans (over the ``n*k*k``
  window tokens, see ``maelab.masking.window``) do not have it, so a head that needs it (the MAE pixel
  decoder, R-MAE's region head) cannot go with LoMaR's windows.
- ``windows``: a ``WindowPlan`` (LoMaR's ``n`` windows of ``k x k`` tokens and their grid indices); the
  LoMaR head needs it.
- ``random_order``: the plan's shuffle order is uniformly random, so a prefix of it is a random plan too
  (``maelab.masking.nested_plan``: R-MAE's beta_R != beta_I). ``RandomMasker`` has it; the block masker
  keeps raster order and does not.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

DEFAULT_PLAN_TRAITS = frozenset({"full_grid"})


class IncompatibleRecipeError(ValueError):
    """A recipe combines parts that cannot go together; the message says which and why."""


def plan_traits(masker: Any) -> frozenset[str]:
    """What ``masker``'s plans offer (``DEFAULT_PLAN_TRAITS`` for a masker that does not say)."""
    return frozenset(getattr(masker, "plan_traits", DEFAULT_PLAN_TRAITS))


def check_compatible(masker: Any, heads: Mapping[str, Any], recipe: str = "<recipe>") -> None:
    """Raise ``IncompatibleRecipeError`` listing every head whose needs ``masker``'s plans do not meet."""
    if masker is None:  # plans come from the caller (tests, interactive use): nothing to check here
        return
    have = plan_traits(masker)
    problems = []
    for name, head in heads.items():
        needs = head.plan_needs() if hasattr(head, "plan_needs") else {}
        for trait, reason in needs.items():
            if trait not in have:
                problems.append(
                    f"heads.{name} ({type(head).__name__}) needs plans with {trait!r}, which masker "
                    f"{type(masker).__name__} does not give (it gives {sorted(have)}): {reason}"
                )
    if problems:
        raise IncompatibleRecipeError(
            f"recipe {recipe}: these parts cannot go together:\n  - " + "\n  - ".join(problems)
        )
