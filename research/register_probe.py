"""Does a register token keep a ViT's attention on the person?

``research.attention_probe`` finds that the demo's trained models turn flat background
patches into large tokens after the first block and that the class token's attention, and the
rollout built from it, lean toward them. Darcet et al. (2024, "Vision Transformers Need
Registers") remove such tokens with extra prefix tokens that no head reads. This probe
pretrains the demo backbone's recipe (``sureid.demo.pretrain_dense_model``: random weights, CE
+ triplet, the same seed and people) once per prefix-token count (1: the class token alone; 2:
plus one register, the second prefix token, which the head never reads), then measures each
model with the attention probe's numbers on a finished demo folder's occluded queries: body
AUC and top-k body share of each importance, and the background / body norm after the first
block. ``--builtin`` adds the shipped student backbone (the same recipe, 4000 steps, one
prefix token). ``--quick`` pretrains at ``sureid.demo.quick_settings``' sizes on 8 people
(a smoke run whose numbers mean nothing). research/notes/attention-probes.md quotes its table,
from three runs (CPU training is not bit-reproducible, so a rerun, or another thread count,
gives other numbers). From the repository root:

    python -m research.register_probe runs/demo_s0 --steps 4000 --prefix-tokens 1 --threads 1
    python -m research.register_probe runs/demo_s0 --steps 4000 --prefix-tokens 2 --threads 1
    python -m research.register_probe runs/demo_s0 --builtin --prefix-tokens
"""

from __future__ import annotations

import argparse
from pathlib import Path

from research.attention_probe import (
    body_flags,
    demo_queries,
    importance_maps,
    norm_sources,
    probe_model,
)
from sureid.demo import backbone_model, pretrain_dense_model, quick_settings


def measure(model, query, keep: int, maps_and_norms=None) -> dict:
    """The attention probe's numbers for ``model`` over ``query``: per importance method, body
    AUC and top-``keep`` body share; the background / body norm after block 1; the Spearman of
    each importance with that norm. ``maps_and_norms``: ``importance_maps(model, query)`` when
    the caller has it already."""
    maps, norms = maps_and_norms or importance_maps(model, query)
    flags = body_flags(query, model.config)
    rows, ratios = probe_model(model.config, maps, norms, flags, keep)
    _, _, rhos, _ = norm_sources(maps, norms, flags)
    return {
        "auc": {method: auc for method, auc, *_ in rows},
        "top": {method: share for method, _, share, *_ in rows},
        "chance": rows[0][3],
        "norm_ratio": ratios[0],
        "rho_norm": rhos,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("demo_folder", type=Path, help="a finished `sureid demo --out` folder")
    parser.add_argument("--steps", type=int, default=4000, help="pretraining steps per model")
    parser.add_argument(
        "--prefix-tokens",
        type=int,
        nargs="*",
        default=[1, 2],
        choices=[1, 2],
        help="one model pretrained per count (none: only --builtin)",
    )
    parser.add_argument("--builtin", action="store_true", help="also the shipped backbone")
    parser.add_argument("--keep", type=int, default=44, help="top-k for the body share")
    parser.add_argument("--work-dir", type=Path, default=Path("runs/register_probe"))
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 8 people: a smoke run")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    tiny = dict(settings=quick_settings(), num_ids=8) if args.quick else {}
    query = demo_queries(args.demo_folder, args.threads)
    models = []
    if args.builtin:
        models.append(("shipped backbone (4000 steps)", 1, backbone_model()))
    for prefix in args.prefix_tokens:
        model, seconds = pretrain_dense_model(
            steps=args.steps,
            work_dir=args.work_dir / f"prefix{prefix}",
            num_prefix_tokens=prefix,
            log=lambda m: print(m, flush=True),
            **tiny,
        )
        print(f"  {args.steps} steps in {seconds / 60:.1f} min", flush=True)
        models.append((f"pretrained here ({args.steps} steps)", prefix, model))
    print(
        "\n| model | prefix tokens | body AUC: rollout / cls-attention / attention-norm "
        f"| top-{args.keep} on body: rollout / cls-attention (chance) "
        "| background / body norm after block 1 | Spearman of rollout / cls-attention with that norm |"
    )
    print("|---|---|---|---|---|---|")
    for name, prefix, model in models:
        m = measure(model, query, args.keep)
        auc, top = m["auc"], m["top"]
        print(
            f"| {name} | {prefix} | {auc['rollout']:.2f} / {auc['cls-attention']:.2f} / "
            f"{auc['attention-norm']:.2f} | {100 * top['rollout']:.0f}% / "
            f"{100 * top['cls-attention']:.0f}% ({100 * m['chance']:.0f}%) | "
            f"{m['norm_ratio']:.2f} | {m['rho_norm'][0]:+.2f} / {m['rho_norm'][1]:+.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
