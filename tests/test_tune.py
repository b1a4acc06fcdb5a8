"""The guidance tuner, its settings file and the bad input it refuses."""

import json

import numpy as np
import pytest
import torch

from cpsample_fast import CPSampler
from cpsample_fast.cli.__main__ import main
from cpsample_fast.models import SmallUNet
from cpsample_fast.protector import load_protector
from cpsample_fast.schedule import NoiseSchedule
from cpsample_fast.settings import load_settings, make_settings, module_sha256
from cpsample_fast.tune import Targets, pareto_front, recommend, tune_guidance


@pytest.fixture(scope="module")
def tiny(write_tiny_assets, tmp_path_factory):
    """Tiny UNet, a protector of 6 random members, reference images, all on disk too."""
    torch.manual_seed(0)
    members = torch.rand(6, 1, 16, 16) * 2 - 1
    reference = torch.rand(12, 1, 16, 16) * 2 - 1
    d = write_tiny_assets(tmp_path_factory.mktemp("tune"), members, steps=20, batch_size=6)
    np.savez(d / "members.npz", images=members.numpy())
    np.savez(d / "reference.npz", images=reference.numpy())
    np.savez(d / "other.npz", images=(torch.rand(6, 1, 16, 16) * 2 - 1).numpy())
    from cpsample_fast.models import load_unet

    model, _ = load_unet(d / "unet.safetensors")
    prot, meta = load_protector(d / "protector")
    prot.requires_grad_(False)
    return d, model, prot, meta, members, reference


KW = dict(
    modes=("repel",), alphas=(0.5,), scales=(5.0, 50.0), num_inference_steps=4, seeds=(0,),
    holdout_seeds=(1,), rounds=2, n_nonmembers=6, attack_timesteps=(50,), feature_steps=5,
)  # fmt: skip


def _row(cut, blurred, fd, auc, scale):
    return dict(
        round=0, mode="repel", alpha=0.3, scale=scale, guidance_range=None, replication_cut=cut,
        blurred_rate=blurred, blurred_limit=0.05, frechet_ratio=fd, membership_auc=auc,
    )  # fmt: skip


