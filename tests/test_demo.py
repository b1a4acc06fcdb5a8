"""The demo's evidence on small sizes, with the shipped memorising UNet and protector.

Checks what the full demo shows, on seeds the tuner never saw (it searches seeds 0–1 and
re-scores on 2–3; these tests use 5 and 6): the shipped model memorises (plain DDIM replicates
≥ 20%), CPSample cuts that at the same seeds with a Fréchet distance to held-out digits at most
1.5× DDIM's, the ε attack separates members, and CPSample beats a sign-flipped control.

The control (:class:`FlippedGuidance`) keeps the protector's logits — so which samples are gated,
at which steps, and the size of the push are all unchanged — and flips only the gradient that
guidance follows: it returns ``2·f.detach() − f``, whose value is ``f`` and whose input gradient
is ``−∇f``. Negating the logits (``−f``) would *not* be a control: the guided term
``w(|f|)·sign(f)·∇f`` is symmetric under ``f → −f``. If CPSample's cut came from disturbing
trajectories at all (speckle, extra noise) rather than from pushing away from the protector's
confident region, the control would cut replication as much; it must not.
"""

import json

import pytest
import torch

from cpsample_fast.cli import demo
from cpsample_fast.cli.__main__ import main
from cpsample_fast.eval import replication
from cpsample_fast.models import EmpiricalDenoiser, digits_split, load_digits_unet
from cpsample_fast.models.digits import ASSET_DIR, DIGITS_UNET
from cpsample_fast.protector import load_protector
from cpsample_fast.sampler import CPSampler
from cpsample_fast.schedule import NoiseSchedule

PROTECTOR = ASSET_DIR / demo.PROTECTOR_ASSET
# Seeds the tuner never used (search 0, 1; held-out re-score 2, 3).
TEST_SEEDS = (5, 6)


class FlippedGuidance(torch.nn.Module):
    """Same logits as ``protector``, opposite input gradient (see the module doc)."""

    def __init__(self, protector):
        super().__init__()
        self.protector = protector

    def forward(self, x, t):
        f = self.protector(x, t)
        return 2 * f.detach() - f


def test_assets_are_shipped():
    for p in (DIGITS_UNET, PROTECTOR):
        assert p.exists() and p.with_suffix(".json").exists(), p
        size = p.stat().st_size
        print(p.name, size)
        assert size < 4e6


