"""How well a matching decoder matches, measured on held-out images, with the shortcut probes.

A decoder that "learns its task" is not necessarily one that attends to the object: the task may be
solvable from the inquiry alone. :func:`measure_decoder` therefore reports, for a method's decoder(s)
on the validation split (teacher maps, ground truth; no student):

- **identification**: accuracy of real-vs-fake on the aux task's inquiries (fakes drawn as in
  training), split into real, displaced-fake and random-fake inquiries; the same with each image's
  keys shuffled over its own valid cells (``keys_shuffled``) and with the keys of another image of
  the batch (``keys_other_image``). A decoder that matches loses accuracy there; one that reads the
  answer off the inquiry does not.
- **localisation**: mean IoU of the predicted box (the jittered centre and the predicted l, t, r, b)
  with the object, against the IoU of the inquiry's own box (the object's size at the jittered
  centre), i.e. what predicting no correction gives.
- **attention** of the inquiries the distillation uses (each object at its own box), per head and
  over all heads: the median attention mass inside the object's box and within 2 cells of it, the
  median share a uniform attention would put in the box, the share of inquiries whose top cell is
  in their box, the median exp(entropy) (the number of cells the attention effectively spreads
  over), and the median of (in-box mass / uniform share); and, for a decoder over one key map, the
  mean attention mass that falls inside a window of :data:`WINDOW_SIZES` cells around each inquiry
  (what HMKD's ``attention_window`` keeps of the full-map attention), per head and its 10th percentile.

The goal the project set (a benchmark figure, not a test): median in-box mass >= 10x the uniform
share, and the top cell in the own box for most inquiries.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.utils.data import DataLoader

from hmkd.distill.base import small_flags
from hmkd.distill.matching.decoder import KeyValues, window_cells
from hmkd.distill.matching.method import DecoderDistiller
from hmkd.distill.matching.task import cells_in_boxes
from hmkd.distill.masks import pad_boxes
from hmkd.distill.matching.fit import transformed_batch
from hmkd.engine.loaders import to_device

__all__ = ["WINDOW_SIZES", "measure_decoder", "other_image_keys", "quality_markdown", "shuffled_keys"]

#: window sides (cells) whose share of the full-map attention the quality report measures
WINDOW_SIZES = (3, 5, 7, 9, 11, 15)


def shuffled_keys(kv: KeyValues, generator: torch.Generator | None = None) -> KeyValues:
    """Keys and values of each image moved to random other valid cells of the same image (padding
    and the grid unchanged): the content stays, its positions are scrambled."""
    b, _, u, _ = kv.keys.shape
    pad = kv.pad if kv.pad is not None else torch.zeros(b, u, dtype=torch.bool, device=kv.keys.device)
    ar = torch.arange(u, device=pad.device, dtype=torch.float32).expand(b, u)
    in_order = torch.where(pad, 2.0 + ar, ar / u).argsort(dim=1)  # valid cells in order, then padding
    r = torch.rand(b, u, generator=generator).to(pad.device)
    shuffled = torch.where(pad, 2.0 + ar, r).argsort(dim=1)  # valid cells shuffled, then padding
    src = torch.empty_like(in_order)
    src.scatter_(1, in_order, shuffled)  # position in_order[k] takes the key of shuffled[k]
    idx = src[:, None, :, None].expand_as(kv.keys)
    return KeyValues(kv.keys.gather(2, idx), kv.values.gather(2, idx), kv.pad, kv.grid)


def other_image_keys(kv: KeyValues) -> KeyValues:
    """Each image's keys, values and padding taken from the next image of the batch."""
    roll = lambda t: t.roll(1, dims=0) if t is not None else None  # noqa: E731
    return KeyValues(roll(kv.keys), roll(kv.values), roll(kv.pad), kv.grid)