def test_recommend_prefers_feasible_then_quality_else_closest():
    t = Targets(replication_cut=0.9, frechet_ratio=1.3, membership_auc=0.65)
    rows = [
        _row(0.95, 0.01, 1.25, 0.6, scale=1.0),
        _row(0.99, 0.01, 1.10, 0.6, scale=2.0),  # feasible, best quality
        _row(0.50, 0.01, 1.00, 0.5, scale=3.0),  # best quality but misses the cut
    ]
    best, unmet, unreachable = recommend(rows, t)
    assert best["scale"] == 2.0 and unmet == [] and unreachable == []
    # Nothing meets AUC ≤ 0.65: the closest is chosen and the unmet target named.
    rows = [_row(0.95, 0.01, 1.2, 0.9, scale=1.0), _row(0.95, 0.01, 1.2, 0.7, scale=2.0)]
    best, unmet, unreachable = recommend(rows, t)
    assert best["scale"] == 2.0 and unmet == ["membership_auc"]
    assert unreachable == ["membership_auc"]
    assert pareto_front(rows) == [1]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"replication_cut": 1.5}, "replication_cut must lie in"),
        ({"membership_auc": 0.3}, "membership_auc .* must lie in"),
        ({"frechet_ratio": 0.0}, "frechet_ratio must be"),
        ({"blurred_margin": -0.1}, "blurred_margin"),
    ],
)
def test_targets_out_of_range(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Targets(**kwargs).check()


def test_bad_input(tiny):
    d, model, prot, meta, members, reference = tiny
    s = NoiseSchedule()
    ok = dict(KW, protector_meta=meta)
    with pytest.raises(ValueError, match="budget 10 is too small: 2 candidates"):
        tune_guidance(model, prot, s, members, reference, budget=10, **ok)
    with pytest.raises(ValueError, match="reference images are required"):
        tune_guidance(model, prot, s, members, None, budget=500, **ok)
    with pytest.raises(ValueError, match="targets out of range"):
        tune_guidance(model, prot, s, members, reference, budget=500,
                      targets={"membership_auc": 2.0}, **ok)  # fmt: skip
    with pytest.raises(ValueError, match="fingerprint mismatch.*pixel hash"):
        tune_guidance(model, prot, s, reference[:6], reference, budget=500, **ok)
    with pytest.raises(ValueError, match="disjoint"):
        tune_guidance(model, prot, s, members, reference, budget=500, **dict(ok, seeds=(1,)))


def test_tune_writes_table_settings_and_rescores_on_holdout(tiny, tmp_path):
    d, model, prot, meta, members, reference = tiny
    s = NoiseSchedule()
    res = tune_guidance(model, prot, s, members, reference, budget=40, protector_meta=meta,
                        targets={"replication_cut": 0.0, "frechet_ratio": 100.0,
                                 "membership_auc": 1.0, "blurred_factor": 100.0}, **KW)  # fmt: skip
    # 2 candidates: round 1 both (8 per seed), round 2 the best one; + DDIM each round.
    assert res.search["round_sizes"] == [2, 1]
    assert res.search["samples_drawn"] == 8 * (2 + 1 + 2)
    assert [r["round"] for r in res.rows] == [0, 0, 1]
    assert res.meets_targets and res.unmet == []
    h = res.holdout
    assert h["seeds"] == [1] and h["samples_per_seed"] == 16
    for name in ("ddim", "cpsample", "rejection"):
        assert name in h
    assert h["ddim"]["replication_cut"] == 0.0
    rej = h["rejection"]
    assert rej["n_drawn"] >= rej["n_accepted"] and rej["alpha"] == res.recommended["alpha"]
    paths = res.write(tmp_path)
    table = json.loads(paths["table_json"].read_text())
    assert len(table["rows"]) == 3 and table["recommended"]["scale"] in (5.0, 50.0)
    csv_lines = paths["table_csv"].read_text().splitlines()
    assert csv_lines[0].startswith("round,mode,alpha,scale") and len(csv_lines) == 4
    assert paths["pareto_png"].stat().st_size > 1000
    # Rejection kept nothing here (α = 0.5 keeps only f = 0): its evaluations spent are
    # plotted as a lower bound on the cost, with no cut.
    from cpsample_fast.tune import cost_points

    pts = cost_points(h)
    assert pts["ddim"] == (4.0, 0.0) and pts["cpsample"][0] == 4.0
    assert pts["rejection"] == (float(rej["model_evaluations"]), None) and rej["n_accepted"] == 0
    assert paths["cost_png"].stat().st_size > 1000
    settings = json.loads(paths["settings"].read_text())
    assert settings["sampler"]["scale"] == res.recommended["scale"]
    assert settings["tuned"]["holdout"]["replication_cut"] == h["cpsample"]["replication_cut"]
    assert settings["tuned"]["search"]["replication_cut"] == res.recommended["replication_cut"]
    assert settings["protector"]["fingerprint"]["sha256"] == meta["fingerprint"]["sha256"]
    # The file drives a sampler equal to one built by hand with its options.
    sampler = CPSampler.from_settings(paths["settings"], model, prot, s)
    want = CPSampler(model, prot, s, num_inference_steps=4, scale=res.recommended["scale"],
                     alpha=0.5, mode="repel")  # fmt: skip
    x = sampler.sample((3, 1, 16, 16), seed=7)
    assert torch.equal(x, want.sample((3, 1, 16, 16), seed=7))


def test_settings_refuse_other_model_or_protector(tiny, tmp_path):
    d, model, prot, meta, members, reference = tiny
    s = NoiseSchedule()
    opts = dict(mode="entropy", alpha=0.3, scale=100.0, guidance_range=[0, 500],
                num_inference_steps=4, eta=0.0)  # fmt: skip
    settings = make_settings(opts, model, prot, protector_meta=meta)
    sampler = CPSampler.from_settings(settings, model, prot, s)
    assert (sampler.mode, sampler.alpha, sampler.scale) == ("entropy", 0.3, 100.0)
    assert sampler.guidance_range == (0, 500) and sampler.num_inference_steps == 4
    torch.manual_seed(1)
    other_model = SmallUNet("tiny")
    with pytest.raises(ValueError, match="eps_model differs"):
        CPSampler.from_settings(settings, other_model, prot, s)
    other_prot, _ = load_protector(d / "protector")
    with torch.no_grad():
        next(other_prot.parameters()).add_(1e-3)
    with pytest.raises(ValueError, match="protector differs") as err:
        CPSampler.from_settings(settings, model, other_prot, s)
    assert "eps_model" not in str(err.value)
    bad_meta = {"fingerprint": dict(meta["fingerprint"], sha256="0" * 64)}
    with pytest.raises(ValueError, match="protector training set differs"):
        load_settings(settings, eps_model=model, protector=prot, protector_meta=bad_meta)
    with pytest.raises(ValueError, match="not a cpsample-guidance-settings"):
        load_settings({"sampler": opts})
    assert module_sha256(model) == settings["model"]["sha256"]
    # The command line: sample --settings uses the file, and refuses another protector's.
    (tmp_path / "s.json").write_text(json.dumps(settings))
    args = ["sample", "--model", str(d / "unet.safetensors"), "--protector", str(d / "protector"),
            "--settings", str(tmp_path / "s.json"), "--num-samples", "2",
            "--no-progress"]  # fmt: skip
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    run = json.loads((tmp_path / "a" / "sample.json").read_text())
    assert (run["mode"], run["alpha"], run["scale"], run["steps"]) == ("entropy", 0.3, 100.0, 4)
    assert run["guidance_range"] == [0, 500]
    settings_other = dict(settings, protector=dict(settings["protector"], sha256="f" * 64))
    (tmp_path / "o.json").write_text(json.dumps(settings_other))
    args[args.index(str(tmp_path / "s.json"))] = str(tmp_path / "o.json")
    assert main([*args, "--out", str(tmp_path / "b")]) == 2


def test_tune_cli_bad_input(tiny, tmp_path, capsys):
    d = tiny[0]
    base = ["tune", "--model", str(d / "unet.safetensors"), "--protector", str(d / "protector"),
            "--reference", str(d / "reference.npz"), "--steps", "4",
            "--out", str(tmp_path)]  # fmt: skip
    assert main([*base, "--members", str(d / "other.npz")]) == 2
    assert "fingerprint mismatch" in capsys.readouterr().err
    assert main([*base, "--members", str(d / "members.npz"), "--budget", "5"]) == 2
    assert "too small" in capsys.readouterr().err
    assert main([*base, "--members", str(d / "members.npz"), "--target-cut", "2"]) == 2
    assert "targets out of range" in capsys.readouterr().err


def test_tune_searches_solver_and_step_count(tiny, tmp_path):
    """`samplers` adds (solver, steps) to the grid: rows record them and their cost, and the
    recommendation's solver reaches the settings file and the sampler it drives."""
    d, model, prot, meta, members, reference = tiny
    s = NoiseSchedule()
    kw = dict(KW, scales=(50.0,), rounds=1, samplers=(("ddim", 4), ("dpmsolver++", 3)))
    res = tune_guidance(model, prot, s, members, reference, budget=40, protector_meta=meta,
                        targets={"replication_cut": 0.0, "frechet_ratio": 100.0,
                                 "membership_auc": 1.0, "blurred_factor": 100.0}, **kw)  # fmt: skip
    got = {(r["solver"], r["num_inference_steps"], r["model_evaluations_per_image"])
           for r in res.rows}  # fmt: skip
    assert got == {("ddim", 4, 4), ("dpmsolver++", 3, 3)}
    paths = res.write(tmp_path)
    settings = json.loads(paths["settings"].read_text())
    best = res.recommended
    assert settings["sampler"]["solver"] == best["solver"]
    assert settings["sampler"]["num_inference_steps"] == best["num_inference_steps"]
    sampler = CPSampler.from_settings(paths["settings"], model, prot, s)
    want = CPSampler(model, prot, s, num_inference_steps=best["num_inference_steps"],
                     solver=best["solver"], scale=50.0, alpha=0.5, mode="repel")  # fmt: skip
    assert torch.equal(sampler.sample((2, 1, 16, 16), seed=3), want.sample((2, 1, 16, 16), seed=3))
    # bad samplers are refused before any sampling
    for bad, match in (
        ((("euler", 4),), "solver must be one of"),
        ((("ddim", 0),), "steps must be an int >= 1"),
        (("ddim",), "pairs"),
    ):
        with pytest.raises(ValueError, match=match):
            tune_guidance(model, prot, s, members, reference, budget=40, protector_meta=meta,
                          **dict(kw, samplers=bad))  # fmt: skip
    with pytest.raises(ValueError, match="deterministic"):
        tune_guidance(model, prot, s, members, reference, budget=40, protector_meta=meta,
                      **dict(kw, eta=0.5))  # fmt: skip


def test_halving_plan_and_grid_are_checked_before_sampling():
    """The plan splits the budget over rounds of ceil(len / 3**r) candidates plus a DDIM
    baseline per round and seed; the grid is the product of its axes."""
    from cpsample_fast.tune import MIN_SAMPLES_PER_SEED, HalvingPlan, candidate_grid

    plan = HalvingPlan.for_budget(10, 3, 2, budget=2 * (10 + 4 + 2 + 3) * 9)
    assert plan.sizes == (10, 4, 2) and plan.n0 == 9 and plan.rounds == 3
    need = 2 * (10 + 4 + 2 + 3) * MIN_SAMPLES_PER_SEED
    with pytest.raises(ValueError, match=f"need at least {need} samples"):
        HalvingPlan.for_budget(10, 3, 2, budget=need - 1)
    with pytest.raises(ValueError, match="rounds must be an int >= 1"):
        HalvingPlan.for_budget(10, 0, 2, budget=10_000)
    grid = candidate_grid(("repel", "entropy"), (0.3,), (10, 20), (None, [0, 500]),
                          None, 7, 0.0)  # fmt: skip
    assert len(grid) == 8 and grid[0] == ("repel", 0.3, 10.0, None, "ddim", 7)
    assert ("entropy", 0.3, 20.0, (0, 500), "ddim", 7) in grid
    with pytest.raises(ValueError, match="scales must be a non-empty list"):
        candidate_grid(("repel",), (0.3,), (0,), (None,), None, 7, 0.0)
    with pytest.raises(ValueError, match="mode"):
        candidate_grid(("push",), (0.3,), (1,), (None,), None, 7, 0.0)


def test_image_pair_names_the_mismatch():
    from cpsample_fast.eval.inputs import image_pair

    a, b = image_pair(np.zeros((2, 8, 8)), torch.zeros(3, 1, 8, 8), "generated", "reference")
    assert a.shape == (2, 1, 8, 8) and a.dtype == torch.float32 and b.shape == (3, 1, 8, 8)
    with pytest.raises(ValueError, match=r"members and reference must share the image shape"):
        image_pair(torch.zeros(2, 1, 8, 8), torch.zeros(2, 3, 8, 8), "members", "reference")
    with pytest.raises(TypeError, match="reference must be a tensor or numpy array"):
        image_pair(torch.zeros(2, 1, 8, 8), None, "members", "reference")


def test_cli_options_are_tune_guidance_parameters():
    import argparse
    import inspect

    from cpsample_fast.cli import tune as cli_tune

    params = inspect.signature(tune_guidance).parameters
    assert set(cli_tune.SEARCH_OPTIONS) <= set(params)
    parser = argparse.ArgumentParser()
    cli_tune.add_arguments(parser)
    argv = ["--model", "m", "--protector", "p", "--members", "a", "--reference", "b",
            "--steps", "7", "--ranges", "all", "0-500"]  # fmt: skip
    args = parser.parse_args(argv)
    assert args.num_inference_steps == 7 and args.guidance_ranges == [None, (0, 500)]
    for name in cli_tune.SEARCH_OPTIONS:
        assert hasattr(args, name), name
