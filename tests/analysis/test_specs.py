"""Every analysis is one spec: the CLI path (``main([...])``) and the job path (the params as JSON in
a job directory, run by ``run-job``'s code) give the same JSON, the CLI is generated from the params'
fields, and no page or ui/ module writes a command-line flag."""

from __future__ import annotations

import ast
import json

import pytest

from analysis.cli import main
from analysis.errors import SubnetscopeError
from analysis.jobs import JobDir, run_in_process
from analysis.specs import MODULES, get_spec
from analysis.specs.align import AlignParams
from analysis.specs.attribute import AttributeParams
from analysis.specs.behaviour import BehaviourParams
from analysis.specs.patch import PatchParams
from analysis.specs.inspect import InspectParams
from analysis.specs.results import DiffResult, check
from analysis.specs.base import ParamsError, cache_key, params_from_json, params_to_json
from analysis.specs.diff import DiffParams
from analysis.specs.evaluate_selectors import EvaluateParams
from analysis.specs.geometry import GeometryParams
from analysis.specs.importance import ImportanceParams
from analysis.specs.overlap import OverlapParams
from analysis.specs.trajectory import TrajectoryParams
from conftest import ROOT

VARYING = {"seconds"}  # wall time: the one field two runs of the same request may differ in


def _same(x):
    if isinstance(x, dict):
        return {k: _same(v) for k, v in x.items() if k not in VARYING}
    if isinstance(x, list):
        return [_same(v) for v in x]
    return x


def _cases(demo):
    d = {n: str(demo / n) for n in ("base", "sft", "rl-seed1", "rl-seed2")}
    steps = [str(demo / "rl-seed1-steps" / s) for s in ("step-10", "step-20")]
    return [
        ("inspect", InspectParams(d["sft"]), ["inspect", d["sft"]]),
        ("align", AlignParams((d["base"], d["sft"])), ["align", d["base"], d["sft"]]),
        ("diff", DiffParams(d["base"], d["sft"], tol=1e-6), ["diff", d["base"], d["sft"], "--tol", "1e-6"]),
        ("overlap", OverlapParams(d["sft"], (d["rl-seed1"], d["rl-seed2"])),
         ["overlap", d["sft"], d["rl-seed1"], d["rl-seed2"]]),
        ("trajectory", TrajectoryParams(d["sft"], tuple(steps)), ["trajectory", d["sft"], *steps]),
        ("geometry", GeometryParams(d["sft"], d["rl-seed1"], k="4"), ["geometry", d["sft"], d["rl-seed1"], "--k", "4"]),
        ("importance", ImportanceParams(d["sft"], selector="wanda", granularity="head", samples=4, density=0.1),
         ["importance", d["sft"], "--selector", "wanda", "--granularity", "head", "--samples", "4",
          "--density", "0.1"]),
        ("evaluate-selectors", EvaluateParams(d["sft"], selectors="magnitude,random", density=0.05,
                                              against_diff=(d["sft"], d["rl-seed1"])),
         ["evaluate-selectors", d["sft"], "--selectors", "magnitude,random", "--density", "0.05",
          "--against-diff", d["sft"], d["rl-seed1"]]),
        ("attribute", AttributeParams(d["sft"], prompt="Q:12+07\nA:", target="19", method="lrp-cp",
                                      compare=d["rl-seed1"]),
         ["attribute", d["sft"], "--prompt", "Q:12+07\nA:", "--target", "19", "--method", "lrp-cp",
          "--compare", d["rl-seed1"]]),
        ("behaviour", BehaviourParams(d["sft"], d["rl-seed1"], prompt=("Q:12+07\nA:", "Q:3-4\nA:"), top=3),
         ["behaviour", d["sft"], d["rl-seed1"], "--prompt", "Q:12+07\nA:", "--prompt", "Q:3-4\nA:", "--top", "3"]),
        ("patch", PatchParams(d["sft"], d["rl-seed1"], subset="kinds:mlp", eval=("demo",)),
         ["patch", d["sft"], d["rl-seed1"], "--subset", "kinds:mlp", "--eval", "demo"]),
    ]


def test_every_spec_has_a_contract_case(demo):
    assert sorted(name for name, _, _ in _cases(demo)) == sorted(MODULES)


