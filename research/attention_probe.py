"""Where a trained demo model's attention goes: on the person, or elsewhere?

The predictor check compares the HTS students' keep scores with the teacher's attention rollout.
This probe asks whether that reference itself points at the person. For the teacher and the
dense student of a finished ``sureid demo`` folder, and for each token importance
(``sureid.analysis.token_importance``: rollout, cls-attention, attention-norm), over the
occluded queries, with the synthetic set's visible-body masks:

- body AUC: how often a visible-body patch outranks a patch that is not (0.5 = no preference);
- top-k on body: share of visible-body patches among the top k (by default the last-stage
  budget of the folder's first HTS student: 44 of 128 in the demo), against chance;
- border mass: share of the importance on the outer ring of the patch grid, against the ring's
  share of the patches;
- same map: mean correlation of each image's map with the mean map over the queries (1 = the
  importance depends on the position only, not on the image).

It also prints the hidden-state norm of background patches over that of body patches after
each block, and where those norms come from: how flat the background patches are (pixel
standard deviation within the patch) and how large their embeddings are, against the body's;
how each importance ranks the tokens by their norm after the first block; and, within the
background, how flatness and that norm go together. And, for each HTS student of the folder,
the Spearman correlation of its stage-1 keep score with each of the teacher's importances (the
predictor check's Spearman uses the rollout) and its body AUC. research/notes/attention-probes.md
quotes its tables. From the repository root:

    sureid demo --seed 0 --out runs/demo_s0
    python -m research.attention_probe runs/demo_s0
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sureid import SureidImageProcessor, SureidModel
from sureid.analysis import (
    IMPORTANCE_METHODS,
    auc_rows,
    patch_body_flags,
    resample_importance,
    spearman_rows,
    token_importance,
)
from sureid.data import load_reid_dataset
from sureid.inference import iter_pixel_batches


def border_ring(grid: tuple[int, int]) -> torch.Tensor:
    """[rows * cols] bools: the patches on the grid's outer ring."""
    rows, cols = grid
    ring = torch.zeros(rows, cols, dtype=torch.bool)
    ring[0], ring[-1], ring[:, 0], ring[:, -1] = True, True, True, True
    return ring.flatten()


def patch_pixel_std(pixels: torch.Tensor, config) -> torch.Tensor:
    """[B, N]: the standard deviation of each patch's pixel values (all channels), patches
    cut as the model's patch embedding cuts them (``patch_size``, ``stride_size``)."""
    patches = F.unfold(pixels, kernel_size=config.patch_size, stride=config.stride_size)
    if patches.shape[-1] != config.num_patches:
        raise ValueError(
            f"{patches.shape[-1]} patches cut, but the model has {config.num_patches}: "
            "pixels must be at the model's image size"
        )
    return patches.std(dim=1)


def importance_maps(model, query) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    """Each importance of ``model`` over the queries ({method: [Q, N]}, and under
    ``"pixel std"`` each patch's ``patch_pixel_std``), and the image tokens' hidden-state norms
    of the embedding (position 0) and after each block ([Q, N] each); the model run densely."""
    processor = SureidImageProcessor.from_model_config(model.config)
    maps = {method: [] for method in IMPORTANCE_METHODS}
    norms, flatness = [], []
    p = model.config.num_prefix_tokens
    with torch.no_grad():
        for _, pixels in iter_pixel_batches(query, processor, 64):
            for method in IMPORTANCE_METHODS:
                maps[method].append(token_importance(model, pixels, method).float())
            norms.append([h[:, p:].norm(dim=-1) for h in _hidden_states(model, pixels)])
            flatness.append(patch_pixel_std(pixels, model.config))
    blocks = [torch.cat([batch[block] for batch in norms]) for block in range(len(norms[0]))]
    maps = {method: torch.cat(parts) for method, parts in maps.items()}
    maps["pixel std"] = torch.cat(flatness)
    return maps, blocks


