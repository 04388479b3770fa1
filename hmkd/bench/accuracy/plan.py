"""What the accuracy benchmark trains: the table's rows (methods or the variants of an HMKD
ablation) and the seeds, each row a :class:`Variant` whose ``key`` names its run folders."""

from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass, field
from typing import Any, Sequence

from hmkd.config import Config, ModelConfig, parse_method_options
from hmkd.errors import ConfigError

logger = logging.getLogger(__name__)

__all__ = [
    "ABLATIONS",
    "AITOD_METRICS",
    "LABELS",
    "METHOD_ORDER",
    "METRICS",
    "NAMED_ROWS",
    "NONE_INIT",
    "Variant",
    "ablation_variants",
    "effective_options",
    "method_options_of",
    "none_init_variant",
    "plan_runs",
    "seed_list",
]

METRICS = ("mAP", "AP50", "AP75", "APs", "APm", "APl")
#: AI-TOD's numbers (hmkd.engine.evaluator.AITOD_KEYS) as the benchmark names them, where the runs scored them
AITOD_METRICS = ("aitod_AP", "aitod_APvt", "aitod_APt", "aitod_APs", "aitod_APm")
METHOD_ORDER = ("none", "fitnet", "fgd", "icd", "hmkd")
#: the no-KD row of a student initialised from the teacher (``distill.init_student``), by name in
#: ``methods`` or added when the config sets ``distill.init_student`` to ``neck`` or ``neck_head``
NONE_INIT = "none_init"
#: rows of a method with other options than its defaults, named in ``methods`` like a method:
#: name -> (method, options, label); their run folders are ``<name with - for _>_s<seed>``
NAMED_ROWS: dict[str, tuple[str, dict[str, Any], str]] = {
    "icd_fitted": ("icd", {"decoder_fit": "auto"}, "ICD (decoder pre-fitted on the teacher)"),
    "hmkd_scratch": ("hmkd", {"decoder_fit": "none", "decoder_training": "joint"}, "HMKD (decoder learnt from scratch)"),
}
LABELS = {"teacher": "teacher", "none": "student (no-KD)", NONE_INIT: "student (no-KD, teacher-initialised)",
          "fitnet": "FitNet", "fgd": "FGD", "icd": "ICD", "hmkd": "HMKD"}
ABLATIONS = {
    "supplement": "HMKD with the supplemental (background) distillation on/off (paper Table 5)",
    "heads": "HMKD with 1, 4, 8 decoder heads (paper Table 6)",
    "start_level": "HMKD with the inquiries starting at P3, P4, P5 (keys one level finer; paper Table 7)",
    "inquiry_head": "HMKD with the Inquiry Head on/off",
    "others_bg": "HMKD with L_others on the foreground only (the paper's formula) or on fg + bg",
    "levels": "HMKD distilling L_others/L_bg on P2-P4 (default) or on every common level",
    "weight": "HMKD with its loss weights alpha = beta = 1 (default) or 5 (the loss scale)",
    "aux_every": "HMKD with the decoder's auxiliary task on every step (default) or every 4th (aux_every, a speed knob)",
    "attention_term": "HMKD with and without the attention-weighted term (the hierarchical matching's own contribution)",
    "small_terms": "HMKD with each of its two small-object terms on the keys' level (the small-object foreground "
                   "imitation and the attention-weighted term) on/off",
    "decoder": "HMKD with its decoder learnt during distillation from scratch, fitted on the teacher then trained "
               "jointly, or fitted and frozen",
}


@dataclass
class Variant:
    """One row of the table: ``key`` names its run folders (``<key>_s<seed>``).

    ``init_student`` (``neck`` | ``neck_head``) makes a ``none`` row start from the teacher's FPN
    (and heads) (:data:`NONE_INIT`); None leaves ``distill.init_student`` as the config says (the
    plain ``none`` row has no teacher at all)."""

    key: str
    method: str
    label: str
    options: dict[str, Any] = field(default_factory=dict)
    init_student: str | None = None


def _levels_of(m: ModelConfig) -> list[str]:
    from hmkd.models import DEFAULT_LEVELS, TORCHVISION_DETECTORS

    if m.detector in TORCHVISION_DETECTORS:
        return TORCHVISION_DETECTORS[m.detector].levels
    return list(m.levels) if m.levels else list(DEFAULT_LEVELS.get(m.detector, []))


def _common_levels(cfg: Config, ablation: str) -> list[str]:
    """FPN levels both the student and the teacher have (they decide an ablation's choices)."""
    if cfg.teacher is None:
        raise ConfigError(f"ablation {ablation} needs a 'teacher' section (the common FPN levels decide the choices)")
    teacher_levels = _levels_of(cfg.teacher)
    return [lv for lv in _levels_of(cfg.model) if lv in teacher_levels]