def test_cli_and_job_give_the_same_json(demo, tmp_path, monkeypatch):
    """For every spec: the CLI's argv parses to exactly the params the page builds, and the job run
    from those params as JSON writes the JSON the CLI writes."""
    from analysis.cli import build_parser
    from analysis.specs.base import params_from_args

    monkeypatch.setenv("SUBNETSCOPE_HOME", str(tmp_path / "home"))
    for name, params, argv in _cases(demo):
        spec = get_spec(name)
        assert params_from_args(spec, build_parser().parse_args([*argv, "--json", "-"])) == params, name
        out = tmp_path / f"{name}.json"
        assert main([*argv, "--quiet", "--json", str(out)]) == 0, name
        job = JobDir.of(spec, params)
        st = job.start(spec, params, launcher=run_in_process)
        assert st.status == "done", (name, st.error)
        assert json.loads((job.path / "params.json").read_text())["params"] == params_to_json(params)
        assert _same(st.result()) == _same(json.loads(out.read_text())), name
        check(spec.result, st.result())  # its typed form: every field, of its type, no other


def test_a_job_reads_its_params_and_says_what_is_wrong(demo, tmp_path, monkeypatch):
    monkeypatch.setenv("SUBNETSCOPE_HOME", str(tmp_path / "home"))
    spec = get_spec("diff")
    p = DiffParams(str(demo / "base"), str(demo / "sft"))
    assert params_from_json(spec, params_to_json(p)) == p
    with pytest.raises(ParamsError, match="unknown params frobnicate"):
        params_from_json(spec, {**params_to_json(p), "frobnicate": 1})
    with pytest.raises(ParamsError, match="params must be a JSON object"):
        params_from_json(spec, [1])
    # the params' own checks hold for a job as for the CLI: one line, the job failed, no result
    with pytest.raises(SubnetscopeError, match="at least two fine-tunes"):
        OverlapParams(str(demo / "base"), (str(demo / "sft"),))
    bad = tmp_path / "home" / "jobs" / "bad"
    bad.mkdir(parents=True)
    (bad / "params.json").write_text(json.dumps({"format": "subnetscope.params/1", "spec": "overlap",
                                                 "params": {"base": str(demo / "base"),
                                                            "tuned": [str(demo / "sft")]}}))
    (bad / "job.json").write_text("{}")
    (bad / "progress.json").write_text('{"status": "running"}')
    run_in_process(bad, bad / "log.txt")
    assert JobDir(bad).state().status == "failed"
    assert JobDir(bad).state().error == "overlap needs at least two fine-tunes of the base"


def test_the_cache_key_follows_params_and_files(demo, tmp_path):
    import shutil

    spec = get_spec("diff")
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(demo / "base", a)
    shutil.copytree(demo / "sft", b)
    k = cache_key(spec, DiffParams(str(a), str(b)))
    assert k == cache_key(spec, DiffParams(str(a), str(b)))
    assert k != cache_key(spec, DiffParams(str(a), str(b), tol=1e-6))
    (b / "config.json").write_text((b / "config.json").read_text() + " ")
    assert k != cache_key(spec, DiffParams(str(a), str(b)))


def test_no_page_writes_a_command_line_flag():
    """Pages and ui/ hand params to the specs; a string that starts with ``--`` would be an argv."""
    found = []
    for p in sorted([*(ROOT / "app_pages").glob("*.py"), *(ROOT / "ui").glob("*.py"), ROOT / "app.py"]):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("--"):
                found.append(f"{p.name}:{node.lineno}: {node.value}")
    assert found == []


def test_the_typed_result_refuses_a_wrong_field(demo):
    import pydantic

    from analysis.sparsity.diff import diff_checkpoints

    d = diff_checkpoints(demo / "base", demo / "sft").to_json()
    check(DiffResult, d)
    with pytest.raises(pydantic.ValidationError, match="changed_params"):
        check(DiffResult, {**d, "changed_params": "many"})
    with pytest.raises(pydantic.ValidationError, match="extra"):
        check(DiffResult, {**d, "extra": 1})
    with pytest.raises(pydantic.ValidationError, match="schema"):
        check(DiffResult, {k: v for k, v in d.items() if k != "schema"})