def norm_sources(maps, norms, flags) -> tuple[float, float, list[float], float]:
    """From ``importance_maps``: background / body ratio of the pixel std and of the embedding
    norm; the Spearman of each importance with the norm after the first block; and, over the
    background patches of each image, the Spearman of the pixel std with that norm."""

    def ratio(values):
        return float(values[~flags].mean() / values[flags].mean())

    after_first = norms[1]
    rhos = [float(spearman_rows(maps[m], after_first).mean()) for m in IMPORTANCE_METHODS]
    background = []
    for std, norm, body in zip(maps["pixel std"], after_first, flags):
        if int((~body).sum()) > 2:
            background.append(float(spearman_rows(std[None, ~body], norm[None, ~body])[0]))
    return ratio(maps["pixel std"]), ratio(norms[0]), rhos, float(np.mean(background))


def body_flags(query, config) -> torch.Tensor:
    """[Q, N] bools: each query's visible-body patches on ``config``'s grid (read from the
    masks once per model, shared by ``probe_model`` and ``norm_sources``)."""
    return torch.stack([patch_body_flags(path, config) for path in query["body_mask_path"]])


def probe_model(config, maps, norms, flags, keep: int) -> tuple[list[tuple], list[float]]:
    """From a model's ``importance_maps`` and its ``body_flags``: (per importance method: name,
    body AUC, top-k body share, chance, border mass, ring share, same-map correlation), and the
    background / body norm ratio after each block."""
    ring = border_ring(config.grid_size)
    rows = []
    for method in IMPORTANCE_METHODS:
        imp = maps[method]
        auc = auc_rows(imp, flags)
        top = imp.topk(keep, dim=1).indices
        share = torch.gather(flags.float(), 1, top).mean()
        mass = imp / imp.sum(1, keepdim=True)
        mean_map = mass.mean(0)
        same = np.mean([np.corrcoef(m.numpy(), mean_map.numpy())[0, 1] for m in mass])
        rows.append(
            (
                method,
                float(auc[~auc.isnan()].mean()),
                float(share),
                float(flags.float().mean()),
                float(mass[:, ring].sum(1).mean()),
                float(ring.float().mean()),
                float(same),
            )
        )
    ratios = [float(n[~flags].mean() / n[flags].mean()) for n in norms[1:]]
    return rows, ratios


def probe_students(folder: Path, names, teacher_config, teacher_maps, query) -> list[tuple]:
    """Per HTS student: name, Spearman of its stage-1 keep score with each of the teacher's
    importances (``teacher_maps`` from ``importance_maps``, in ``IMPORTANCE_METHODS`` order),
    its body AUC."""
    rows = []
    for name in names:
        student = SureidModel.from_pretrained(folder / name).eval()
        processor = SureidImageProcessor.from_model_config(student.config)
        flags = body_flags(query, student.config)
        with torch.no_grad():
            scores = torch.cat(
                [
                    student.forward_masked(pixels, decide=student.keep_topk).keep_logits[0].float()
                    for _, pixels in iter_pixel_batches(query, processor, 64)
                ]
            )
        rhos = [
            spearman_rows(
                scores,
                resample_importance(
                    teacher_maps[method], teacher_config.grid_size, student.config.grid_size
                ),
            )
            for method in IMPORTANCE_METHODS
        ]
        auc = auc_rows(scores, flags)
        rows.append((name, [float(r.mean()) for r in rhos], float(auc[~auc.isnan()].mean())))
    return rows


def last_stage_budget(folder: Path, students) -> int | None:
    """Image tokens the first HTS student keeps in its last blocks (None without one)."""
    from sureid import SureidStudentConfig

    for name in students:
        config = SureidStudentConfig.from_pretrained(folder / name)
        if config.hts_enabled:
            return config.tokens_per_block()[-1] - config.num_prefix_tokens
    return None