def test_demo_small(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = main(
        [
            "demo",
            "--out",
            str(out),
            "--n",
            "33",
            "--n-nonmembers",
            "16",
            "--attack-timesteps",
            "100",
            "--feature-steps",
            "60",
            "--seed",
            str(TEST_SEEDS[0]),
        ]
    )
    printed = capsys.readouterr().out
    print(printed)
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    s = report["summary"]
    print(json.dumps(s, indent=1))
    assert s["ddim_replication_rate"] >= 0.2
    assert s["replication_cut"] >= 0.9
    # A Fréchet ratio of 33 samples in 64 feature dimensions is mostly sampling noise (measured
    # with 200 feature steps: 1.82 at seed 5, 1.26 at seed 6); the ≤ 1.3 target is met pooled
    # (test_shipped_settings_record_their_targets), this only catches broken samples.
    assert s["fd_ratio_cpsample_over_ddim"] <= 2.5
    assert report["membership"]["eps"]["auc"] > 0.9
    assert s["membership_eps_auc_two_sided"] == report["membership"]["eps"]["two_sided"]["auc"]
    hat = report["membership"]["eps_hat"]
    assert s["membership_eps_hat_auc_two_sided"] == max(hat["auc"], 1 - hat["auc"])
    # The blurred audit is reported for every sampler and the real held-out digits, and the
    # shipped defaults are the tuned settings file's, verified against the shipped models.
    assert report["setting"]["sources"]["guidance_settings"].endswith("identity verified)")
    assert s["blurred_target"] == pytest.approx(2 * s["heldout_real_blurred_rate"] + 0.01)
    assert s["ddim_blurred_rate"] >= 0.2
    assert report["replication_blurred"]["cpsample"]["features"].endswith("sigma=1 px")
    rej = report["rejection"]
    assert rej["n_drawn"] == 66 and rej["model_evaluations"] == 66 * 50
    assert report["cost"]["cpsample"]["model_evaluations_per_image"] == 50
    # The fast column: DPM-Solver++ at its shipped quality-matched settings, 10 model
    # evaluations per image, still cutting most copies on these unseen seeds.
    assert report["setting"]["sources"]["fast_settings"].endswith("identity verified)")
    assert s["cpsample_dpm_sampler"] == "DPM-Solver++-10"
    assert report["cost"]["cpsample_dpm"]["model_evaluations_per_image"] == 10
    assert s["cpsample_dpm_replication_cut"] >= 0.8
    assert "CPSample DPM-10" in printed and "fewer steps: DPM-Solver++-10" in printed
    assert (out / "samples_cpsample_dpm.npz").is_file()
    assert report["membership"]["eps"]["threat_model"] == "eps"
    assert report["membership"]["eps_hat"]["threat_model"] == "eps_hat"
    for name in (
        "samples.png",
        "nearest_pairs_ddim.png",
        "nearest_pairs_cpsample.png",
        "nearest_pairs_cpsample_dpm.png",
        "membership_roc.png",
        "confidence_trace.png",
        "protector_accuracy.png",
        "replication_vs_cost.png",
    ):
        assert (out / name).stat().st_size > 1000, name
    assert "replication > 0.98" in printed
    # The samples feed `cpsample evaluate` directly.
    rc = main(
        [
            "evaluate",
            "--samples",
            str(out / "samples_ddim.npz"),
            "--train",
            "digits-members",
            "--thresholds",
            "0.98",
            "--out",
            str(tmp_path / "ev"),
        ]
    )
    assert rc == 0
    ev = json.loads((tmp_path / "ev" / "evaluation.json").read_text())
    want = report["replication"]["ddim"]["replication_rate"]["0.98"]
    assert ev["replication"]["replication_rate"]["0.98"] == want


def test_shipped_settings_record_their_targets():
    """The demo's settings file is the tuner's output for the shipped models, and it records
    the held-out and pooled scores that meet the demo's targets."""
    from cpsample_fast.settings import load_settings

    model, _ = load_digits_unet()
    protector, meta = load_protector(PROTECTOR)
    st = load_settings(ASSET_DIR / demo.GUIDANCE_SETTINGS, eps_model=model, protector=protector,
                       protector_meta=meta)  # fmt: skip
    g = st["sampler"]
    assert (g["mode"], g["alpha"], g["scale"]) == (
        demo.DEFAULT_MODE, demo.DEFAULT_ALPHA, demo.DEFAULT_SCALE,
    )  # fmt: skip
    tuned = st["tuned"]
    assert set(tuned["search_seeds"]).isdisjoint(tuned["holdout_seeds"])
    assert set(TEST_SEEDS).isdisjoint(tuned["search_seeds"] + tuned["holdout_seeds"])
    t, h, pooled = tuned["targets"], tuned["holdout"], tuned["pooled_check"]
    assert tuned["holdout_meets_targets"]
    assert h["replication_cut"] >= t["replication_cut"]
    assert h["frechet_ratio"] <= t["frechet_ratio"]
    assert h["membership_auc"] <= t["membership_auc"]
    assert len(pooled["seeds"]) == 4 and pooled["frechet_ratio"] <= t["frechet_ratio"]
    limit = t["blurred_factor"] * pooled["heldout_real_blurred_rate"] + t["blurred_margin"]
    assert pooled["cpsample"]["blurred_rate"] <= limit


def test_cpsample_beats_sign_flipped_control():
    """CPSample against the same guidance pointed the other way, on two unseen seeds pooled."""
    from cpsample_fast.eval import blurred_replication

    split = digits_split()
    s = NoiseSchedule()
    model, _ = load_digits_unet()
    protector, _ = load_protector(PROTECTOR)
    protector.requires_grad_(False)
    kw = dict(scale=demo.DEFAULT_SCALE, alpha=demo.DEFAULT_ALPHA, mode=demo.DEFAULT_MODE,
              guidance_range=demo.DEFAULT_GUIDANCE_RANGE)  # fmt: skip
    samplers = {
        "ddim": CPSampler(model, None, s, num_inference_steps=50),
        "cpsample": CPSampler(model, protector, s, num_inference_steps=50, **kw),
        "control": CPSampler(model, FlippedGuidance(protector), s, num_inference_steps=50, **kw),
    }
    rates, blurred = {}, {}
    for name, sampler in samplers.items():
        x = torch.cat([sampler.sample((24, 1, 16, 16), seed=seed) for seed in TEST_SEEDS])
        rates[name] = replication(x, split.members, thresholds=(0.98,)).rates[0.98]
        blurred[name] = blurred_replication(x, split.members, thresholds=(0.98,)).rates[0.98]
    print("replication > 0.98:", rates, "blurred:", blurred)
    assert rates["ddim"] >= 0.9
    assert rates["cpsample"] <= 0.15 * rates["ddim"]
    # The control flips only the direction: it must protect far worse than CPSample. Measured
    # (24 per seed, seeds 5 + 6): CPSample 0.0% / blurred 0.0%, control 37.5% / 56.2% — pushed
    # towards confidence the samples still move (so the control is not DDIM's 100%), but they
    # stay copies far more often; 12 of 48 is far outside the sampling error of a 0-of-48 rate.
    assert rates["control"] >= rates["cpsample"] + 0.25
    assert blurred["control"] >= blurred["cpsample"] + 0.25


def test_flipped_guidance_control_negates_the_guidance_term():
    """The control's guidance term is exactly minus CPSample's; negated logits change nothing."""
    from cpsample_fast.eval.membership import denoiser_output

    s = NoiseSchedule()
    model, _ = load_digits_unet()
    protector, _ = load_protector(PROTECTOR)
    protector.requires_grad_(False)
    split = digits_split()
    t = torch.full((8,), 100, dtype=torch.long)
    a = s.alphas_cumprod[100]
    x = a.sqrt() * split.members[:8] + (1 - a).sqrt() * torch.randn(8, 1, 16, 16)
    kw = dict(scale=50.0, alpha=0.5, mode="repel")
    # Without clipping ε̂ - ε is the guidance term G itself (with it, the clipped shift).
    s = NoiseSchedule(clip_sample=False)
    eps = denoiser_output(model, x, t, s)
    g = denoiser_output(model, x, t, s, protector=protector, **kw) - eps
    g_ctl = denoiser_output(model, x, t, s, protector=FlippedGuidance(protector), **kw) - eps
    assert g.abs().max() > 1e-3
    assert torch.allclose(g_ctl, -g, atol=1e-5)
    # Negating the logits is not a control: the guidance term is unchanged.
    neg = denoiser_output(model, x, t, s, protector=lambda xx, tt: -protector(xx, tt), **kw) - eps
    assert torch.allclose(neg, g, atol=1e-5)


@pytest.mark.xfail(
    strict=True,
    reason="known limitation: the exact empirical denoiser of the 32 protected members has no "
    "other image to end on (the posterior collapses onto a training image at small t whatever "
    "guidance did earlier), so every endpoint is a copy of a protected image; measured with the "
    "pre-fix step: replication > 0.98 stayed 100% for repel/attract/entropy, alpha 0.3, s from "
    "250 to 1e6. When the memoriser also knows unprotected images, CPSample does cut copies of "
    "the protected ones: tests/test_subset_protection.py (87%), test_latent_protection.py (91%)",
)
def test_empirical_denoiser_cpsample_replicates_far_less():
    split = digits_split()
    s = NoiseSchedule()
    model = EmpiricalDenoiser(split.members, s)
    protector, _ = load_protector(PROTECTOR)
    protector.requires_grad_(False)
    rates = {}
    for name, scale in (("ddim", 0.0), ("cpsample", demo.DEFAULT_SCALE)):
        x = CPSampler(
            model,
            protector if scale else None,
            s,
            num_inference_steps=50,
            scale=scale,
            alpha=demo.DEFAULT_ALPHA,
            mode=demo.DEFAULT_MODE,
        ).sample((17, 1, 16, 16), seed=1)
        rates[name] = replication(x, split.members, thresholds=(0.98,)).rates[0.98]
    print("empirical denoiser replication rates:", rates)
    assert rates["ddim"] >= 0.9
    assert rates["cpsample"] <= 0.25 * rates["ddim"]


@pytest.mark.parametrize("bad", [["--thresholds", "1.5"], ["--n", "1"]])
def test_demo_bad_arguments(tmp_path, capsys, bad):
    assert main(["demo", "--out", str(tmp_path), *bad]) == 2
    assert "cpsample demo" in capsys.readouterr().err


def test_split_is_disjoint():
    split = digits_split()
    idx = torch.cat([split.member_index, split.holdout_index, split.evaluation_index])
    assert idx.unique().numel() == idx.numel()


def test_demo_options_are_the_config_fields():
    """Every DemoConfig field is a ``cpsample demo`` option with the config's default."""
    from cpsample_fast.cli.__main__ import build_parser
    from cpsample_fast.eval.demo import DemoConfig

    args = build_parser().parse_args(["demo"])
    fields = DemoConfig.__dataclass_fields__
    assert all(hasattr(args, k) for k in fields), [k for k in fields if not hasattr(args, k)]
    assert demo.config_from_args(args).checked() == DemoConfig().checked()
    args = build_parser().parse_args(["demo", "--n", "7", "--guidance-range", "10", "500"])
    assert demo.config_from_args(args).checked().n == 7
    assert demo.config_from_args(args).checked().guidance_range == (10, 500)


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        ({"n": 1}, "--n and --n-nonmembers must be >= 2"),
        ({"blur_sigma": 0.0}, "--blur-sigma must be > 0"),
        ({"n": 8, "rejection_budget": 3}, r"--rejection-budget must be 0 or >= --n \(8\)"),
        ({"thresholds": (0.9, 2.0)}, r"thresholds must lie in \[-1, 1\]"),
    ],
)
def test_run_demo_refuses_bad_config_before_writing(tmp_path, bad, match):
    from cpsample_fast.eval.demo import DemoConfig, run_demo

    with pytest.raises(ValueError, match=match):
        run_demo(DemoConfig(out=tmp_path / "never", **bad))
    assert not (tmp_path / "never").exists()