def _elementwise_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    lt = torch.maximum(a[:, :2], b[:, :2])
    rb = torch.minimum(a[:, 2:], b[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area = lambda x: (x[:, 2:] - x[:, :2]).clamp(min=0).prod(-1)  # noqa: E731
    return inter / (area(a) + area(b) - inter).clamp(min=1e-9)


def _median(x: torch.Tensor) -> float | None:
    return float(x.float().median()) if x.numel() else None


@torch.no_grad()
def measure_decoder(
    distiller: DecoderDistiller,
    dataset: Any,
    *,
    device: torch.device,
    batch_size: int = 4,
    max_images: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """The quality measures of the module docstring for each of ``distiller``'s decoders on
    ``dataset`` (the first ``max_images`` images; batches of ``batch_size``, >= 2 for the
    other-image probe). Returns ``{decoder name: {...}}`` (name ``""`` for ICD's single decoder)."""
    from hmkd.data.transforms import collate_fn

    if batch_size < 2:
        raise ValueError("measure_decoder: batch_size must be >= 2 (the other-image probe swaps images)")
    n = len(dataset) if max_images is None else min(len(dataset), int(max_images))
    subset = torch.utils.data.Subset(dataset, list(range(n)))
    loader = DataLoader(subset, batch_size=batch_size, shuffle=False, num_workers=0, collate_fn=collate_fn)
    mods = distiller.decoder_modules()
    was_training = mods.training
    mods.eval()
    acc: dict[str, dict[str, list[torch.Tensor]]] = {}

    def add(name: str, key: str, value: torch.Tensor) -> None:
        acc.setdefault(name, {}).setdefault(key, []).append(value.detach().float().cpu())

    for i, (images, targets) in enumerate(loader):
        if len(images) < 2:
            continue  # a last single image cannot be paired for the other-image probe
        images, targets = to_device(images, targets, device)
        feats, resized, sizes, padded = transformed_batch(distiller, images, targets)
        boxes = [t["boxes"] for t in resized]
        labels = [t["labels"] for t in resized]
        small = small_flags(targets, distiller.small_area)
        probes = {
            "plain": None,
            "keys_shuffled": lambda kv: shuffled_keys(kv, torch.Generator().manual_seed(seed * 7919 + i)),
            "keys_other_image": other_image_keys,
        }
        for probe, keys in probes.items():
            gen = torch.Generator(device=device).manual_seed(seed * 104729 + i)  # the same inquiries for every probe
            out = distiller.decoder_task(feats, boxes, labels, small, sizes, padded, generator=gen, keys=keys)
            for name, aux in out.items():
                correct = ((aux.logits > 0) == aux.real) & aux.valid
                add(name, f"{probe}.correct", correct[aux.valid])
                if probe != "plain":
                    continue
                add(name, "real", aux.real[aux.valid])
                add(name, "displaced", aux.displaced[aux.valid])
                # localisation of the real inquiries: predicted box vs the inquiry's own box
                real = aux.real
                img_wh = torch.tensor([[w, h] for h, w in sizes], device=aux.boxes.device, dtype=torch.float32)
                scale = img_wh[:, None, :].expand(-1, real.shape[1], -1)[real].repeat(1, 2)
                ctr = aux.centres[real]
                gt = aux.boxes[real]
                ltrb = aux.localisation[real] * scale
                pred = torch.cat((ctr - ltrb[:, :2], ctr + ltrb[:, 2:]), dim=-1)
                half = (gt[:, 2:] - gt[:, :2]) / 2
                inquiry_box = torch.cat((ctr - half, ctr + half), dim=-1)
                add(name, "iou", _elementwise_iou(pred, gt))
                add(name, "iou_inquiry_box", _elementwise_iou(inquiry_box, gt))
        # attention of the distillation's inquiries
        for name, (m, valid, obj_boxes, kv) in distiller.distillation_attention(feats, boxes, labels, small, sizes,
                                                                                 padded).items():
            if not bool(valid.any()):
                continue
            padded_boxes, _ = pad_boxes([b.float() for b in obj_boxes])
            inside = cells_in_boxes(padded_boxes, kv.grid)  # [B, N, U]
            near = cells_in_boxes(padded_boxes, kv.grid, margin=2.0)
            n_valid = (~kv.pad).sum(1).float() if kv.pad is not None else torch.full((m.shape[0],), float(m.shape[-1]))
            mf = m.float()
            in_box = (mf * inside[:, None]).sum(-1)  # [B, heads, N]
            within2 = (mf * near[:, None]).sum(-1)
            uniform = inside.sum(-1).float() / n_valid[:, None].to(mf.device)  # [B, N]
            top = mf.argmax(-1)  # [B, heads, N]
            top_in = inside[:, None].expand_as(mf).gather(-1, top[..., None])[..., 0]
            entropy = -(mf * mf.clamp(min=1e-12).log()).sum(-1)
            sel = valid[:, None, :].expand_as(in_box)
            heads = m.shape[1]
            per_head = lambda t: t.permute(1, 0, 2)[sel.permute(1, 0, 2)].reshape(heads, -1)  # noqa: E731
            add(name, "att.in_box", per_head(in_box))
            add(name, "att.within2", per_head(within2))
            add(name, "att.top_in_box", per_head(top_in.float()))
            add(name, "att.exp_entropy", per_head(entropy.exp()))
            add(name, "att.uniform", uniform[valid])
            if len(kv.grid) == 1:  # the mass a window around each inquiry keeps (attention_window)
                h, w, stride = kv.grid[0]
                dec = distiller.decoder_modules()[name] if name else distiller.decoder_modules()
                valid_hw = dec.valid_extent(sizes, (h, w), padded, mf.device)
                centres = (padded_boxes[..., :2] + padded_boxes[..., 2:]) / 2
                for size in WINDOW_SIZES:
                    rows, cols, _ = window_cells(centres, (h, w), stride, valid_hw, size)
                    u = (rows * w + cols)[:, None].expand(-1, heads, -1, -1)
                    add(name, f"att.window{size}", per_head(mf.gather(-1, u).sum(-1)))
    if was_training:
        mods.train()
    return {name: _summarise(parts) for name, parts in acc.items()}


def _summarise(parts: dict[str, list[torch.Tensor]]) -> dict[str, Any]:
    cat = {k: torch.cat(v, dim=-1) for k, v in parts.items()}
    out: dict[str, Any] = {}
    if "plain.correct" in cat:
        correct, real, disp = cat["plain.correct"], cat["real"].bool(), cat["displaced"].bool()
        rand = ~real & ~disp
        mean = lambda t: float(t.mean()) if t.numel() else None  # noqa: E731
        out["identification"] = {
            "accuracy": mean(correct),
            "real": mean(correct[real]),
            "displaced_fakes": mean(correct[disp]),
            "random_fakes": mean(correct[rand]),
            "keys_shuffled": mean(cat["keys_shuffled.correct"]),
            "keys_other_image": mean(cat["keys_other_image.correct"]),
            "share_real": mean(real.float()),
            "inquiries": int(correct.numel()),
        }
        out["localisation"] = {"iou": mean(cat["iou"]), "iou_inquiry_box": mean(cat["iou_inquiry_box"])}
    if "att.in_box" in cat:
        in_box, uniform = cat["att.in_box"], cat["att.uniform"]  # [heads, N], [N]
        ratio = in_box / uniform.clamp(min=1e-12)[None]

        def stats(sl: Any) -> dict[str, Any]:
            return {
                "in_box_median": _median(in_box[sl]),
                "within2_median": _median(cat["att.within2"][sl]),
                "top_in_box": float(cat["att.top_in_box"][sl].mean()),
                "exp_entropy_median": _median(cat["att.exp_entropy"][sl]),
                "in_box_over_uniform_median": _median(ratio[sl]),
            }

        out["attention"] = {
            "inquiries": int(uniform.numel()),
            "uniform_median": _median(uniform),
            "all_heads": stats(slice(None)),
            "heads": [stats(h) for h in range(in_box.shape[0])],
        }
        out["attention"]["window_inside"] = {
            size: {"mean": float(cat[f"att.window{size}"].mean()), "p10": float(cat[f"att.window{size}"].quantile(0.1)),
                   "heads_mean": [float(x) for x in cat[f"att.window{size}"].mean(1)]}
            for size in WINDOW_SIZES if f"att.window{size}" in cat
        }
        r = out["attention"]["all_heads"]["in_box_over_uniform_median"]
        out["attention"]["goal_met"] = bool(r is not None and r >= 10.0 and out["attention"]["all_heads"]["top_in_box"] > 0.5)
    return out


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def quality_markdown(results: dict[str, dict[str, dict[str, Any]]]) -> str:
    """A Markdown report of ``{label: measure_decoder(...)}`` (e.g. ``untrained`` and ``fitted``)."""
    lines = ["| decoder | identification | real | displaced fakes | random fakes | keys shuffled | keys of another image "
             "| loc. IoU | IoU of the inquiry box |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for label, per in results.items():
        for name, r in per.items():
            i, lo = r.get("identification", {}), r.get("localisation", {})
            tag = f"{label} {name}".strip()
            lines.append(f"| {tag} | {_fmt(i.get('accuracy'))} | {_fmt(i.get('real'))} | {_fmt(i.get('displaced_fakes'))} "
                         f"| {_fmt(i.get('random_fakes'))} | {_fmt(i.get('keys_shuffled'))} "
                         f"| {_fmt(i.get('keys_other_image'))} | {_fmt(lo.get('iou'))} | {_fmt(lo.get('iou_inquiry_box'))} |")
    lines += ["", "Attention of the distillation's inquiries (medians over inquiries; uniform: the share a uniform "
              "attention puts in the box):", "",
              "| decoder | head | in box | within 2 cells | uniform | in box / uniform | top cell in box | exp(entropy) |",
              "|---|---|---:|---:|---:|---:|---:|---:|"]
    for label, per in results.items():
        for name, r in per.items():
            a = r.get("attention")
            if not a:
                continue
            tag = f"{label} {name}".strip()
            rows = [("all", a["all_heads"])] + [(str(h), s) for h, s in enumerate(a["heads"])]
            for head, s in rows:
                lines.append(f"| {tag} | {head} | {_fmt(s['in_box_median'], 4)} | {_fmt(s['within2_median'], 4)} "
                             f"| {_fmt(a['uniform_median'], 4)} | {_fmt(s['in_box_over_uniform_median'], 1)} "
                             f"| {_fmt(s['top_in_box'], 2)} | {_fmt(s['exp_entropy_median'], 0)} |")
    windows = [(f"{label} {name}".strip(), r["attention"]["window_inside"]) for label, per in results.items()
               for name, r in per.items() if (r.get("attention") or {}).get("window_inside")]
    if windows:
        heads = len(next(iter(windows[0][1].values()))["heads_mean"])
        lines += ["", "Attention mass inside a window of k x k cells around each inquiry (mean over inquiries; "
                  "`attention_window: k` keeps this much of the full-map attention; p10: its 10th percentile):", "",
                  "| decoder | window | all heads | p10 | lowest head | " + " | ".join(f"head {h}" for h in range(heads)) + " |",
                  "|---|---:|---:|---:|---:|" + "---:|" * heads]
        for tag, per_size in windows:
            for size, wv in per_size.items():
                lines.append(f"| {tag} | {size} | {_fmt(wv['mean'], 4)} | {_fmt(wv['p10'], 4)} | {_fmt(min(wv['heads_mean']), 4)} | "
                             + " | ".join(_fmt(x, 4) for x in wv["heads_mean"]) + " |")
    return "\n".join(lines) + "\n"
