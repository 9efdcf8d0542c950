"""How much of the expected gradient a projector taken from one small batch captures (issue 29).

GaLore(+) takes its rank-``r`` projector from the gradient of the step at a refresh: in §9's
fine-tuning protocol one batch of 4 examples. If that gradient is mostly noise, its top singular
directions are the noise's, and the projected updates until the next refresh follow them. This
measures it on the fine-tuning protocol's own model, data and first batches, at the pretrained
weights: for every projected matrix of the chosen layers (the library's ``find_targets``, the side
``projection_side(shape, "std")`` picks, rank ``--rank``)

- ``G_i``: the gradient of batch ``i`` (the run's own batches: ``finetune.batch_indices``), the loss
  the command trains on (answer tokens, token mean);
- the **signal**: ``G_B``, the mean gradient of the second half of the batches (independent of the
  first half's), standing in for the expected gradient;
- captured share ``‖proj_P(G_B)‖² / ‖G_B‖²`` for ``P`` the top-``r`` singular vectors of one batch's
  gradient ``G_i`` (first half; what a refresh at batch size 4 takes), of the first half's mean
  gradient (``--batches/2`` batches), of ``G_B`` itself (the best any rank-``r`` projector can do
  on that estimate, biased up by its own noise), and of a seeded random orthonormal ``P`` (what
  LoRA's random ``A`` gives its ``B`` at the start; ``r / d`` in expectation).

    python bench/subspace_noise.py                       # SmolLM2, gsm_symbolic, rank 16, 16 batches of 4
    python bench/subspace_noise.py --layers 0,29 --batches 8   # quicker

``--estimate DRAWS`` also measures the projected backward's estimate of the captured share (DESIGN.md,
"Refresh"): for each batch after the first, the exact share ``‖proj_P(G_i)‖ / ‖G_i‖`` of its gradient
under the projector of the batch before (what the capture policy reads) against the estimate
``‖proj_P(G_i Ω)‖ / ‖G_i Ω‖`` from ``refresh.SHARE_SKETCH`` Gaussian columns, over ``DRAWS`` draws of
``Ω``: the error, and how often the two agree on "below ``--threshold``" (the refresh decision).

Writes ``bench/results/subspace_noise{--tag}.{json,md}``. One torch thread (the grid runs beside it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import finetune_table as ft  # noqa: E402  (the SmolLM2 export the grid uses)
from galore_plus import projection  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
#: a one-sided projection's opposite side
OTHER = {projection.LEFT: projection.RIGHT, projection.RIGHT: projection.LEFT}


def gradients_of(model, targets, features, pad_id, batch_ids):
    """``{name: gradient}`` of the targets for one batch, as the command's step forms it."""
    from galore_plus.app.encoding import IGNORE_INDEX, answer_loss_sum, collate

    model.zero_grad(set_to_none=True)
    batch = collate([features[i] for i in batch_ids], pad_id)
    answer_tokens = sum(sum(1 for t in features[i]["labels"] if t != IGNORE_INDEX) for i in batch_ids)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    loss = answer_loss_sum(logits, batch["labels"]) / answer_tokens
    loss.backward()
    return {name: p.grad.detach().double().clone() for name, p in targets}, loss.item()


top = projection.svd_projector  # (grad, rank, side) → the top-rank basis (left, right) of that side


def captured(grad, basis):
    """``‖proj(G)‖² / ‖G‖²`` for a one-sided basis ``(left, right)`` (cast to ``grad``'s dtype)."""
    kept = projection.project(grad, *(None if b is None else b.to(grad.dtype) for b in basis))
    return float(kept.square().sum() / grad.square().sum())


def estimates(grad, basis, draws, gen):
    """``(exact share, [sketched estimates])`` of ``grad`` under the one-sided ``basis`` (the share, not
    its square: what ``capture_threshold`` compares): ``‖Pᵀ G Ω‖ / ‖G Ω‖`` (``‖Ωᵀ G Qᵀ‖ / ‖Ωᵀ G‖`` for a
    right basis) with ``refresh.SHARE_SKETCH`` standard normal columns, ``draws`` times."""
    from galore_plus.refresh import SHARE_SKETCH

    left, right = (None if b is None else b.to(grad.dtype) for b in basis)
    exact = captured(grad, basis) ** 0.5
    out = []
    for _ in range(draws):  # the sketch on the side the basis leaves whole, then projected as G would be
        omega = torch.randn(grad.shape[1 if right is None else 0], SHARE_SKETCH, generator=gen, dtype=grad.dtype)
        sketch = grad @ omega if right is None else omega.T @ grad
        out.append(float(torch.linalg.norm(projection.project(sketch, left, right)) / torch.linalg.norm(sketch)))
    return exact, out


