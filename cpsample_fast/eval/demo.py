"""The demo: CPSample against plain DDIM on a memorising digits model (``cpsample demo``).

sklearn digits, a fixed member subset (``models.digits_split``) and held-out non-members. The
shipped memorising UNet and protector (``cpsample_fast/assets``) are loaded, or trained with
``train=True`` (slow: ~25 min for the UNet on one CPU thread). The same seeds are sampled with
plain DDIM and with CPSample, then: replication rate at the thresholds, mean / max
nearest-neighbour similarity, the blurred near-copy rate (Gaussian blur σ = 1 px on samples and
members alike), Fréchet distance to held-out digits, membership through ε and ε̂ (two-sided AUC
and |z| first), time. A third sampler, rejection sampling at the same α
(``cps.eval.rejection_sample``: plain DDIM samples kept only where the protector's gate stays
shut), is run beside them with its cost in model evaluations per accepted image. The guidance
defaults come from the tuner's settings file shipped in ``cpsample_fast/assets``
(``GUIDANCE_SETTINGS``, reproduced by ``scripts/tune_demo_guidance.py``).

:func:`run_demo` runs the stages in order — :func:`load_or_train_models`, :func:`sample_demo`,
:func:`audit_demo`, then :func:`cpsample_fast.eval.demo_report.write_demo_outputs` (report.json,
PNGs, the samples) — and returns a :class:`DemoResult`, whose ``table()`` is the printed table.
"""

from __future__ import annotations

import dataclasses
import json
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

# The guidance defaults are the tuner's recommendation for the shipped UNet and protector
# (cps.tune_guidance; scripts/tune_demo_guidance.py writes this file, with the search table and
# the held-out re-score inside).
GUIDANCE_SETTINGS = "digits_guidance.json"
# The quality-matched DPM-Solver++ settings (scripts/dpm_quality_match.py): the demo's fast column.
FAST_SETTINGS = "digits_guidance_dpm.json"
# Used only when the settings file is missing (e.g. a checkout without assets).
FALLBACK_SCALE = 225.0
FALLBACK_ALPHA = 0.3
FALLBACK_MODE = "entropy"
PROTECTOR_ASSET = "digits_protector.safetensors"
UNET_ASSET = "digits_unet.safetensors"


def _assets() -> Path:
    from ..models.digits import ASSET_DIR

    return ASSET_DIR


def shipped_settings() -> dict | None:
    """The shipped tuned settings (raw JSON, unchecked), or None when absent."""
    path = _assets() / GUIDANCE_SETTINGS
    return json.loads(path.read_text()) if path.exists() else None


def _defaults() -> tuple[float, float, str, tuple[int, int] | None]:
    s = shipped_settings()
    if s is None:
        return FALLBACK_SCALE, FALLBACK_ALPHA, FALLBACK_MODE, None
    g = s["sampler"]
    gr = g.get("guidance_range")
    return float(g["scale"]), float(g["alpha"]), g["mode"], None if gr is None else tuple(gr)


DEFAULT_SCALE, DEFAULT_ALPHA, DEFAULT_MODE, DEFAULT_GUIDANCE_RANGE = _defaults()
BLUR_SIGMA = 1.0
# Pixel-space cosine threshold for "replica", calibrated on real digits the model never saw: of
# the 512 evaluation digits, 1 (0.2%) has a nearest-member similarity above 0.98 (max 0.9805,
# 99th percentile 0.971), so > 0.98 is closer to a member than natural variation gets. The paper's
# 0.95 and 0.97 are shown too, but 13.9% and 1.8% of real held-out digits already exceed them
# (8×8 digits upsampled to 16×16 are smooth and alike in pixel space). The demo prints this
# calibration column next to the samplers.
DEFAULT_THRESHOLDS = (0.95, 0.97, 0.98)
PRIMARY_THRESHOLD = 0.98


