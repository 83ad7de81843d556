"""What was found: compare the masks of supermask runs and lottery tickets.

    python -m supermask.analyze runs/ep_s0 runs/ep_s1 runs/imp_run --out docs/analysis

Each RUN is an edge-popup run folder (supermask.train), an IMP round folder (round_NN) or a whole
IMP run (every finished round). For two or more masks this writes OUT/report.md, OUT/analysis.json
and PNG figures:

- sparsity per layer of every mask;
- mask overlap per layer and overall: IoU = |A and B| / |A or B|, next to the IoU expected by chance
  for independent random masks of the same densities p and q, pq / (p + q - pq). Pairs: edge-popup
  runs with each other, IMP runs with each other (same round), and each edge-popup run with the IMP
  round closest to its density (and with every IMP round, as a curve);
- for IMP runs, how far the weights moved during training (Frankle & Carbin, appendix F.5):
  mean |w_final - w_init| of the weights the next round keeps against the ones it prunes;
- histograms of the scores (kept vs dropped) and of the magnitudes of the kept weights.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .cli import Parser, run_main
from .compact import build_run_model, read_run, run_kind, shapes_of, supermask_masks
from .layers import supermask_layers
from .runlog import pyplot, save_figure
from .errors import UsageError
from .storage import atomic_write, load_checkpoint, read_results, read_run_config, write_json

PROG = "python -m supermask.analyze"
FIGURES = ("sparsity.png", "overlap.png", "overlap_vs_rounds.png", "movement.png", "scores.png", "kept_weights.png")


@dataclass
class Ticket:
    """One mask of one run, with the weights it selects from."""
    label: str
    kind: str  # "edge-popup" or "imp"
    path: Path
    config: dict
    masks: dict[str, torch.Tensor]  # layer name -> bool
    weights: dict[str, torch.Tensor]  # edge-popup: the frozen random weights; IMP: the trained weights
    init: dict[str, torch.Tensor] | None = None  # IMP: the weights the round started from
    scores: dict[str, torch.Tensor] | None = None
    test_acc: float | None = None
    round: int | None = None
    imp_root: Path | None = None

    @property
    def density(self) -> float:
        """The fraction of weights kept over every layer."""
        return sum(int(m.sum()) for m in self.masks.values()) / max(1, sum(m.numel() for m in self.masks.values()))


@dataclass
class ImpRun:
    """An IMP run: its folder, its config and its tickets (one per finished round), in round order."""
    path: Path
    config: dict
    rounds: list[Ticket] = field(default_factory=list)  # every finished round, round 0 (dense) first


# ---------------------------------------------------------------------------------------------
# Overlap


def iou(a: torch.Tensor, b: torch.Tensor) -> float:
    """Intersection over union of two boolean masks of one shape (1.0 when both are empty)."""
    union = int((a | b).sum())
    return int((a & b).sum()) / union if union else 1.0


def chance_iou(p: float, q: float) -> float:
    """IoU expected for independent random masks of densities p and q: pq / (p + q - pq)."""
    denom = p + q - p * q
    return p * q / denom if denom > 0 else 1.0


def overlap(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict:
    """Per layer (the layers both have, with equal shapes) and overall: densities, IoU and chance IoU.
    Overall pools all layers: IoU of the concatenated masks; chance = sum of expected intersections
    over sum of expected unions."""
    layers = [n for n in a if n in b and a[n].shape == b[n].shape]
    rows, inter, union, e_inter, e_union = {}, 0, 0, 0.0, 0.0
    for n in layers:
        ma, mb = a[n].bool(), b[n].bool()
        p, q, size = ma.float().mean().item(), mb.float().mean().item(), ma.numel()
        i, u = int((ma & mb).sum()), int((ma | mb).sum())
        rows[n] = {"density_a": p, "density_b": q, "iou": i / u if u else 1.0, "chance": chance_iou(p, q)}
        inter, union = inter + i, union + u
        e_inter, e_union = e_inter + size * p * q, e_union + size * (p + q - p * q)
    overall = {"density_a": sum(int(a[n].sum()) for n in layers) / max(1, sum(a[n].numel() for n in layers)),
               "density_b": sum(int(b[n].sum()) for n in layers) / max(1, sum(b[n].numel() for n in layers)),
               "iou": inter / union if union else 1.0, "chance": e_inter / e_union if e_union else 1.0}
    return {"layers": rows, "overall": overall}


def sign_agreement(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float | None:
    """Fraction of weights whose initial signs agree (1.0: the same random draw; 0.5: independent)."""
    layers = [n for n in a if n in b and a[n].shape == b[n].shape]
    if not layers:
        return None
    same = sum(int((torch.sign(a[n]) == torch.sign(b[n])).sum()) for n in layers)
    return same / sum(a[n].numel() for n in layers)


# ---------------------------------------------------------------------------------------------
# Loading


def _results(path: Path) -> dict:
    """results.json of a run ({} while it is unfinished); a corrupted one is a one-line UsageError."""
    file = path / "results.json"
    return read_results(path, read_run_config(path)) if file.is_file() else {}


def _label(config: dict, round_: int | None = None) -> str:
    if round_ is not None:
        return f"imp w{config['width']:g} s{config['seed']} r{round_:02d}"
    return f"ep w{config['width']:g} k{config['k']:g} s{config['seed']}"


def _imp_round(rdir: Path, root: Path | None, root_config: dict | None, init_cache: dict) -> Ticket:
    config, ckpt = read_run(rdir)
    masks = ckpt.get("masks")
    if not isinstance(masks, dict):
        raise UsageError(f"{rdir}: checkpoint.pt holds no IMP masks")
    state = ckpt["model"]
    masks = {n: m.bool() for n, m in masks.items()}
    weights = {n: state[f"{n}.weight"].float() for n in masks}
    r = int(config.get("round", ckpt.get("round", 0)))
    init = None
    if root is not None:
        name = "rewind.pt" if r > 0 and config.get("rewind_iter") and config.get("control") != "reinit" else "init.pt"
        if name not in init_cache:
            state = load_checkpoint(root / name) if (root / name).is_file() else None
            # ({"model": state dict}; IMP runs from before checksums hold the bare state dict)
            init_cache[name] = state["model"] if state is not None and isinstance(state.get("model"), dict) else state
        if init_cache[name] is not None:
            init = {n: init_cache[name][f"{n}.weight"].float() for n in masks}
    control = config.get("control")
    label = _label(config, r) + (f" {control}" if control else "")
    return Ticket(label, "imp", rdir, config, masks, weights, init, None, _results(rdir).get("test_acc"), r, root)


def _edge_popup(path: Path, config: dict, ckpt: dict) -> Ticket:
    shape, classes = shapes_of(config)
    model, _ = build_run_model(config, ckpt, shape, classes)
    if config.get("mask", "topk") != "topk":
        raise UsageError(f"{path}: a --mask sampled run has no fixed 0/1 mask to compare")
    masks = supermask_masks(model)
    layers = dict(supermask_layers(model))
    weights = {n: layers[n].weight.detach().float().cpu() for n in masks}
    scores = {n: layers[n].scores.detach().float().cpu() for n in masks}
    return Ticket(_label(config), "edge-popup", path, config, masks, weights, None, scores,
                  _results(path).get("test_acc"))


def layer_label(name: str, shape) -> str:
    """A layer as the model names it (its module name in named_modules(), e.g. "1" for the second
    module of LeNet-300-100's nn.Sequential, "layer1.0.conv1" in a ResNet), with its inputs and
    outputs: "1 (784→300)", "layer1.0.conv1 (64→64, 3×3)". The mask shape is the weight's,
    (out, in) or (out, in, kh, kw)."""
    shape = tuple(shape)
    if len(shape) == 2:
        return f"{name} ({shape[1]}→{shape[0]})"
    if len(shape) == 4:
        return f"{name} ({shape[1]}→{shape[0]}, {shape[2]}×{shape[3]})"
    return name


# The labels of the layers of the tickets being analysed (set by load: the figures and the report
# get only layer names).
_LABELS: dict[str, str] = {}


def _lbl(name: str) -> str:
    return _LABELS.get(name, name)


def load(paths) -> tuple[list[Ticket], list[ImpRun]]:
    """Tickets for the given run folders (an IMP run gives one per finished round), and the IMP runs."""
    tickets, imp_runs = [], []
    for path in map(Path, paths):
        config = read_run_config(path)
        command = run_kind(config)
        if command == "imp":
            run = ImpRun(path, config)
            cache = {}
            for rdir in sorted(path.glob("round_[0-9][0-9]")):
                if (rdir / "results.json").is_file():
                    run.rounds.append(_imp_round(rdir, path, config, cache))
            if not run.rounds:
                raise UsageError(f"{path}: the IMP run has no finished round yet")
            imp_runs.append(run)
            tickets += [t for t in run.rounds if t.round]  # round 0 is the dense network: no mask to compare
        elif command == "imp-round":
            parent = path.parent
            root = parent if (parent / "config.json").is_file() and (parent / "init.pt").is_file() else None
            tickets.append(_imp_round(path, root, None, {}))
        elif command == "train":
            if config.get("dense"):
                raise UsageError(f"{path} is a dense run: it has no mask to analyse")
            _, ckpt = read_run(path)
            tickets.append(_edge_popup(path, config, ckpt))
        else:
            raise UsageError(f"{path} is not a supermask.train run, an IMP run or an IMP round folder")
    seen = {}
    for t in tickets:  # unique labels
        if t.label in seen:
            seen[t.label] += 1
            t.label = f"{t.label} ({seen[t.label]})"
        else:
            seen[t.label] = 1
    _LABELS.clear()
    _LABELS.update({n: layer_label(n, m.shape) for t in tickets for n, m in t.masks.items()})
    return tickets, imp_runs


# ---------------------------------------------------------------------------------------------
# Analyses


def _compatible(a: Ticket, b: Ticket) -> bool:
    return any(n in b.masks and a.masks[n].shape == b.masks[n].shape for n in a.masks)


def pairs(tickets: list[Ticket], imp_runs: list[ImpRun]) -> tuple[list[dict], list[str]]:
    """The pairs to compare: (relation, a, b) with their overlaps; and notes on pairs skipped."""
    out, skipped = [], []
    eps = [t for t in tickets if t.kind == "edge-popup"]
    imps = [t for t in tickets if t.kind == "imp"]
    root_rounds = {run.path: [t for t in run.rounds if t.round] for run in imp_runs}
    lone_imps = [t for t in imps if t.imp_root is None or t.imp_root not in root_rounds]

    def add(relation, a, b):
        if not _compatible(a, b):
            skipped.append(f"{a.label} vs {b.label}: no layer of the same shape (different architecture or width)")
            return
        row = {"relation": relation, "a": a.label, "b": b.label, **overlap(a.masks, b.masks)}
        init_a = a.init if a.kind == "imp" else a.weights
        init_b = b.init if b.kind == "imp" else b.weights
        row["init_sign_agreement"] = sign_agreement(init_a, init_b) if init_a and init_b else None
        out.append(row)

    for i, a in enumerate(eps):  # same method: edge-popup seeds
        for b in eps[i + 1:]:
            add("edge-popup vs edge-popup", a, b)
    roots = list(root_rounds)
    for i, ra in enumerate(roots):  # same method: IMP runs, round by round
        for rb in roots[i + 1:]:
            by_round = {t.round: t for t in root_rounds[rb]}
            for a in root_rounds[ra]:
                if a.round in by_round:
                    add("IMP vs IMP (same round)", a, by_round[a.round])
    for i, a in enumerate(lone_imps):
        for b in lone_imps[i + 1:] + [t for rs in root_rounds.values() for t in rs if t.round == a.round]:
            add("IMP vs IMP (same round)" if a.round == b.round else "IMP vs IMP", a, b)
    for a in eps:  # across methods, at matched sparsity
        for root, rounds in root_rounds.items():
            if rounds:
                b = min(rounds, key=lambda t: abs(_matched_density(a, t) - a.density))
                add("edge-popup vs IMP (closest density)", a, b)
        for b in lone_imps:
            add("edge-popup vs IMP", a, b)
    return out, skipped


def _matched_density(ep: Ticket, imp: Ticket) -> float:
    """IMP density over the layers it shares with ep."""
    layers = [n for n in ep.masks if n in imp.masks]
    return sum(int(imp.masks[n].sum()) for n in layers) / max(1, sum(imp.masks[n].numel() for n in layers))


def overlap_vs_rounds(tickets: list[Ticket], imp_runs: list[ImpRun]) -> list[dict]:
    """Each edge-popup mask against every pruned round of every IMP run (overall IoU and chance)."""
    rows = []
    for a in (t for t in tickets if t.kind == "edge-popup"):
        for run in imp_runs:
            for b in run.rounds:
                if b.round and _compatible(a, b):
                    ov = overlap(a.masks, b.masks)
                    rows.append({"a": a.label, "imp": str(run.path), "b": b.label, "round": b.round,
                                 "imp_density": ov["overall"]["density_b"], "iou": ov["overall"]["iou"],
                                 "chance": ov["overall"]["chance"],
                                 "layers": {n: (v["iou"], v["chance"]) for n, v in ov["layers"].items()}})
    return rows


def movement(imp_runs: list[ImpRun]) -> list[dict]:
    """LTH appendix F.5: in the trained network of round r-1, mean |w_final - w_init| of the weights
    round r keeps against those it prunes (and their mean |w_init|)."""
    rows = []
    for run in imp_runs:
        by_round = {t.round: t for t in run.rounds}
        for r in sorted(by_round):
            prev, cur = by_round.get(r - 1), by_round[r]
            if prev is None or prev.init is None or cur.config.get("control"):
                continue
            totals = {"kept": [0.0, 0.0, 0], "pruned": [0.0, 0.0, 0]}
            for n, m_prev in prev.masks.items():
                if n not in cur.masks:
                    continue
                delta = (prev.weights[n] - prev.init[n]).abs()
                w0 = prev.init[n].abs()
                kept, pruned = cur.masks[n], m_prev & ~cur.masks[n]
                row = {"run": str(run.path), "round": r, "layer": n, "n_kept": int(kept.sum()),
                       "n_pruned": int(pruned.sum())}
                for key, sel in (("kept", kept), ("pruned", pruned)):
                    row[f"move_{key}"] = delta[sel].mean().item() if sel.any() else float("nan")
                    row[f"init_{key}"] = w0[sel].mean().item() if sel.any() else float("nan")
                    totals[key][0] += delta[sel].sum().item()
                    totals[key][1] += w0[sel].sum().item()
                    totals[key][2] += int(sel.sum())
                row["ratio"] = row["move_kept"] / row["move_pruned"] if row["move_pruned"] else float("nan")
                rows.append(row)
            tk, tp = totals["kept"], totals["pruned"]
            if tk[2] and tp[2]:
                rows.append({"run": str(run.path), "round": r, "layer": "all", "n_kept": tk[2], "n_pruned": tp[2],
                             "move_kept": tk[0] / tk[2], "move_pruned": tp[0] / tp[2],
                             "init_kept": tk[1] / tk[2], "init_pruned": tp[1] / tp[2],
                             "ratio": (tk[0] / tk[2]) / (tp[0] / tp[2]) if tp[0] else float("nan")})
    return rows


def sparsity_rows(tickets: list[Ticket]) -> list[dict]:
    """One row per ticket and layer: weights kept, total and density."""
    return [{"ticket": t.label, "layer": n, "kept": int(m.sum()), "total": m.numel(),
             "density": m.float().mean().item()} for t in tickets for n, m in t.masks.items()]


# ---------------------------------------------------------------------------------------------
# Figures


def _save(fig, path: Path):
    save_figure(fig, path, dpi=110)


def _layer_names(tickets):
    names = []
    for t in tickets:
        names += [n for n in t.masks if n not in names]
    return names


def fig_sparsity(tickets, path):
    """Figure: the per-layer density of every ticket, saved at path."""
    plt = pyplot()
    names = _layer_names(tickets)
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(names) + 2), 3.4))
    w = 0.8 / len(tickets)
    for i, t in enumerate(tickets):
        xs = [j + i * w for j, n in enumerate(names) if n in t.masks]
        ax.bar(xs, [100 * t.masks[n].float().mean().item() for n in names if n in t.masks], w, label=t.label)
    ax.set_xticks([j + 0.4 - w / 2 for j in range(len(names))], [_lbl(n) for n in names])
    ax.set_ylabel("weights kept (%)")
    ax.legend(fontsize=7, ncol=2)
    ax.set_title("Density per layer")
    _save(fig, path)
    return True


def fig_overlap(pair_rows, path):
    """Figure: the mask overlap (IoU against chance) of every pair, saved at path."""
    plt = pyplot()
    if not pair_rows:
        return False
    names = []
    for p in pair_rows:
        names += [n for n in p["layers"] if n not in names]
    names.append("all")
    fig, ax = plt.subplots(figsize=(max(6, 1.5 * len(names) + 3), 3.8))
    w = 0.8 / len(pair_rows)
    for i, p in enumerate(pair_rows):
        vals = [(j, p["layers"][n] if n != "all" else p["overall"]) for j, n in enumerate(names)
                if n == "all" or n in p["layers"]]
        xs = [j + i * w for j, _ in vals]
        ax.bar(xs, [v["iou"] for _, v in vals], w, label=f"{p['a']} vs {p['b']}")
        ax.scatter(xs, [v["chance"] for _, v in vals], marker="_", s=200, color="black", zorder=3,
                   label="chance" if i == 0 else None)
    ax.set_xticks([j + 0.4 - w / 2 for j in range(len(names))], [_lbl(n) for n in names])
    ax.set_ylabel("IoU of kept weights")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    ax.set_title("Mask overlap (black: IoU expected for independent random masks)")
    _save(fig, path)
    return True


def fig_overlap_vs_rounds(rows, path):
    """Figure: the overlap of edge-popup masks with each IMP round's, saved at path."""
    plt = pyplot()
    if not rows:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for (a, imp) in dict.fromkeys((r["a"], r["imp"]) for r in rows):
        rs = sorted((r for r in rows if r["a"] == a and r["imp"] == imp), key=lambda r: -r["imp_density"])
        xs = [100 * r["imp_density"] for r in rs]
        label = f"{a} vs {rs[0]['b'].rsplit(' r', 1)[0]}"
        line, = axes[0].plot(xs, [r["iou"] for r in rs], marker="o", label=label)
        axes[0].plot(xs, [r["chance"] for r in rs], ls=":", color="black", lw=0.8)
        axes[1].plot(xs, [r["iou"] / r["chance"] for r in rs], marker="o", label=label, color=line.get_color())
    axes[1].axhline(1, color="black", ls=":", lw=0.8)
    for ax in axes:
        ax.invert_xaxis()
        ax.set_xlabel("IMP weights remaining (%) in the compared layers")
        ax.legend(fontsize=7)
    axes[0].set_ylabel("IoU (dotted: chance)")
    axes[1].set_ylabel("IoU / chance (1: independent)")
    axes[1].set_title("Overlap relative to chance")
    ax = axes[0]
    ax.set_title("Edge-popup mask vs every IMP round")
    _save(fig, path)
    return True


def fig_movement(rows, imp_runs, path):
    """Figure: how far IMP's kept and pruned weights moved (mean |w_final - w_init|) per round, saved at path."""
    plt = pyplot()
    if not rows:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    ax = axes[0]
    for (run, layer) in dict.fromkeys((r["run"], r["layer"]) for r in rows):
        rs = [r for r in rows if r["run"] == run and r["layer"] == layer]
        ax.plot([r["round"] for r in rs], [r["ratio"] for r in rs], marker="o",
                label=_lbl(layer) + (f" ({Path(run).name[:20]})" if len(imp_runs) > 1 else ""))
    ax.axhline(1, color="grey", lw=0.8)
    ax.set_xlabel("round r (kept/pruned by round r, moved in round r-1)")
    ax.set_ylabel("mean |w_final - w_init|: kept / pruned")
    ax.legend(fontsize=7)
    ax.set_title("How far kept vs pruned weights moved")
    # The first pruning: round 0's dense training, kept vs pruned by round 1, all layers pooled.
    ax = axes[1]
    run = next((r for r in imp_runs if {0, 1} <= {t.round for t in r.rounds} and r.rounds[0].init), None)
    if run is not None:
        prev, cur = run.rounds[0], next(t for t in run.rounds if t.round == 1)
        kept = torch.cat([(prev.weights[n] - prev.init[n]).abs()[cur.masks[n]] for n in cur.masks])
        pruned = torch.cat([(prev.weights[n] - prev.init[n]).abs()[~cur.masks[n]] for n in cur.masks])
        hi = torch.quantile(torch.cat([kept, pruned])[:200_000], 0.995).item()
        bins = torch.linspace(0, hi, 60).tolist()
        ax.hist(pruned.clamp(max=hi).numpy(), bins=bins, density=True, alpha=0.6, label="pruned by round 1")
        ax.hist(kept.clamp(max=hi).numpy(), bins=bins, density=True, alpha=0.6, label="kept by round 1")
        ax.set_xlabel("|w_final - w_init| in round 0 (dense training)")
        ax.set_ylabel("density")
        ax.legend(fontsize=7)
        ax.set_title("Movement in the dense network")
    else:
        ax.axis("off")
    _save(fig, path)
    return True


def fig_scores(tickets, path):
    """Figure: the score distributions per layer of up to 4 edge-popup tickets, saved at path; False when none."""
    plt = pyplot()
    eps = [t for t in tickets if t.scores][:4]
    if not eps:
        return False
    names = _layer_names(eps)
    fig, axes = plt.subplots(len(eps), len(names), figsize=(3.2 * len(names), 2.5 * len(eps)), squeeze=False)
    for i, t in enumerate(eps):
        for j, n in enumerate(names):
            ax = axes[i][j]
            if n not in t.scores:
                ax.axis("off")
                continue
            s, m = t.scores[n].abs().reshape(-1), t.masks[n].reshape(-1)
            hi = s.max().item()
            bins = torch.linspace(0, hi if hi > 0 else 1, 60).tolist()
            ax.hist([s[~m].numpy(), s[m].numpy()], bins=bins, stacked=True, label=["dropped", "kept"])
            ax.set_title(f"{t.label}: {_lbl(n)}", fontsize=8)
            ax.tick_params(labelsize=7)
            if i == 0 and j == 0:
                ax.legend(fontsize=7)
    fig.supxlabel("|score|", fontsize=9)
    _save(fig, path)
    return True


def fig_kept_weights(tickets, path):
    """Figure: the magnitudes of the kept weights per layer, saved at path."""
    plt = pyplot()
    shown = [t for t in tickets if t.kind == "edge-popup"]
    imps = [t for t in tickets if t.kind == "imp"]
    if imps:  # the first pruned round and the last one of each IMP run, not all of them
        last = max(t.round for t in imps)
        shown += [t for t in imps if t is imps[0] or t.round == last and t is not imps[0]]
    names = _layer_names(shown)
    fig, axes = plt.subplots(1, len(names), figsize=(3.4 * len(names), 3), squeeze=False)
    for j, n in enumerate(names):
        ax = axes[0][j]
        kept = {t.label: t.weights[n][t.masks[n]].abs() for t in shown if n in t.masks and t.masks[n].any()}
        hi = max((w.max().item() for w in kept.values()), default=1.0) or 1.0
        for i, (label, w) in enumerate(kept.items()):
            color = f"C{i}"
            if w.max() == w.min():  # signed constant: every kept weight has the same magnitude
                ax.axvline(w[0].item(), color=color, ls="--", lw=1.2 + 0.8 * (i % 2), label=f"{label} (all one value)")
            else:
                ax.hist(w.numpy(), bins=torch.linspace(0, hi, 60).tolist(), density=True, histtype="step",
                        color=color, label=label)
        ax.set_title(_lbl(n), fontsize=9)
        ax.set_xlabel("|w| of kept weights", fontsize=8)
        ax.tick_params(labelsize=7)
        if j == 0:
            ax.legend(fontsize=6)
    _save(fig, path)
    return True


# ---------------------------------------------------------------------------------------------
# Report


def _pct(x):
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def _num(x, fmt=".3f"):
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def report(tickets, imp_runs, pair_rows, skipped, vs_rounds, moves, figures) -> str:
    """The analysis as markdown (report.md): the tickets, the pairs compared, the overlap against rounds, the
    movement and the figures."""
    lines = ["# Mask analysis", ""]
    lines += ["## Masks", "", "| mask | kind | run folder | test acc % | weights kept % |", "|---|---|---|---|---|"]
    for t in tickets:
        lines.append(f"| {t.label} | {t.kind} | `{t.path}` | {_num(t.test_acc, '.2f')} | {_pct(t.density)} |")
    lines += ["", "Edge-popup weights are frozen random draws (seeded per layer); IMP weights are trained. "
              "A seed draws the same Gaussian for both methods (the same per-layer generator): edge-popup's "
              "signed-constant weights then have the signs of IMP's Kaiming-normal init, so an edge-popup and an "
              "IMP run of the same seed search the same random network (see the sign-agreement column).", ""]

    lines += ["## Sparsity per layer", "", "| mask | " + " | ".join(_lbl(n) for n in _layer_names(tickets))
              + " |", "|---|" + "---|" * len(_layer_names(tickets))]
    for t in tickets:
        cells = [f"{_pct(t.masks[n].float().mean().item())}% of {t.masks[n].numel():,}" if n in t.masks else "-"
                 for n in _layer_names(tickets)]
        lines.append(f"| {t.label} | " + " | ".join(cells) + " |")
    if "sparsity.png" in figures:
        lines += ["", "![density per layer](sparsity.png)"]

    lines += ["", "## Mask overlap", "",
              "IoU = |A and B| / |A or B| of the kept weights. *chance* is the IoU expected for independent "
              "random masks with the same densities p, q: pq / (p + q - pq). *IoU / chance* above 1 means the "
              "two masks agree more than chance. *init signs* is the fraction of weights whose initial signs "
              "agree (100%: the same random network; 50%: independent draws).", ""]
    if pair_rows:
        lines += ["| relation | A | B | layer | density A % | density B % | IoU | chance | IoU / chance | "
                  "init signs % |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for p in pair_rows:
            for n, v in [*p["layers"].items(), ("all", p["overall"])]:
                bold = "**" if n == "all" else ""
                lines.append(f"| {p['relation']} | {p['a']} | {p['b']} | {bold}{_lbl(n)}{bold} | "
                             f"{_pct(v['density_a'])} | {_pct(v['density_b'])} | {bold}{v['iou']:.3f}{bold} | "
                             f"{v['chance']:.3f} | "
                             f"{v['iou'] / v['chance'] if v['chance'] else float('nan'):.2f} | "
                             f"{_pct(p['init_sign_agreement']) if n == 'all' else ''} |")
    else:
        lines.append("No pair of masks with layers of the same shape.")
    for s in skipped:
        lines.append(f"- skipped: {s}")
    if "overlap.png" in figures:
        lines += ["", "![mask overlap](overlap.png)"]
    if vs_rounds:
        lines += ["", "### Edge-popup masks against every IMP round", "",
                  "| edge-popup | IMP round | IMP kept % (shared layers) | IoU | chance | IoU / chance |",
                  "|---|---|---|---|---|---|"]
        for r in vs_rounds:
            lines.append(f"| {r['a']} | {r['b']} | {_pct(r['imp_density'])} | {r['iou']:.3f} | {r['chance']:.3f} | "
                         f"{r['iou'] / r['chance']:.2f} |")
        if "overlap_vs_rounds.png" in figures:
            lines += ["", "![overlap vs IMP rounds](overlap_vs_rounds.png)"]

    lines += ["", "## How far the weights of IMP tickets moved (LTH appendix F.5)", ""]
    if moves:
        lines += ["In the trained network of round r-1: mean |w_final - w_init| of the weights that round r keeps "
                  "against those it prunes, and their mean |w_init| (pruning keeps the largest |w_final|, so "
                  "compare movement with initial size).", "",
                  "| run | round r | layer | kept | pruned | moved: kept | moved: pruned | kept / pruned | "
                  "|w_init|: kept | |w_init|: pruned |", "|---|---|---|---|---|---|---|---|---|---|"]
        for m in moves:
            lines.append(f"| {Path(m['run']).name} | {m['round']} | {_lbl(m['layer'])} | {m['n_kept']:,} | "
                         f"{m['n_pruned']:,} | {_num(m['move_kept'], '.4f')} | {_num(m['move_pruned'], '.4f')} | "
                         f"{_num(m['ratio'], '.2f')} | {_num(m['init_kept'], '.4f')} | "
                         f"{_num(m['init_pruned'], '.4f')} |")
        if "movement.png" in figures:
            lines += ["", "![weight movement](movement.png)"]
    else:
        lines.append("No IMP run with two consecutive finished rounds and its init.pt was given.")

    lines += ["", "## Histograms", ""]
    if "scores.png" in figures:
        lines += ["Scores of the edge-popup runs, kept (top-k |score|) vs dropped:", "", "![scores](scores.png)", ""]
    if "kept_weights.png" in figures:
        lines += ["Magnitudes of the kept weights (edge-popup: the frozen random weights it selected; signed "
                  "constant init makes them one value per layer. IMP: trained weights of the first and last "
                  "pruned rounds):", "", "![kept weights](kept_weights.png)", ""]
    lines += ["Numbers: `analysis.json` beside this file."]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# CLI


def parser() -> Parser:
    """The flags of python -m supermask.analyze."""
    p = Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("runs", metavar="RUN", nargs="+",
                   help="edge-popup run folders, IMP round folders or whole IMP runs (two or more masks in all)")
    p.add_argument("--out", required=True, help="folder for report.md, analysis.json and the figures")
    p.add_argument("--force", action="store_true", help="write into --out even if it is not empty")
    return p


def main(argv=None) -> int:
    """python -m supermask.analyze: load the runs, compare their masks, write report.md, the figures and the JSON
    rows; returns the exit code."""
    args = parser().parse_args(argv)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not args.force:
        raise UsageError(f"--out {out} is not empty; pass --force to write into it (files of the same name "
                         "are replaced)")
    tickets, imp_runs = load(args.runs)
    for run in map(Path, args.runs):  # the report's files must not land among a run's own files
        if out.resolve() == run.resolve() or run.resolve() in out.resolve().parents:
            raise UsageError(f"--out {out} is inside the input run {run}; choose a folder outside it")
    if len(tickets) < 2:
        raise UsageError(f"found {len(tickets)} mask in {', '.join(args.runs)}; the analysis needs two or more "
                         "(several runs, or an IMP run with two or more pruned rounds)")
    pair_rows, skipped = pairs(tickets, imp_runs)
    vs_rounds = overlap_vs_rounds(tickets, imp_runs)
    moves = movement(imp_runs)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create --out {out}: {e.strerror or e}") from None
    figures = []
    makers = {"sparsity.png": lambda p: fig_sparsity(tickets, p),
              "overlap.png": lambda p: fig_overlap(pair_rows, p),
              "overlap_vs_rounds.png": lambda p: fig_overlap_vs_rounds(vs_rounds, p),
              "movement.png": lambda p: fig_movement(moves, imp_runs, p),
              "scores.png": lambda p: fig_scores(tickets, p),
              "kept_weights.png": lambda p: fig_kept_weights(tickets, p)}
    for name, make in makers.items():
        if make(out / name):
            figures.append(name)
    write_json(out / "analysis.json", {
        "masks": [{"label": t.label, "kind": t.kind, "path": str(t.path), "round": t.round, "test_acc": t.test_acc,
                   "density": t.density} for t in tickets],
        "sparsity": sparsity_rows(tickets), "pairs": pair_rows, "skipped": skipped,
        "edge_popup_vs_imp_rounds": vs_rounds, "movement": moves, "figures": figures})
    atomic_write(out / "report.md", report(tickets, imp_runs, pair_rows, skipped, vs_rounds, moves,
                                                 figures).encode())
    print(f"{len(tickets)} masks, {len(pair_rows)} pairs compared; report in {out / 'report.md'} "
          f"with {len(figures)} figures")
    for p in pair_rows:
        o = p["overall"]
        print(f"  {p['a']} vs {p['b']}: IoU {o['iou']:.3f} (chance {o['chance']:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(PROG, main))