def estimate_table(pairs, threshold):
    """Per matrix type (q, k, v, o, gate, up, down): the exact shares' mean, the estimate's mean absolute
    error and bias, and the share of (pair, draw) where both say "below ``threshold``" or both do not."""
    kinds = {}
    for name, exact, ests in pairs:
        kinds.setdefault(name.split(".")[-2], []).append((exact, ests))
    rows = []
    for kind, cells in kinds.items():
        errors = [e - x for x, es in cells for e in es]
        agree = [(e < threshold) == (x < threshold) for x, es in cells for e in es]
        rows.append({"kind": kind, "pairs": len(cells), "exact_mean": statistics.mean(x for x, _ in cells),
                     "exact_below": statistics.mean(x < threshold for x, _ in cells),
                     "abs_error": statistics.mean(abs(e) for e in errors), "bias": statistics.mean(errors),
                     "agreement": statistics.mean(agree)})
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--batches", type=int, default=16, help="batches of --batch-size (an even number)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--layers", default="0,7,14,21,29", help="decoder layers whose matrices are measured")
    ap.add_argument("--runs-dir", type=Path, default=Path("runs/quality"), help="where the SmolLM2 export is")
    ap.add_argument("--model", default=None, help="a model directory to measure at (e.g. a fine-tune's final/; "
                    "default: SmolLM2's pretrained weights, the grid's export)")
    ap.add_argument("--data", default="gsm_symbolic", help="a built-in task (the grid's by default)")
    ap.add_argument("--tag", default="", help="a suffix of the output files' names")
    ap.add_argument("--results-dir", type=Path, default=RESULTS)
    ap.add_argument("--estimate", type=int, default=0, metavar="DRAWS",
                    help="also compare the projected backward's sketched share with the exact one, DRAWS sketches "
                         "per batch and matrix (see the module docstring)")
    ap.add_argument("--threshold", type=float, default=0.5, help="--estimate: the capture threshold the decisions use")
    args = ap.parse_args(argv)
    if args.batches < 2 or args.batches % 2:
        ap.error("--batches must be an even number ≥ 2")
    torch.set_num_threads(1)
    from galore_plus import find_targets
    from galore_plus.app.config import FinetuneConfig
    from galore_plus.app.finetune import batch_indices
    from galore_plus.app.models import load_model
    from galore_plus.app.preflight import setup

    model_dir = args.model or str(ft.smollm2_export(args.runs_dir))
    config = FinetuneConfig(model=model_dir, data=args.data, n_train=2000, n_test=200, n_validation=200,
                            max_length=384, batch_size=args.batch_size, seed=0, output_dir="/tmp/subspace_noise_unused",
                            generate=False)
    run = setup(config, None)
    model, tokenizer = load_model(run.config.model, seed=0, tokenizer=run.tokenizer)
    layers = {int(x) for x in args.layers.split(",")}
    names = {id(p): n for n, p in model.named_parameters()}
    targets = [(names[id(t.param)], t.param) for t in find_targets(model)
               if int(names[id(t.param)].split("layers.")[1].split(".")[0]) in layers]
    if not targets:
        ap.error(f"--layers {args.layers}: no projected matrix in those layers")
    for p in model.parameters():
        p.requires_grad_(False)
    for _, p in targets:
        p.requires_grad_(True)
    half = args.batches // 2
    own, sum_a, sum_b, losses = {n: [] for n, _ in targets}, {}, {}, []
    previous, pairs, draw_gen = {}, [], torch.Generator().manual_seed(1)  # --estimate
    start = time.perf_counter()
    for i in range(args.batches):
        ids = batch_indices(i, args.batch_size, len(run.features), 0)
        grads, loss = gradients_of(model, targets, run.features, tokenizer.pad_token_id, ids)
        losses.append(loss)
        into = sum_a if i < half else sum_b
        for name, g in grads.items():
            into[name] = into.get(name, 0) + g
            side = projection.projection_side(g.shape, "std")
            if i < half:  # the projector a refresh at this batch size would take (either side), its own capture
                basis, other = top(g, args.rank, side), top(g, args.rank, OTHER[side])
                own[name].append((basis, captured(g, basis), other))
            if args.estimate:  # this batch's share under the previous batch's projector: exact and sketched
                if name in previous:
                    pairs.append((name, *estimates(g, previous[name], args.estimate, draw_gen)))
                previous[name] = own[name][-1][0] if i < half else top(g, args.rank, side)
        print(f"batch {i + 1}/{args.batches}: loss {loss:.3f} ({time.perf_counter() - start:.0f} s)", flush=True)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for name, p in targets:
        signal, mean_a = sum_b[name] / half, sum_a[name] / half
        side = projection.projection_side(signal.shape, "std")
        d = signal.shape[0] if side == projection.LEFT else signal.shape[1]
        one = [captured(signal, basis) for basis, _, _ in own[name]]
        one_other = [captured(signal, other) for _, _, other in own[name]]
        rows.append({
            "matrix": name, "shape": list(signal.shape), "side": projection.SIDE_NAMES[side],
            "one_batch": statistics.mean(one), "one_batch_sd": statistics.stdev(one) if len(one) > 1 else 0.0,
            "one_batch_own": statistics.mean(c for _, c, _ in own[name]),
            # the same on the other side (proj_type "reverse_std": the larger dimension's space)
            "other_side_one_batch": statistics.mean(one_other),
            "other_side_signal_own": captured(signal, top(signal, args.rank, OTHER[side])),
            "half_mean": captured(signal, top(mean_a, args.rank, side)),
            "signal_own": captured(signal, top(signal, args.rank, side)),
            "random": captured(signal, projection.random_projector(signal.shape, args.rank, side, gen)),
            "random_expected": args.rank / d,
            "cos_halves": float(torch.nn.functional.cosine_similarity(mean_a.flatten(), signal.flatten(), dim=0)),
        })
    kinds = ("one_batch", "half_mean", "signal_own", "random", "other_side_one_batch", "other_side_signal_own")
    summary = {k: statistics.mean(r[k] for r in rows) for k in kinds + ("one_batch_own", "cos_halves")}
    out = {"model": model_dir, "rank": args.rank, "batch_size": args.batch_size, "batches": args.batches, "layers": sorted(layers),
           "losses": losses, "rows": rows, "summary": summary, "seconds": round(time.perf_counter() - start, 1)}
    if args.estimate:
        out["estimate"] = {"draws": args.estimate, "threshold": args.threshold,
                           "pairs": [[n, x, es] for n, x, es in pairs], "by_kind": estimate_table(pairs, args.threshold)}
    args.results_dir.mkdir(parents=True, exist_ok=True)
    (args.results_dir / f"subspace_noise{args.tag}.json").write_text(json.dumps(out, indent=1))
    lines = [f"# Captured share of the expected gradient by a rank-{args.rank} projector (issue 29)", "",
             f"`python bench/subspace_noise.py{' --model ' + args.model if args.model else ''}` — SmolLM2-135M-Instruct "
             f"{'at ' + model_dir if args.model else 'at its pretrained weights'}, {args.data} "
             f"(the §9 protocol's training split), the run's first {args.batches} batches of {args.batch_size}; "
             f"signal: the mean gradient of the last {half} batches; layers {sorted(layers)}. "
             f"Columns: the share of the signal's squared norm inside the projector taken from one batch "
             f"(mean ± sd over the first {half}), from the first half's mean gradient ({half * args.batch_size} "
             "examples), from the signal itself (an upper bound, biased up), and from a random basis; "
             "'own': one batch's projector on its own gradient; cos: the two halves' mean gradients.", "",
             "| matrix | shape | side | one batch | own | half mean | signal itself | random (r/d) | cos(halves) "
             "| other side: one batch | other side: signal itself |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['matrix'].replace('model.layers.', 'L')} | {r['shape'][0]}×{r['shape'][1]} | {r['side']} | "
                     f"{r['one_batch']:.3f} ± {r['one_batch_sd']:.3f} | {r['one_batch_own']:.3f} | {r['half_mean']:.3f} | "
                     f"{r['signal_own']:.3f} | {r['random']:.3f} ({r['random_expected']:.3f}) | {r['cos_halves']:.2f} | "
                     f"{r['other_side_one_batch']:.3f} | {r['other_side_signal_own']:.3f} |")
    s = summary
    lines += ["", f"Mean over the {len(rows)} matrices: one batch {s['one_batch']:.3f} (own {s['one_batch_own']:.3f}), "
              f"half mean {s['half_mean']:.3f}, signal itself {s['signal_own']:.3f}, random {s['random']:.3f}; "
              f"cos between halves {s['cos_halves']:.2f}; on the other side: one batch {s['other_side_one_batch']:.3f}, "
              f"signal itself {s['other_side_signal_own']:.3f}. {out['seconds']:.0f} s."]
    if args.estimate:
        from galore_plus.refresh import SHARE_SKETCH

        lines += ["", f"The projected backward's estimate of the captured share ({SHARE_SKETCH}-column sketch, "
                  f"{args.estimate} draws per batch and matrix): each batch's share under the previous batch's "
                  f"projector, exact against estimated; agreement: both below {args.threshold:g} or both not.", "",
                  "| matrix | pairs | exact share (mean) | exact below threshold | mean abs error | bias | agreement |",
                  "|---|---|---|---|---|---|---|"]
        for r in out["estimate"]["by_kind"]:
            lines.append(f"| {r['kind']} | {r['pairs']} | {r['exact_mean']:.3f} | {r['exact_below']:.2f} | "
                         f"{r['abs_error']:.3f} | {r['bias']:+.3f} | {r['agreement']:.2f} |")
    (args.results_dir / f"subspace_noise{args.tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[-1:]))
    return out


if __name__ == "__main__":
    main()