def effective_options(method: str, options: dict[str, Any]) -> dict[str, Any]:
    """The method's options with its defaults filled in (to tell equal variants apart from different ones)."""
    from hmkd.distill import method_class

    opts = parse_method_options(method_class(method).Options, options, check=False)
    return dataclasses.asdict(opts)


def method_options_of(cfg: Config, method: str, method_options: dict[str, dict[str, Any]] | None) -> dict[str, Any]:
    """``method``'s options in the benchmark: ``cfg.distill.options`` when it is the config's method,
    then ``method_options[method]``."""
    base = dict(cfg.distill.options) if cfg.distill.method == method else {}
    base.update((method_options or {}).get(method, {}))
    return base


def ablation_variants(cfg: Config, ablation: str, method_options: dict[str, dict[str, Any]] | None = None) -> list[Variant]:
    """The HMKD variants of ``ablation`` (see :data:`ABLATIONS`) for this config's student and teacher.

    A variant whose options are those of the plain HMKD run gets the key ``hmkd`` (and so reuses
    that run when the main benchmark already made it in the same ``out_dir``).
    """
    if ablation not in ABLATIONS:
        raise ConfigError(f"unknown ablation {ablation!r} (known: {', '.join(ABLATIONS)})")
    base = method_options_of(cfg, "hmkd", method_options)
    base_eff = effective_options("hmkd", base)
    hidden = base_eff["hidden"]
    changes: list[tuple[str, str, dict[str, Any]]] = []  # (slug, label, change)
    attention_off = ("noattn", "HMKD, attention term off", {"attention_term": False})
    if ablation == "supplement":
        changes = [("supplement", "HMKD, supplement on", {"supplement": True}),
                   ("nosupplement", "HMKD, supplement off", {"supplement": False})]
    elif ablation == "inquiry_head":
        changes = [("inquiry", "HMKD, Inquiry Head on", {"inquiry_head": True}),
                   ("noinquiry", "HMKD, Inquiry Head off", {"inquiry_head": False})]
    elif ablation == "others_bg":
        changes = [("fgonly", "HMKD, L_others fg only", {"others_bg_weight": 0.0}),
                   ("fgbg", "HMKD, L_others fg + bg", {"others_bg_weight": 1.0})]
    elif ablation == "weight":
        changes = [(f"weight{w:g}", f"HMKD, alpha = beta = {w:g}", {"alpha": float(w), "beta": float(w)}) for w in (1, 5)]
    elif ablation == "aux_every":
        changes = [(f"auxevery{k}", f"HMKD, decoder task every {'step' if k == 1 else f'{k}th step'}", {"aux_every": k})
                   for k in (1, 4)]
    elif ablation == "attention_term":
        changes = [("attn", "HMKD, attention term on", {"attention_term": True}), attention_off]
    elif ablation == "small_terms":  # attention_off: the same runs as the attention_term ablation's
        changes = [("smallterms", "HMKD, both small-object terms on", {"small_foreground": True, "attention_term": True}),
                   ("nosmallfg", "HMKD, small-object foreground off", {"small_foreground": False}),
                   attention_off,
                   ("nosmallterms", "HMKD, both small-object terms off", {"small_foreground": False, "attention_term": False})]
    elif ablation == "decoder":
        changes = [("scratch", "HMKD, decoder learnt from scratch", {"decoder_fit": "none", "decoder_training": "joint"}),
                   ("fitjoint", "HMKD, fitted decoder, trained on", {"decoder_fit": "auto", "decoder_training": "joint"}),
                   ("fitfrozen", "HMKD, fitted decoder, frozen", {"decoder_fit": "auto", "decoder_training": "frozen"})]
    elif ablation == "levels":
        common = _common_levels(cfg, ablation)
        changes = [("levels3", f"HMKD, levels {common[0]}-{common[min(2, len(common) - 1)]}", {"levels": None}),
                   ("levelsall", f"HMKD, levels {common[0]}-{common[-1]}", {"levels": common})]
    elif ablation == "heads":
        for h in (1, 4, 8):
            if hidden % h:
                logger.warning("ablation heads: %d heads do not divide hidden=%d; skipped", h, hidden)
                continue
            changes.append((f"heads{h}", f"HMKD, {h} head{'s' if h > 1 else ''}", {"heads": h}))
    else:  # start_level
        common = _common_levels(cfg, ablation)
        for lv in ("P3", "P4", "P5"):
            prev = f"P{int(lv[1:]) - 1}"
            if lv in common and prev in common:
                changes.append((f"start{lv.lower()}", f"HMKD, start {lv} (keys {prev})", {"start_level": lv, "pairs": None}))
        if not changes:
            raise ConfigError(f"ablation start_level: no starting level fits the common levels {common}")
    out: list[Variant] = []
    for slug, label, change in changes:
        opts = {**base, **change}
        eff = effective_options("hmkd", opts)
        if change.get("start_level") and not base_eff.get("pairs") and not base_eff.get("start_level"):
            # the default start is the second-finest common level: an explicit one equal to it is the same run
            common = _common_levels(cfg, ablation)
            if len(common) > 1 and change["start_level"] == common[1]:
                eff["start_level"] = None
        same = eff == base_eff
        out.append(Variant("hmkd" if same else f"hmkd-{slug}", "hmkd", label + (" (= HMKD)" if same else ""), base if same else opts))
    return out


