"""``cpsample bench --quick``: runs, prints the table, writes CSV rows with the schema and sane
numbers. Speed is never asserted (the machine is shared); only that the numbers are measurements.
"""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch

from cpsample_fast.bench import CSV_COLUMNS, Environment, Row, Timing, append_csv, measure, read_csv
from cpsample_fast.bench.timing import percentile
from cpsample_fast.cli.__main__ import main as cli_main


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One quick run of both suites (sampler + update), shared by the tests below."""
    out = tmp_path_factory.mktemp("bench")
    import io
    from contextlib import redirect_stdout

    buf = io.StringIO()
    with redirect_stdout(buf):
        rc = cli_main(["bench", "--quick", "--out", str(out)])
    return rc, buf.getvalue(), out


def test_quick_prints_one_table_with_every_quick_provider(quick_run):
    rc, text, _ = quick_run
    print(text)
    assert rc == 0, text
    lines = text.splitlines()
    assert lines[0].startswith("cpsample bench: tiny UNet")
    for provider in ("reference", "reference+bf16", "fused", "ddim"):
        assert any(line.split()[:1] == [provider] for line in lines), provider
    assert "FAILED" not in text
    assert "update op (GB/s, x copy)" in text


def test_quick_csv_rows_have_the_schema_and_sane_numbers(quick_run):
    rc, _, out = quick_run
    rows = read_csv(out / "bench.csv")
    assert rows, "no CSV rows"
    assert tuple(rows[0].keys()) == CSV_COLUMNS
    for row in rows:
        for key in ("median", "p20", "p80"):
            value = float(row[key])
            assert math.isfinite(value), row
            zero_ok = ("max_abs_err_vs_fp64", "rms_err_vs_fp64", "max_abs_diff_vs_reference")
            if row["metric"] not in zero_ok:
                assert value > 0, row
            else:
                assert value >= 0, row
        assert float(row["p20"]) <= float(row["median"]) * (1 + 1e-9) + 1e-12, row
        assert float(row["median"]) <= float(row["p80"]) * (1 + 1e-9) + 1e-12, row
        assert row["device"] and row["versions"].startswith("torch=") and row["timestamp"]
        json.loads(row["extra"])
    metrics = {(r["provider"], r["metric"]) for r in rows if r["op"] == "sample/tiny"}
    for provider in ("reference", "fused", "reference+bf16", "ddim"):
        for metric in ("images_per_s", "ms_per_step", "eps_model_ms", "update_ms"):
            assert (provider, metric) in metrics, (provider, metric)
    assert ("fused", "protector_ms") in metrics
    assert ("ddim", "protector_ms") not in metrics  # unguided: the protector never runs
    assert ("reference", "speedup_vs_reference") in metrics
    if sys.platform.startswith("linux"):  # peak RSS from /proc on a Linux CPU
        assert ("fused", "peak_memory") in metrics
    ref_ratio = [
        float(r["median"])
        for r in rows
        if r["provider"] == "reference" and r["metric"] == "speedup_vs_reference"
    ]
    assert ref_ratio == [1.0]
    bw = [r for r in rows if r["op"] == "guided_update" and r["metric"] == "bandwidth"]
    assert {r["provider"] for r in bw} >= {"copy", "torch"}


def test_quick_accuracy_columns_against_float64(quick_run):
    """float32 paths agree with the float64 reference far better than bf16 ones do."""
    _, _, out = quick_run
    rows = read_csv(out / "bench.csv")
    err = {r["provider"]: float(r["median"]) for r in rows if r["metric"] == "max_abs_err_vs_fp64"}
    print("max |x - x_fp64|:", err)
    assert err["reference"] < 1e-4 and err["fused"] < 1e-4
    assert err["reference+bf16"] > err["reference"]


def test_quick_fused_providers_are_checked_against_the_reference(quick_run):
    """Timing rows come with a check: the fused sampler reproduces the eager reference, and every
    update backend the torch specification."""
    _, _, out = quick_run
    rows = read_csv(out / "bench.csv")
    diffs = {r["provider"]: (float(r["median"]), json.loads(r["extra"]))
             for r in rows if r["metric"] == "max_abs_diff_vs_reference"}  # fmt: skip
    print("max |provider - reference|:", {k: v[0] for k, v in diffs.items()})
    assert set(diffs) == {"fused"}  # the quick run's only fused provider
    value, extra = diffs["fused"]
    assert extra["ok"] is True and value <= extra["tolerance"] < 1e-2
    update = [json.loads(r["extra"]) for r in rows
              if r["op"] == "guided_update" and r["provider"] != "copy"]  # fmt: skip
    assert update and all(e["matches"] and e["max_abs_diff_vs_torch"] < 1e-5 for e in update)


def test_a_wrong_fast_path_is_reported_not_only_timed(monkeypatch):
    """A fused provider that drifts from the reference, or an update backend that drifts from the
    torch spec, is recorded as an error (and the CLI then exits 1)."""
    from cpsample_fast.bench import sampler_suite, update_suite
    from cpsample_fast.bench.configs import get_config

    settings = sampler_suite.SamplerBenchSettings(
        config=get_config("tiny"), device=torch.device("cpu"), batch=2, steps=2,
        providers=["reference", "fused"], repeats=1, warmup=0, accuracy=False,
    )  # fmt: skip
    real = sampler_suite.SamplingContext.make_runner

    def shifted(self, spec):
        run, backend = real(self, spec)
        return (lambda: run() + 0.05) if spec.fused else run, backend

    monkeypatch.setattr(sampler_suite.SamplingContext, "make_runner", shifted)
    result = sampler_suite.run_sampler_bench(settings)
    print(result.errors.get("fused"))
    assert "MISMATCH" in result.errors["fused"]
    assert [r.name for r in result.results] == ["reference", "fused"]  # still timed

    real_providers = update_suite.update_providers

    def broken(x, o, g, coefs, rng, backends, compiled):
        calls = real_providers(x, o, g, coefs, rng, backends, compiled)
        calls["torch"] = lambda fn=calls["torch"]: fn() * 1.001
        return calls

    monkeypatch.setattr(update_suite, "update_providers", broken)
    usettings = update_suite.UpdateBenchSettings(
        device=torch.device("cpu"), sizes=(3072,), backends=["torch"], repeats=1, warmup=0,
        compile=False,
    )  # fmt: skip
    _, _, errors = update_suite.run_update_bench(usettings)
    assert "MISMATCH" in errors["torch@3072"]


def test_quick_json_report(quick_run):
    _, _, out = quick_run
    (path,) = out.glob("bench_tiny_cpu_*.json")
    report = json.loads(path.read_text())
    assert report["sampler"]["finite"] is True
    assert report["sampler"]["errors"] == {}
    assert len(report["rows"]) == len(read_csv(out / "bench.csv"))
    assert "reference" in report["table"]


def test_csv_append_keeps_one_header_and_refuses_other_schemas(tmp_path):
    env_cols = {"device": "cpu", "versions": "torch=x", "commit": "abc", "timestamp": "now"}
    row = Row("op", "p", "m", "metric", "u", "x", 3, 2.0, 1.0, 3.0, {"a": 1})
    record = row.to_record(Environment(**env_cols))
    path = tmp_path / "b.csv"
    append_csv(path, [record])
    append_csv(path, [record, record])
    lines = path.read_text().splitlines()
    assert lines[0] == ",".join(CSV_COLUMNS)
    assert len(lines) == 4
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="columns"):
        append_csv(tmp_path / "other.csv", [record])
    with pytest.raises(ValueError, match="not finite"):
        Row("op", "p", "m", "metric", "u", "x", 3, float("nan"), 1.0, 3.0)


def test_measure_counts_repeats_and_percentiles():
    calls = []
    timing, last = measure(lambda: calls.append(1) or len(calls), repeats=5, warmup=2, inner=3)
    assert len(calls) == 2 + 5 * 3 and last == 17
    assert isinstance(timing, Timing) and len(timing.samples) == 5
    assert 0 <= timing.p20 <= timing.median <= timing.p80
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 0.2) == pytest.approx(1.8)
    with pytest.raises(ValueError, match="repeats"):
        measure(lambda: None, repeats=0)


def test_bad_options_are_refused(tmp_path, capsys):
    # bad input: one line naming the option on stderr, exit status 2 (cli/__main__.py), from
    # the library's ValueError or from argparse (which exits)
    def refused(argv, match):
        try:
            code = cli_main(argv)
        except SystemExit as exc:
            code = exc.code
        assert code == 2
        err = capsys.readouterr().err.strip()
        assert match in err and len(err.splitlines()) == 1, err

    refused(["bench", "--quick", "--providers", "nope", "--out", str(tmp_path)], "--providers")
    if not torch.cuda.is_available():
        refused(["bench", "--quick", "--providers", "fused+cudagraph"], "CUDA")
    refused(["bench", "--quick", "--batch", "0"], "--batch")
    refused(["bench", "--quick", "--warmup", "-1"], "--warmup")
    refused(["bench", "--quick", "--alpha", "0.7"], "--alpha")
    refused(["bench", "--quick", "--suite", "update", "--sizes", "0"], "sizes")
    refused(["bench", "--quick", "--suite", "matched", "--config", "tiny"], "config")
    refused(["bench", "--device", "mps"], "device")


def test_device_check_script_parses_and_its_report_reads_the_quick_run(quick_run, tmp_path):
    """device_check.sh needs a GPU; here: its syntax, and the summary it prints last."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    script = root / "benchmarks" / "device_check.sh"
    if shutil.which("bash") is None:
        pytest.skip("no bash")
    subprocess.run(["bash", "-n", str(script)], check=True)
    _, _, out = quick_run
    shutil.copy(out / "bench.csv", tmp_path / "bench.csv")
    (tmp_path / "stages.tsv").write_text(
        "stage\tstatus\trc\tseconds\tlimit_s\tnote\n"
        "build\tok\t0\t3\t170\tx\n"
        "bench-sampler\ttimeout\t124\t200\t200\ty\n"
    )
    proc = subprocess.run(
        [
            sys.executable,
            str(root / "benchmarks" / "device_check_report.py"),
            "summary",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    print(proc.stdout)
    assert "sample/tiny" in proc.stdout and "reference" in proc.stdout
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["ok"] is False  # one stage timed out
    assert [s["status"] for s in status["stages"]] == ["ok", "timeout"]
    assert (tmp_path / "summary.txt").read_text().strip() == proc.stdout.strip()


def test_matched_table_times_the_shipped_settings_and_shows_their_evidence():
    """At the recorded step counts each sampler runs with its own shipped settings file, and the
    quality columns are that file's pooled evidence (scripts/dpm_quality_match.py)."""
    from cpsample_fast.bench.matched import DPM_SETTINGS, run_matched_bench
    from cpsample_fast.models.digits import ASSET_DIR

    dpm = json.loads((ASSET_DIR / DPM_SETTINGS).read_text())
    res = run_matched_bench(torch.device("cpu"), batch=2, repeats=1, warmup=0)
    assert res.table.startswith("quality matched:")
    assert res.summary["quality_matched"] is True
    assert res.summary["dpm_steps"] == dpm["sampler"]["num_inference_steps"] < 50
    assert res.summary["guidance"]["dpmsolver++"]["scale"] == dpm["sampler"]["scale"]
    row = next(ln.split() for ln in res.table.splitlines() if ln.startswith("dpmsolver++"))
    fd = dpm["tuned"]["search"]["protected"]["frechet"]
    assert float(row[7]) == pytest.approx(fd, abs=0.006)
    held = dpm["tuned"]["holdout"]  # the recorded match held on seeds the search never saw
    assert held["matched"] and held["fd_ratio"] <= 1.05 and held["cut_blurred_diff_pp"] >= -2


def test_matched_suite_prints_the_quality_matched_table(tmp_path, capsys):
    """`--suite matched`: protected DDIM and DPM-Solver++ on the demo model, one table, CSV rows."""
    out = tmp_path / "matched"
    argv = ["bench", "--quick", "--suite", "matched", "--repeats", "1", "--warmup", "0",
            "--matched-steps", "2", "--out", str(out)]  # fmt: skip
    assert cli_main(argv) == 0
    text = capsys.readouterr().out
    assert "NOT the quality-matched step counts" in text  # 4 and 2 steps were not measured
    lines = [ln.split() for ln in text.splitlines()]
    names = {ln[0]: ln for ln in lines if ln and ln[0] in ("ddim", "dpmsolver++")}
    assert names["ddim"][1] == "4" and names["dpmsolver++"][1] == "2"
    assert float(names["ddim"][6]) == 1.0 and float(names["dpmsolver++"][4]) > 0
    assert names["ddim"][7:] == ["-", "-", "-"]  # no recorded quality for unmeasured counts
    rows = [r for r in read_csv(out / "bench.csv") if r["op"] == "sample_matched"]
    assert sorted(r["provider"] for r in rows) == ["ddim-4", "dpmsolver++-2"]
    (report,) = [json.loads(p.read_text()) for p in out.glob("bench_matched_*.json")]
    assert report["matched"]["speedup_dpm_over_ddim"] > 0
    with pytest.raises(SystemExit) as exc:  # argparse: one line, exit status 2
        cli_main(["bench", "--quick", "--suite", "matched", "--matched-steps", "0"])
    assert exc.value.code == 2
    assert "--matched-steps" in capsys.readouterr().err


@pytest.mark.parametrize("dry", [False, True], ids=["gpu", "dry-run"])
def test_device_check_plan_fits_its_budget(dry, tmp_path):
    """The stage limits plus the summary's reserve fit the budget (480 s, one 10-minute call
    with time to spare), the compiled sampler providers come last, and a budget they do not fit
    stops the script before anything runs."""
    import os
    import shutil
    import subprocess
    from pathlib import Path

    if shutil.which("bash") is None:
        pytest.skip("no bash")
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "device_check.sh"
    args = ["bash", str(script), "--plan", *(["--dry-run"] if dry else []), str(tmp_path / "o")]
    proc = subprocess.run(args, capture_output=True, text=True, check=True)
    print(proc.stdout)
    lines = proc.stdout.strip().splitlines()
    stages = [line.split() for line in lines[1:-2]]
    limits = [int(cols[1]) for cols in stages]
    assert stages[-1][0] == "bench-sampler-compiled"
    assert "fits" in lines[-1] and int(lines[-2].split()[-1]) <= 480
    assert sum(limits) + int(lines[-2].split()[-2]) <= 480
    env = {**os.environ, "CPSAMPLE_CHECK_BUDGET_S": "300"}
    bad = subprocess.run(args, capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "exceed the budget" in bad.stderr


def test_plan_bench_applies_the_defaults_and_refuses_bad_options():
    """The library call behind `cpsample bench`: each suite's settings, or a ValueError naming
    the option."""
    from cpsample_fast.bench import DEFAULT_PROVIDERS, QUICK_PROVIDERS
    from cpsample_fast.bench.plan import plan_bench
    from cpsample_fast.bench.update_suite import DEFAULT_SIZES, QUICK_SIZES

    cpu = torch.device("cpu")
    quick = plan_bench(cpu, quick=True)
    assert quick.name == "tiny_cpu" and quick.matched is None
    assert quick.sampler.config.name == "tiny" and quick.sampler.providers == list(QUICK_PROVIDERS)
    assert (quick.sampler.batch, quick.sampler.steps, quick.sampler.repeats) == (3, 3, 2)
    assert quick.update.sizes == QUICK_SIZES and quick.update.compile is False
    assert quick.update.repeats == 3
    full = plan_bench(cpu, batch=5, providers=["fused,reference"])
    assert full.sampler.config.name == "cifar" and full.sampler.batch == 5
    assert full.sampler.providers == ["reference", "fused"]  # the baseline first
    assert full.update.sizes == DEFAULT_SIZES["cpu"] and full.update.compile is True
    assert plan_bench(cpu).sampler.providers == [
        n for n in DEFAULT_PROVIDERS if n != "fused+cudagraph"
    ]
    assert plan_bench(cpu, suite="update", sizes=[1e4]).sampler is None
    matched = plan_bench(cpu, suite="matched", quick=True, matched_steps=2)
    assert matched.sampler is None and matched.update is None and matched.name == "matched_cpu"
    assert matched.matched["batch"] == 8 and matched.matched["ddim_steps"] == 4
    assert matched.matched["dpm_steps"] == 2
    for kwargs, match in (
        ({"suite": "bogus"}, "suite"),
        ({"batch": 0}, "batch"),
        ({"repeats": True}, "repeats"),
        ({"warmup": -1}, "warmup"),
        ({"suite": "matched", "config": "tiny"}, "config"),
        ({"suite": "matched", "matched_steps": 0}, "matched_steps"),
        ({"sizes": [0]}, "sizes"),
        ({"providers": ["nope"]}, "providers"),
        ({"config": "nope"}, "config"),
    ):
        with pytest.raises(ValueError, match=match):
            plan_bench(cpu, quick=True, **kwargs)


def test_run_log_writes_each_row_as_it_arrives(tmp_path):
    from cpsample_fast.bench.records import RunLog

    env = Environment(device="cpu", versions="torch=x", commit="abc", timestamp="now")
    row = Row("op", "p", "m", "metric", "u", "x", 3, 2.0, 1.0, 3.0, {"a": 1})
    log = RunLog(env, tmp_path, "tiny_cpu", {"argv": {"quick": True}})
    assert log.json_path.name.startswith("bench_tiny_cpu_") and log.json_path.suffix == ".json"
    log.add([row])
    partial = json.loads(log.json_path.read_text())
    assert partial["complete"] is False and len(partial["rows"]) == 1
    assert partial["environment"]["commit"] == "abc" and partial["argv"] == {"quick": True}
    log.add([row, row])
    assert len(read_csv(tmp_path / "bench.csv")) == 3
    report = log.finish({"table": "t"})
    assert json.loads(log.json_path.read_text()) == report
    assert report["complete"] is True and len(report["rows"]) == 3 and report["table"] == "t"
    quiet = RunLog(env, None, "tiny_cpu", {})  # no folder: collected only
    quiet.add([row])
    assert len(quiet.records) == 1 and quiet.finish({})["complete"] is True


def _tiny_context(**kwargs):
    from cpsample_fast.bench import SamplerBenchSettings, SamplingContext, get_config

    settings = SamplerBenchSettings(
        config=get_config("tiny"), device=torch.device("cpu"), batch=2, steps=2,
        providers=[], repeats=1, warmup=0, **kwargs,
    )  # fmt: skip
    return SamplingContext(settings)


def test_unguided_fused_provider_is_checked_against_the_unguided_float64_baseline():
    """ddim+compile+bf16's check path (eager here): plain DDIM in float64 is its baseline, and
    a shifted output is caught."""
    from cpsample_fast import reference_sample
    from cpsample_fast.bench import ProviderSpec
    from cpsample_fast.bench.configs import convert_model

    ctx = _tiny_context(accuracy_batch=1)
    x64, gate = ctx.accuracy.fp64(guided=False)
    assert gate is None and x64.dtype == torch.float64 and x64.shape == (1, 1, 16, 16)
    with torch.no_grad():
        expect = reference_sample(
            convert_model(ctx.eps32, torch.float64), None, ctx.schedule, (1, 1, 16, 16),
            noise=ctx.x_T[:1], dtype=torch.float64, **ctx.common_kwargs(False),
        )  # fmt: skip
    torch.testing.assert_close(x64, expect, rtol=0, atol=0)
    assert 0.0 <= ctx.accuracy.fp64(guided=True)[1] <= 1.0
    spec = ProviderSpec("ddim-fused", fused=True, guided=False)
    run, _ = ctx.make_runner(spec)
    out = run()
    diff, tol = ctx.accuracy.check(spec, out)
    assert diff <= tol < 1e-2
    bad, tol = ctx.accuracy.check(spec, out + 0.05)
    assert bad > tol


def test_split_times_the_same_protector_vjp_as_either_loop_computes_it():
    """The split's protector piece: torch.func.vjp (CPSampler) and autograd.grad on the tape
    (the reference) compute the same VJP, and every piece is timed."""
    from cpsample_fast.bench import PROVIDERS
    from cpsample_fast.bench.pieces import _protector_fwd_bwd, time_pieces
    from cpsample_fast.model_caller import ModelCaller

    ctx = _tiny_context()
    x = ctx.x_T.float().contiguous()
    t = torch.full((x.shape[0],), 500, dtype=torch.long)
    prot = ModelCaller(ctx.prot32)
    fused, tape = (_protector_fwd_bwd(prot, x, t, fused)() for fused in (True, False))
    assert fused.abs().max() > 0
    torch.testing.assert_close(fused, tape, rtol=1e-5, atol=1e-6)
    pieces = time_pieces(ctx, PROVIDERS["fused"], "torch")
    assert set(pieces) == {"eps_model", "protector", "update"}
    assert all(p.median > 0 for p in pieces.values())
    assert set(time_pieces(ctx, PROVIDERS["ddim"], "torch")) == {"eps_model", "update"}
