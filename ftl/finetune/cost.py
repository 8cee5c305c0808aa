"""What fine-tuning's candidates cost: said before they run (epochs × images, the blocks that train, whether the
frozen prefix is cached), and after, what finetune.budget_minutes cut short."""

from __future__ import annotations

from ftl.finetune import blocks, trainer


def before(plan: blocks.Plan, cfg, *, images: int) -> list[str]:
    """What each candidate will cost, said before it runs: its epochs × images, the blocks it trains, and
    whether the frozen prefix is cached (the cut is the earliest candidate's: at the input, nothing is)."""
    epochs, cached = cfg.epochs, cfg.cache_prefix
    lines = [f"finetune: candidate {i}/{len(plan.candidates)} {blocks.describe(c, plan.order)}: up to {epochs} "
             f"epochs × {images:,} images = {epochs * images:,} image passes, {len(c)} of {len(plan.order)} blocks "
             f"trained" + (f", layer decay {decay:g}" if (decay := blocks.layer_decay(cfg, c, plan.order)) else "")
             for i, c in enumerate(plan.candidates, 1)]
    if cached and plan.cut is None:
        first = min(plan.candidates, key=lambda c: plan.order.index(c[0]))
        lines.append(f"finetune: candidate {blocks.describe(first, plan.order)} starts at the input, so the frozen "
                     f"prefix is empty and nothing is cached: every epoch of every candidate runs the whole network. "
                     f"Leave first_stage out of finetune.auto_candidates to cache the blocks below the others")
    elif cached:
        lines.append(f"finetune: the frozen prefix up to {plan.cut} runs once; every epoch starts there")
    if cfg.budget_minutes is not None:
        lines.append(f"finetune: budget {cfg.budget_minutes:g} min for the candidates' epochs, in this order; an "
                     f"epoch that would end past it is not started")
    return lines


def after(cfg, tuned: trainer.Tuned, plan: blocks.Plan) -> list[str]:
    """What finetune.budget_minutes cut short: candidates stopped early, and those never started."""
    if cfg.budget_minutes is None:
        return []
    short = [f"{blocks.describe(c['blocks'], plan.order)} after epoch {c['history'][-1]['epoch']}"
             for c in tuned.candidates if c.get("out_of_budget")]
    skipped = [blocks.describe(plan.candidates[i], plan.order) for i in tuned.skipped]
    if not short and not skipped:
        return [f"finetune.budget_minutes {cfg.budget_minutes:g}: every candidate ran within it"]
    return [f"finetune.budget_minutes {cfg.budget_minutes:g}: " + "; ".join(
        ([f"stopped {', '.join(short)} (the next epoch would have ended past the budget)"] if short else [])
        + ([f"skipped {', '.join(skipped)} (not started: the budget was spent)"] if skipped else []))
        + ". Raise finetune.budget_minutes to train them in full"]