def none_init_variant(cfg: Config) -> Variant:
    """The no-KD row with the student initialised from the teacher: ``distill.init_student`` of the
    config, or ``neck_head`` (FGD's and ICD's default) when the config leaves it to each method."""
    init = cfg.distill.init_student or "neck_head"
    if init == "none":
        raise ConfigError(f"{NONE_INIT}: distill.init_student is none, so that row would be the plain no-KD row; "
                          "set distill.init_student to neck or neck_head")
    if init not in ("neck", "neck_head"):
        raise ConfigError(f"distill.init_student must be none, neck or neck_head, got {init!r}")
    label = LABELS[NONE_INIT] if init == "neck_head" else "student (no-KD, teacher-initialised FPN)"
    return Variant(NONE_INIT, "none", label, {}, init_student=init)


def plan_runs(
    cfg: Config,
    methods: Sequence[str] | None = None,
    ablation: str | None = None,
    method_options: dict[str, dict[str, Any]] | None = None,
) -> list[Variant]:
    """The table's student rows, no-KD first (it is always included: every gain is measured from it),
    then the teacher-initialised no-KD row (:data:`NONE_INIT`) when ``methods`` names it or the config
    sets ``distill.init_student`` to ``neck`` / ``neck_head`` (every distilled row then starts so)."""
    none = Variant("none", "none", LABELS["none"], {})
    wanted = list(methods) if methods else list(METHOD_ORDER)
    head = [none]
    if NONE_INIT in wanted or cfg.distill.init_student in ("neck", "neck_head"):
        head.append(none_init_variant(cfg))
    wanted = [m for m in wanted if m != NONE_INIT]
    if ablation:
        return head + ablation_variants(cfg, ablation, method_options)
    for m in wanted:
        method, extra, _ = _row_of(m)
        # unknown methods and bad options fail here
        effective_options(method, {**method_options_of(cfg, method, method_options), **extra})
    order = [r for m in METHOD_ORDER for r in (m, *(n for n, row in NAMED_ROWS.items() if row[0] == m))]
    ordered = [m for m in order if m in wanted] + [m for m in wanted if m not in order]
    out = head
    for m in dict.fromkeys(ordered):
        if m in NAMED_ROWS or ":" in m:
            method, extra, label = _row_of(m)
            key = m.replace("_", "-") if m in NAMED_ROWS else spec_key(m)
            out.append(Variant(key, method, label, {**method_options_of(cfg, method, method_options), **extra}))
        elif m != "none":
            out.append(Variant(m, m, LABELS.get(m, m), method_options_of(cfg, m, method_options)))
    return out


def spec_key(spec: str) -> str:
    """The run-folder key of a ``method:option=value`` row: ``hmkd:decoder_training=frozen`` ->
    ``hmkd+decoder-training-frozen`` (characters other than letters, digits, ``.`` and ``-`` become ``-``)."""
    name, *items = spec.split(":")
    return "+".join([name] + [re.sub(r"[^A-Za-z0-9.-]+", "-", item) for item in items])


def _row_of(m: str) -> tuple[str, dict[str, Any], str]:
    """(method, its extra options, label) of a ``methods`` entry: a method, a :data:`NAMED_ROWS` name or
    ``method:option=value[:option=value ...]`` (a variant, values read as YAML, as ``hmkd bench cost`` takes)."""
    if m in NAMED_ROWS:
        return NAMED_ROWS[m]
    if ":" in m:
        from hmkd.bench.cost import parse_method_spec

        method, extra = parse_method_spec(m)
        label = f"{LABELS.get(method, method)} ({', '.join(f'{k}={v}' for k, v in extra.items())})"
        return method, extra, label
    return m, {}, ""


def seed_list(cfg: Config, seeds: int | Sequence[int]) -> list[int]:
    """``seeds`` seeds from ``cfg.seed`` on, or the explicit list."""
    if isinstance(seeds, int):
        if seeds < 1:
            raise ConfigError(f"seeds must be >= 1, got {seeds}")
        return [cfg.seed + i for i in range(seeds)]
    out = [int(s) for s in seeds]
    if not out:
        raise ConfigError("seeds: the list is empty")
    return out
