"""Self-guided MAE's masker (Shi et al. 2024, §4): random masking until the decoder exploits its mask
tokens, then informed masks from the model's own token relations for the rest of the run.

It runs in the training step (``in_step``): ``plan_batch(batch, context)`` gets the model as
``context.model`` and returns a ``MaskPlan [B, L]``.

**Phases.** ``random`` first: MAE's per-sample random masking. Every ``monitor_every`` steps the exploitation
rates (§3.4, Eq. 5-7, ``maelab.masking.exploitation``) are measured on a small fixed monitoring batch (the
first ``monitor_size`` images the masker sees, with one fixed random plan): an encoder pass on the visible
tokens and the pixel decoder with the attention of every block kept (under DDP the rates are averaged over
the ranks, so every rank switches at the same step). §4 "When to start": the switch comes
when ``R_{M→O} ≥ R_{V→O}`` after the last decoder layer. At initialisation the decoder's attention is nearly
uniform and ``R_{M→O} ≈ m > 1/2`` holds trivially (three quarters of the decoder's tokens are mask
tokens), while the paper's curve (Fig. 4) starts below and crosses at T ≈ 50 epochs; so the rule is armed
once ``R_{M→O} < R_{V→O}`` has been measured and fires at the first measurement after that with
``R_{M→O} ≥ R_{V→O}`` (our reading). ``switch_epoch: E`` forces the switch at the first step of epoch E
instead (rates are still measured and logged); ``switch_at_step: S`` forces it at optimiser step S (short
runs, tests). The switch is permanent; the phase, the step it came at,
the monitoring batch and the last rates are this module's buffers (``run_state``, ``monitor_images``,
``rate_curve``), so they live in the model's state dict and thus in the training checkpoint (exact resume
across the switch) with no change to the engine.

**Informed masks** (§4), per image, from a no-grad full-image pass:

- features of all patches at one layer: ``source: encoder`` (default) and ``layer: -2`` (the second-to-last
  block, the paper's "Enc 11" of ViT-B; Table 3's Enc 3 / Enc 7 are ``layer: 2`` / ``layer: 6``, 0-based),
  or ``source: decoder`` with ``layer: -1`` ("Dec 8": the pixel decoder on every token of the encoder's
  full-image output, ``D(E(X))`` as App. B). ``feature: attn_value`` (default) takes Eq. 2's
  ``x' = A (X W^V)`` (the block's attention output before its projection, all heads concatenated);
  ``feature: block`` the block's output. The pass stops at that block.
- ``include_cls: false`` (default): the graph is over the ``L`` patches only (the paper's 196 x 196);
  ``true`` adds CLS as a node (it is never masked).
- the normalised cut, object cluster and relevance ``S`` (Eq. 8): ``maelab.masking.ncut`` (``graph``,
  ``tau``, ``solver``, ``power_iters``).
- ``target``: ``object`` (default), ``background`` (the other side) or ``alternate`` (object on even epochs,
  background on odd ones), Table II.
- the ``L - int(L (1 - ratio))`` patches to mask (MAE's count) plus ``n_hint`` more are taken in order of
  decreasing ``S``; then ``n_hint = round(h L)`` of them are made visible again as hint tokens, so exactly
  ``int(L (1 - ratio))`` patches stay visible. ``hint: random`` (default) picks them uniformly, ``s_based``
  with probability proportional to ``max(S, 1e-6)`` (Gumbel top-k), ``none`` adds none (Table 3).
  ``h = hint_ratio`` (0.05, App. D) when the switch comes, moving linearly to ``hint_ratio_end`` at the end
  of the run (default: equal, i.e. constant; the paper says "decaying ratio, following SemMAE" without the
  schedule).

**Cost** (the paper reports 1.0025x MAE's time, Table IV, without saying how). The full-image pass stops at
the chosen block and is no-grad; the eigenproblem is one batched ``eigh`` (or ``solver: power``, a
subspace iteration for accelerators).
``refresh_every: N`` builds informed masks on every N-th step only and random ones in between (a departure
from the paper, which masks every step after the switch; default 1 = faithful), cutting the extra pass to
1/N of the steps.

Random draws (the random plans, the hint choice) come from per-sample generators seeded by
``(seed, epoch, index)`` (the batch's ``index``), so plans do not depend on the data-loading order or the
global RNG.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from maelab.masking.context import MaskContext
from maelab.masking.exploitation import exploitation_rates, rate_metrics
from maelab.masking.maskers import Grid, Masker, _check_ratio
from maelab.masking.ncut import GRAPHS, SOLVERS, bipartition, ncut_vector, relevance, similarity_graph
from maelab.masking.plan import MaskPlan

RANDOM, INFORMED = 0, 1
TARGETS, HINTS, SOURCES, FEATURES = (
    ("object", "background", "alternate"),
    ("random", "s_based", "none"),
    ("encoder", "decoder"),
    ("attn_value", "block"),
)
_MONITOR_STREAM = 0x4D4F4E  # seeds the monitoring plan apart from every sample's


def _choice(name: str, value: str, options: tuple[str, ...]) -> str:
    if value not in options:
        raise ValueError(f"masker.{name} {value!r} is unknown; choose one of {list(options)}")
    return value


def sample_noise(seed: int, epoch: int, indices: list[int], num_patches: int) -> Tensor:
    """[B, L] uniform noise, one generator per sample seeded by ``(seed, epoch, index)``."""
    rows = []
    for index in indices:
        state = np.random.SeedSequence([seed, epoch, index, 0x5347]).generate_state(2, np.uint32)
        g = torch.Generator().manual_seed(((int(state[0]) << 32) | int(state[1])) & (2**63 - 1))
        rows.append(torch.rand(num_patches, generator=g))
    return torch.stack(rows)


def informed_mask(scores: Tensor, noise: Tensor, ratio: float, n_hint: int, hint: str = "random") -> Tensor:
    """[B, L] relevance ``S`` -> [B, L] bool mask (True = masked): the ``L - int(L (1 - ratio)) + n_hint``
    most relevant patches, less ``n_hint`` hints chosen among them (``hint``: random by ``noise`` [B, L] in
    (0, 1), or ``s_based``: proportional to ``S``). Every row keeps exactly ``int(L (1 - ratio))`` patches."""
    b, num = scores.shape
    num_keep = int(num * (1 - ratio))
    n_hint = 0 if hint == "none" else max(0, min(int(n_hint), num_keep))
    order = torch.argsort(scores.float(), dim=-1, descending=True, stable=True)  # most relevant first
    candidates = order[:, : num - num_keep + n_hint]  # [B, n_mask + n_hint]
    mask = torch.zeros(b, num, dtype=torch.bool, device=scores.device)
    mask.scatter_(1, candidates, torch.ones_like(candidates, dtype=torch.bool))  # (tensor src: traceable)
    if n_hint:
        u = noise.to(scores.device).gather(1, candidates).clamp(1e-12, 1 - 1e-7)
        if hint == "s_based":  # Gumbel top-k: a draw without replacement, probability proportional to S
            logp = scores.float().gather(1, candidates).clamp_min(1e-6).log()
            key = -(logp - torch.log(-torch.log(u)))
        else:
            key = u
        hints = candidates.gather(1, torch.argsort(key, dim=-1, stable=True)[:, :n_hint])
        mask.scatter_(1, hints, torch.zeros_like(hints, dtype=torch.bool))
    return mask


class SelfGuidedMasker(Masker, nn.Module):
    """Self-guided MAE's masker; see the module docstring for the phases, the informed masks and the knobs."""

    in_step = True
    plan_traits = frozenset({"full_grid"})

    def __init__(
        self,
        grid: Grid,
        ratio: float = 0.75,
        *,
        source: str = "encoder",
        layer: int = -2,
        feature: str = "attn_value",
        include_cls: bool = False,
        graph: str = "clamp",
        tau: float = 0.2,
        solver: str = "eigh",
        power_iters: int = 100,
        target: str = "object",
        hint: str = "random",
        hint_ratio: float = 0.05,
        hint_ratio_end: float | None = None,
        switch_epoch: int | None = None,
        switch_at_step: int | None = None,
        monitor_every: int = 50,
        monitor_size: int = 8,
        refresh_every: int = 1,
        seed: int = 0,
    ) -> None:
        nn.Module.__init__(self)
        Masker.__init__(self, grid)
        self.ratio = _check_ratio("SelfGuidedMasker", ratio)
        self.source, self.layer = _choice("source", source, SOURCES), int(layer)
        self.feature, self.include_cls = _choice("feature", feature, FEATURES), bool(include_cls)
        self.graph, self.tau = _choice("graph", graph, GRAPHS), float(tau)
        self.solver, self.power_iters = _choice("solver", solver, SOLVERS), int(power_iters)
        self.target, self.hint = _choice("target", target, TARGETS), _choice("hint", hint, HINTS)
        self.hint_ratio = float(hint_ratio)
        self.hint_ratio_end = self.hint_ratio if hint_ratio_end is None else float(hint_ratio_end)
        self.switch_epoch = None if switch_epoch is None else int(switch_epoch)
        self.switch_at_step = None if switch_at_step is None else int(switch_at_step)
        self.monitor_every, self.monitor_size = int(monitor_every), int(monitor_size)
        self.refresh_every, self.seed = max(1, int(refresh_every)), int(seed)
        # run state, in buffers so it is saved with the model: python mirrors, written back on change
        self.phase, self.switch_step, self.armed, self.monitored = RANDOM, -1, False, -1
        self.rates: dict[str, float] = {}
        self.register_buffer(
            "run_state", torch.tensor([RANDOM, -1, 0, -1])
        )  # phase, switch, armed, monitored
        self.register_buffer("monitor_images", torch.zeros(0))  # [K, C, H, W] once the first batch is seen
        self.register_buffer("rate_curve", torch.zeros(0))  # [2, decoder layers]: R_{M→O}, R_{V→O}

    def __repr__(self) -> str:
        return f"SelfGuidedMasker(grid={self.grid}, ratio={self.ratio}, phase={self.phase})"

    # -- state -------------------------------------------------------------------------------------
    def _write_state(self) -> None:
        values = [self.phase, self.switch_step, int(self.armed), self.monitored]
        self.run_state.copy_(torch.tensor(values))

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        for name in ("monitor_images", "rate_curve"):  # lazily sized: take the saved shape
            if prefix + name in state_dict:
                setattr(self, name, torch.empty_like(state_dict[prefix + name], device=self.run_state.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        phase, switch_step, armed, monitored = self.run_state.tolist()
        self.phase, self.switch_step, self.armed, self.monitored = phase, switch_step, bool(armed), monitored
        curve = self.rate_curve
        self.rates = rate_metrics(curve[0], curve[1]) if curve.numel() else {}

    def metrics(self) -> dict[str, float]:
        """What to log: the phase, the switch step (-1 before) and the last exploitation rates."""
        return {"sgmae/phase": float(self.phase), "sgmae/switch_step": float(self.switch_step), **self.rates}

    # -- the step ------------------------------------------------------------------------------------
    def plan_batch(self, batch: dict[str, Any], context: MaskContext) -> MaskPlan:
        model, images = context.model, batch["image"]
        if model is None:
            raise ValueError("SelfGuidedMasker runs in the step: MaskContext.model must be the model")
        if not self.monitor_images.numel():
            self.monitor_images = images[: self.monitor_size].detach().float().clone()
        self.monitor(model, context.step)
        if self.phase == RANDOM and self.forced(context):
            self.switch(context.step)
        index = batch.get("index")
        indices = index.tolist() if isinstance(index, Tensor) else list(range(images.shape[0]))
        noise = sample_noise(self.seed, context.epoch, indices, self.num_patches).to(images.device)
        if self.phase == RANDOM or context.step % self.refresh_every:
            return MaskPlan.from_noise(noise, self.ratio)
        scores = self.scores(model, images, context.epoch)
        mask = informed_mask(scores, noise, self.ratio, self.num_hints(context), self.hint)
        return MaskPlan.from_mask(mask)

    def forced(self, context: MaskContext) -> bool:
        """Whether the recipe forces the switch now (``switch_epoch`` or ``switch_at_step`` reached)."""
        by_epoch = self.switch_epoch is not None and context.epoch >= self.switch_epoch
        return by_epoch or (self.switch_at_step is not None and context.step >= self.switch_at_step)

    def switch(self, step: int) -> None:
        self.phase, self.switch_step = INFORMED, int(step)
        self._write_state()

    def num_hints(self, context: MaskContext) -> int:
        total, start = context.total_steps, max(self.switch_step, 0)
        t = min(1.0, (context.step - start) / (total - start)) if total > start else 0.0
        return round((self.hint_ratio + t * (self.hint_ratio_end - self.hint_ratio)) * self.num_patches)

    @torch.no_grad()
    def scores(self, model: nn.Module, images: Tensor, epoch: int) -> Tensor:
        """[B, C, H, W] -> relevance ``S`` [B, L] of every patch to the target cluster (§4, Eq. 8)."""
        feats = self.features(model, images)  # [B, 1+L, D]
        x = feats if self.include_cls else feats[:, 1:]
        cluster = bipartition(
            ncut_vector(similarity_graph(x, self.graph, self.tau), self.solver, self.power_iters)
        )
        if self.target == "background" or (self.target == "alternate" and epoch % 2 == 1):
            cluster = ~cluster
        s = relevance(x, cluster)
        return s[:, 1:] if self.include_cls else s

    def features(self, model: nn.Module, images: Tensor) -> Tensor:
        """[B, 1+L, D'] features of every token at the chosen block (a no-grad pass that stops there)."""
        encoder = model.encoder
        if self.source == "encoder":
            blocks = list(encoder.blocks)
            x = encoder.embed(images)  # [B, 1+L, D]
        else:
            _, head = model.pixel_head()
            if getattr(head, "downsample", 1) != 1:
                raise ValueError("masker.source decoder needs the pixel decoder without downsample")
            blocks = list(head.decoder_blocks)
            x = head.decoder_embed(encoder.forward_features(images)) + head.decoder_pos_embed  # D(E(X))
        last = self.layer % len(blocks)
        captured: list[Tensor] = []
        hook = None
        if self.feature == "attn_value":  # Eq. 2: x' = A (X W^V), the input of the attention's projection
            hook = blocks[last].attn.proj.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
        try:
            for blk in blocks[: last + 1]:
                x = blk(x)
        finally:
            if hook is not None:
                hook.remove()
        return captured[0] if captured else x

    @torch.no_grad()
    def monitor(self, model: nn.Module, step: int) -> None:
        """§3.4 on the monitoring batch every ``monitor_every`` steps; may switch to informed masking."""
        if self.monitor_every <= 0 or step % self.monitor_every or step == self.monitored:
            return
        self.monitored = step
        self._write_state()
        _, head = model.pixel_head()
        device = next(head.parameters()).device
        images = self.monitor_images
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + _MONITOR_STREAM)
        noise = torch.rand(images.shape[0], self.num_patches, generator=g)
        plan = MaskPlan.from_noise(noise, self.ratio).to(device)
        latent = model.encoder.forward_features(images, plan)
        _, maps = head.decode_attention(latent, plan, range(len(head.decoder_blocks)))
        rates = exploitation_rates(maps, plan.mask)
        both = torch.stack([rates.R_MO, rates.R_VO])  # [2, layers]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(both)  # every rank decides alike
            both /= torch.distributed.get_world_size()
        rates = type(rates)(rates.r, rates.R, both[0], both[1])
        self.rate_curve = both.detach().clone()
        self.rates = rates.metrics()
        self.observe(float(both[0, -1]), float(both[1, -1]), step)

    def observe(self, r_mo: float, r_vo: float, step: int) -> None:
        """§4 "When to start" on one measurement at the last decoder layer: switch when ``R_{M→O} ≥ R_{V→O}``
        once armed (a measurement with ``R_{M→O} < R_{V→O}`` seen before); ignored when the switch is
        forced."""
        if self.phase != RANDOM or self.switch_epoch is not None or self.switch_at_step is not None:
            return
        if r_mo >= r_vo and self.armed:
            self.switch(step)
        if not self.armed and r_mo < r_vo:
            self.armed = True
            self._write_state()