@dataclass(frozen=True)
class DemoConfig:
    """Every setting of a demo run (the options of ``cpsample demo``, same names)."""

    out: str | Path = "demo_out"
    n: int = 128  # samples per sampler
    steps: int = 50  # DDIM steps
    seed: int = 0  # noise seed shared by every sampler
    scale: float = DEFAULT_SCALE
    alpha: float = DEFAULT_ALPHA
    mode: str = DEFAULT_MODE
    thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS
    n_nonmembers: int = 64  # held-out digits used as non-members in the membership attack
    attack_timesteps: tuple[int, ...] = (50, 100, 200)
    train: bool = False  # train the eps-model and protector instead of loading the shipped ones
    unet_steps: int = 8000
    protector_steps: int = 1500
    feature_steps: int = 200  # training steps of the Fréchet feature network
    backend: str = "auto"
    guidance_range: tuple[int, int] | None = DEFAULT_GUIDANCE_RANGE
    blur_sigma: float = BLUR_SIGMA
    rejection_budget: int | None = None  # draws of the rejection baseline (None: 2·n; 0: off)

    def checked(self) -> DemoConfig:
        """This config with thresholds checked and sequences as tuples.

        Raises:
            ValueError: naming the option and what was expected.
        """
        from .replication import check_threshold

        thresholds = tuple(check_threshold(t) for t in self.thresholds)
        if self.n < 2 or self.n_nonmembers < 2:
            raise ValueError("--n and --n-nonmembers must be >= 2")
        if not self.blur_sigma > 0:
            raise ValueError(f"--blur-sigma must be > 0 pixels, got {self.blur_sigma}")
        if self.budget and self.budget < self.n:
            raise ValueError(
                f"--rejection-budget must be 0 or >= --n ({self.n}), got {self.budget}"
            )
        grange = None if self.guidance_range is None else tuple(self.guidance_range)
        return dataclasses.replace(self, out=Path(self.out), thresholds=thresholds,
                                   guidance_range=grange,
                                   attack_timesteps=tuple(self.attack_timesteps))  # fmt: skip

    @property
    def budget(self) -> int:
        """Draw budget of the rejection baseline (0: skipped)."""
        return 2 * self.n if self.rejection_budget is None else self.rejection_budget

    @property
    def guidance(self) -> dict:
        """CPSample's guidance: the same for the sampler and the ε̂ attack."""
        return dict(scale=self.scale, alpha=self.alpha, mode=self.mode,
                    guidance_range=self.guidance_range)  # fmt: skip

    @property
    def primary_threshold(self) -> float:
        """The threshold of the summary: 0.98 when shown, else the last one."""
        return PRIMARY_THRESHOLD if PRIMARY_THRESHOLD in self.thresholds else self.thresholds[-1]


@dataclass
class DemoResult:
    """What a demo run measured (``report`` is the dict written to ``report.json``)."""

    config: DemoConfig
    sources: dict
    samples: dict  # sampler name -> [n, 1, 16, 16] ("rejection" only when it kept any)
    trace: object  # CPSample's sampling trace
    rejection: object | None  # RejectionResult, None when skipped
    replication: dict  # sampler name -> ReplicationResult
    blurred: dict
    calibration: object  # replication of real held-out digits
    calibration_blurred: object
    quality: dict
    membership_eps: object
    membership_eps_hat: object
    guided_steps: int
    times: dict = field(default_factory=dict)
    fast: dict | None = None  # CPSampler options of the "cpsample_dpm" column (None: not run)
    fast_guided_steps: int | None = None  # its steps that run the protector
    report: dict = field(default_factory=dict)

    def cut_of(self, rate: float) -> float | None:
        """The replication cut against plain DDIM at the primary threshold."""
        base = self.replication["ddim"].rate(self.config.primary_threshold)
        return 1 - rate / base if base else None

    def table(self) -> str:
        """The demo's printed table and summary lines."""
        from .demo_report import demo_table

        return demo_table(self)


Log = Callable[[str], None]