def _hidden_states(model, pixels) -> list[torch.Tensor]:
    """The embedding (patches plus positions) and every block's output, the model run densely
    (no token dropped), [B, N, C] each."""
    x = model.encoder.embed(pixels)
    states = [x]
    for block in model.encoder.blocks:
        x = block(x)
        states.append(x)
    return states


def demo_queries(folder: Path, threads: int = 0):
    """The occluded queries of a finished demo folder; quiets transformers' loading messages
    and sets torch's thread count when ``threads`` is given."""
    logging.getLogger("transformers").setLevel(logging.ERROR)
    if threads:
        torch.set_num_threads(threads)
    return load_reid_dataset("synthetic", folder / "data")["query"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("demo_folder", type=Path, help="a finished `sureid demo --out` folder")
    parser.add_argument("--models", nargs="+", default=["teacher", "dense"])
    parser.add_argument(
        "--keep", type=int, default=None, help="top-k for the body share (default: see above)"
    )
    parser.add_argument(
        "--students", nargs="*", default=["hts", "hts_npkd", "hts_npkd_noda"], help="HTS rows"
    )
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    query = demo_queries(args.demo_folder, args.threads)
    students = [n for n in args.students if (args.demo_folder / n).is_dir()]
    keep = args.keep or last_stage_budget(args.demo_folder, students)
    print(
        "| model | importance | body AUC | top-k on body (chance) | border mass (ring share) "
        "| same map |"
    )
    print("|---|---|---|---|---|---|")
    all_ratios, all_maps, configs, sources = {}, {}, {}, {}
    for name in args.models:
        model = SureidModel.from_pretrained(args.demo_folder / name).eval()
        configs[name] = model.config
        all_maps[name], norms = importance_maps(model, query)
        flags = body_flags(query, model.config)
        rows, all_ratios[name] = probe_model(
            model.config, all_maps[name], norms, flags, keep or model.config.num_patches
        )
        sources[name] = norm_sources(all_maps[name], norms, flags)
        for method, auc, share, chance, mass, ring, same in rows:
            print(
                f"| {name} | {method} | {auc:.2f} | {100 * share:.0f}% ({100 * chance:.0f}%) "
                f"| {100 * mass:.0f}% ({100 * ring:.0f}%) | {same:.2f} |"
            )
    print("\nhidden-state norm, background patches over body patches, after each block:")
    for name, ratios in all_ratios.items():
        print(f"{name}: " + " ".join(f"{r:.2f}" for r in ratios))
    methods = " / ".join(IMPORTANCE_METHODS)
    print(
        "\n| model | background / body: pixel std | embedding norm | norm after block 1 "
        f"| Spearman with the norm after block 1: {methods} "
        "| background only: Spearman of pixel std with the norm after block 1 |"
    )
    print("|---|---|---|---|---|---|")
    for name, (flat, embed, rhos, background) in sources.items():
        print(
            f"| {name} | {flat:.2f} | {embed:.2f} | {all_ratios[name][0]:.2f} | "
            + " / ".join(f"{r:+.2f}" for r in rhos)
            + f" | {background:+.2f} |"
        )
    if not students:
        return
    if "teacher" not in all_maps:
        teacher = SureidModel.from_pretrained(args.demo_folder / "teacher").eval()
        configs["teacher"] = teacher.config
        all_maps["teacher"] = importance_maps(teacher, query)[0]
    methods = " | ".join(f"Spearman vs teacher's {m}" for m in IMPORTANCE_METHODS)
    print(f"\n| HTS student | {methods} | body AUC |")
    print("|---" * (len(IMPORTANCE_METHODS) + 2) + "|")
    for name, rhos, auc in probe_students(
        args.demo_folder, students, configs["teacher"], all_maps["teacher"], query
    ):
        print(f"| {name} | " + " | ".join(f"{r:+.2f}" for r in rhos) + f" | {auc:.2f} |")


if __name__ == "__main__":
    main()