def load_or_train_models(config, split, schedule, log: Log):
    """``(eps_model, protector, protector_meta, sources)`` — shipped weights or trained here.

    ``config`` needs ``train`` (and ``unet_steps`` / ``protector_steps`` when training).
    """
    from ..models import SmallUNet, load_digits_unet, train_diffusion
    from ..protector import ProtectorNet, load_protector, train_protector, verify_protector

    sources = {}
    unet_path = _assets() / UNET_ASSET
    if not config.train and unet_path.exists():
        eps_model, meta = load_digits_unet(unet_path)
        sources["eps_model"] = f"shipped {unet_path.name} ({meta.get('steps')} steps)"
        if meta.get("member_index") != split.member_index.tolist():
            raise ValueError("the shipped UNet was trained on another member split")
    else:
        log("training the memorising UNet (slow; shipped weights make this unnecessary)")
        eps_model, _ = train_diffusion(SmallUNet("digits"), split.members, schedule,
                                       steps=config.unet_steps, batch_size=32, lr=1e-3,
                                       seed=0)  # fmt: skip
        eps_model.requires_grad_(False)
        sources["eps_model"] = f"trained here ({config.unet_steps} steps)"
    prot_path = _assets() / PROTECTOR_ASSET
    if not config.train and prot_path.exists():
        protector, pmeta = load_protector(prot_path)
        verify_protector(pmeta, split.members)  # raises if it protects other images
        sources["protector"] = f"shipped {prot_path.name}"
    else:
        log("training the protector")
        protector, report = train_protector(split.members, schedule=schedule,
                                            protector=ProtectorNet(1, 16, base_channels=16),
                                            holdout=split.holdout, steps=config.protector_steps,
                                            batch_size=64, lr=2e-3, seed=0)  # fmt: skip
        pmeta = {"report": report.to_dict(), "fingerprint": report.fingerprint}
        sources["protector"] = f"trained here ({config.protector_steps} steps)"
    protector.requires_grad_(False)
    return eps_model, protector, pmeta, sources


def settings_note(config: DemoConfig, eps_model, protector, pmeta) -> str:
    """Whether the run uses the shipped tuned settings, and that they belong to these models."""
    from ..settings import load_settings

    raw = shipped_settings()
    if raw is None:
        return "no tuned settings file; fallback defaults"
    g = raw["sampler"]
    grange = None if config.guidance_range is None else list(config.guidance_range)
    same = (config.mode, config.alpha, config.scale, grange, config.steps) == (
        g["mode"], g["alpha"], g["scale"], g["guidance_range"], g["num_inference_steps"]
    )  # fmt: skip
    if not same:
        return f"settings given on the command line (tuned: {GUIDANCE_SETTINGS} differs)"
    if config.train:
        return f"{GUIDANCE_SETTINGS} (tuned for the shipped models, not for models trained here)"
    load_settings(raw, eps_model=eps_model, protector=protector, protector_meta=pmeta)
    return f"{GUIDANCE_SETTINGS} (tuned for these models, identity verified)"


def fast_settings(config: DemoConfig, eps_model, protector, pmeta) -> tuple[dict | None, str]:
    """The shipped quality-matched DPM-Solver++ options when they belong to these models (else
    None), and a note saying which."""
    from ..settings import load_settings, sampler_kwargs

    path = _assets() / FAST_SETTINGS
    if not path.exists():
        return None, f"no {FAST_SETTINGS}: fast column skipped"
    if config.train:
        return None, f"{FAST_SETTINGS} is tuned for the shipped models: fast column skipped"
    loaded = load_settings(path, eps_model=eps_model, protector=protector, protector_meta=pmeta)
    return sampler_kwargs(loaded), f"{FAST_SETTINGS} (quality-matched, identity verified)"


def sample_demo(config: DemoConfig, eps_model, protector, schedule, log: Log, times: dict,
                fast: dict | None = None):  # fmt: skip
    """``(samples, cpsample_trace, rejection or None)``: the same seeds with plain DDIM, with
    CPSample, with CPSample on DPM-Solver++ at ``fast`` (its quality-matched settings; skipped
    when None) and (unless its budget is 0) with rejection sampling at the same α."""
    from ..sampler import CPSampler
    from .rejection import rejection_sample

    shape = (config.n, 1, 16, 16)
    plain = {**config.guidance, "scale": 0.0, "guidance_range": None}
    samples, trace = {}, None
    for name, prot, guidance in (("ddim", None, plain), ("cpsample", protector, config.guidance)):
        t0 = time.perf_counter()
        sampler = CPSampler(eps_model, prot, schedule, num_inference_steps=config.steps,
                            backend=config.backend, **guidance)  # fmt: skip
        if prot is not None:
            samples[name], trace = sampler.sample(shape, seed=config.seed, return_trace=True)
        else:
            samples[name] = sampler.sample(shape, seed=config.seed)
        times[f"sample_{name}"] = time.perf_counter() - t0
        log(f"sampled {config.n} with {name} in {times[f'sample_{name}']:.1f}s")
    if fast is not None:
        t0 = time.perf_counter()
        sampler = CPSampler(eps_model, protector, schedule, backend=config.backend, **fast)
        samples["cpsample_dpm"] = sampler.sample(shape, seed=config.seed)
        times["sample_cpsample_dpm"] = time.perf_counter() - t0
        log(f"sampled {config.n} with {fast['solver']}-{fast['num_inference_steps']} in "
            f"{times['sample_cpsample_dpm']:.1f}s")  # fmt: skip
    rej = None
    if config.budget:
        t0 = time.perf_counter()
        with warnings.catch_warnings():  # a spent budget is reported in the table and JSON
            warnings.simplefilter("ignore", RuntimeWarning)
            rej = rejection_sample(eps_model, protector, schedule, config.n, alpha=config.alpha,
                                   num_inference_steps=config.steps, sample_shape=shape[1:],
                                   seed=config.seed, max_draws=config.budget,
                                   backend=config.backend)  # fmt: skip
        times["sample_rejection"] = time.perf_counter() - t0
        log(f"{rej.message} in {times['sample_rejection']:.1f}s")
        if rej.n_accepted:
            samples["rejection"] = rej.samples
    return samples, trace, rej


def audit_demo(config: DemoConfig, split, samples: dict, eps_model, protector, schedule,
               times: dict) -> dict:  # fmt: skip
    """Replication (plain, blurred, and of real held-out digits for calibration), quality and
    membership (ε, ε̂); the :class:`DemoResult` fields of the same names."""
    from .audit import membership_attacks, replication_audit
    from .quality import quality, train_feature_net

    t0 = time.perf_counter()
    kw = dict(thresholds=config.thresholds, blur_sigma=config.blur_sigma)
    pairs = {k: replication_audit(x, split.members, **kw) for k, x in samples.items()}
    # Calibration: real digits the model never saw, against the same members.
    calib, calib_blur = replication_audit(split.evaluation, split.members, **kw)
    times["replication"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    feature_net = train_feature_net(split.evaluation, steps=config.feature_steps, seed=0)
    quals = {
        k: quality(x, split.evaluation, features=feature_net, kid_subsets=20)
        for k, x in samples.items()
        if x.shape[0] >= 2
    }
    times["quality"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    non = split.evaluation[: config.n_nonmembers]
    mi_eps, mi_hat = membership_attacks(eps_model, split.members, non, schedule,
                                        timesteps=list(config.attack_timesteps),
                                        protector=protector, **config.guidance)  # fmt: skip
    times["membership"] = time.perf_counter() - t0
    return dict(
        replication={k: p[0] for k, p in pairs.items()},
        blurred={k: p[1] for k, p in pairs.items()},
        calibration=calib,
        calibration_blurred=calib_blur,
        quality=quals,
        membership_eps=mi_eps,
        membership_eps_hat=mi_hat,
    )


def run_demo(config: DemoConfig, log: Log | None = None) -> DemoResult:
    """Run the demo end to end and write its outputs into ``config.out``.

    Args:
        config: the settings (checked first: bad ones raise before anything is written).
        log: receives one line per stage (default: none).

    Returns:
        The :class:`DemoResult`; ``report.json``, the PNGs and ``samples_<sampler>.npz`` are
        in ``config.out``.
    """
    from ..models import digits_split
    from ..schedule import NoiseSchedule
    from ..solvers import guided_step_count
    from .demo_report import write_demo_outputs

    config = config.checked()
    log = log or (lambda msg: None)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    t_all = time.perf_counter()

    t0 = time.perf_counter()
    split = digits_split()
    schedule = NoiseSchedule()
    eps_model, protector, pmeta, sources = load_or_train_models(config, split, schedule, log)
    sources["guidance_settings"] = settings_note(config, eps_model, protector, pmeta)
    fast, sources["fast_settings"] = fast_settings(config, eps_model, protector, pmeta)
    times["load_models"] = time.perf_counter() - t0

    samples, trace, rej = sample_demo(config, eps_model, protector, schedule, log, times, fast)
    audited = audit_demo(config, split, samples, eps_model, protector, schedule, times)
    result = DemoResult(config=config, sources=sources, samples=samples, trace=trace,
                        rejection=rej, times=times, fast=fast,
                        guided_steps=guided_step_count(schedule, config.steps, "ddim",
                                                       config.guidance_range),
                        fast_guided_steps=fast and guided_step_count(
                            schedule, fast["num_inference_steps"], fast["solver"],
                            fast["guidance_range"]),
                        **audited)  # fmt: skip
    write_demo_outputs(result, split, pmeta, t_all)
    return result
