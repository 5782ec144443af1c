"""AppTest of the Masked fine-tune page: queue runs from the form (the worker trains them one at a
time), see them in the runs table with curves, a CLI-started run showing up, the comparison panel
against the full run, cancel, and a bad input."""

from __future__ import annotations

import json
import time

import pytest
from streamlit.testing.v1 import AppTest

from analysis.jobs import queue
from analysis.finetune.compare import compare_runs
from analysis.finetune.config import FinetuneConfig
from analysis.finetune.run import run_finetune
from conftest import ROOT
from plotly_data import traces


def _page(demo) -> AppTest:
    at = AppTest.from_file(str(ROOT / "app_pages" / "finetune.py"), default_timeout=300)
    at.session_state["base_ref"] = str(demo / "base")
    at.session_state["tuned_refs"] = [str(demo / "sft"), str(demo / "rl-seed1")]
    return at


def _wait_idle(timeout: float = 180) -> None:
    t = time.time()
    while any(queue.status(d) in queue.ACTIVE for d in queue.list_runs()):
        assert time.time() - t < timeout, [(d.name, queue.status(d)) for d in queue.list_runs()]
        time.sleep(0.5)


def _set(at: AppTest, label: str, value) -> None:
    next(w for w in at.number_input if w.label == label).set_value(value)


def _queue(at: AppTest, source: str, steps: int = 3) -> None:
    at.radio[0].set_value(source).run()
    _set(at, "Steps", steps)
    _set(at, "Batch size", 4)
    _set(at, "Evaluate every", 3)
    at.run()
    next(b for b in at.button if b.label == "Add to queue").click().run()
    assert not at.error, [e.value for e in at.error]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_queue_runs_compare_and_cli_run(demo, tmp_path):
    at = _page(demo)
    at.run()
    assert not at.exception, at.exception
    assert any("No runs yet" in i.value for i in at.info)
    assert at.selectbox[0].value == str(demo / "sft") and at.selectbox[1].value == "demo-rl"
    _queue(at, "random")
    _queue(at, "full")
    _wait_idle()
    # a run started from the CLI (anywhere on disk) shows up too
    cli = tmp_path / "elsewhere" / "cli-run"
    from analysis.__main__ import main

    assert main(["finetune", str(demo / "sft"), "--task", "demo-sft", "--lora", "2", "--steps", "2",
                 "--batch-size", "4", "--reward-samples", "0", "--out", str(cli), "--quiet"]) == 0
    at.run()
    assert not at.exception, at.exception
    table = at.dataframe[0].value
    assert len(table) == 3 and all("finished" in s for s in table["status"])
    assert set(table["run"]) >= {"cli-run"}
    hhmm = r"\d\d:\d\d"  # readable names: mask source · start checkpoint · time; the newest first
    assert table["run"].iloc[1].startswith("full · demo/sft · ") and table["run"].str.match(
        r"random 0.05 · demo/sft · " + hhmm).iloc[2]
    assert list(table.columns[:3]) == ["run", "final accuracy", "start accuracy"]  # the numbers first
    rand = table[table["mask source"].str.startswith("random")].iloc[0]
    assert rand["steps"] == "3/3" and rand["outside mask"] == 0
    assert rand["trainable"] == json.loads((queue.list_runs()[0] / "summary.json").read_text())["trainable"]
    # curves: one trace per overlaid run, the loss of every step
    loss = traces(at.get("plotly_chart")[0].proto.spec)
    assert len(loss) == 3 and sorted(len(t["x"]) for t in loss) == [2, 3, 3]
    # the metric's curve starts at step 0 with the start checkpoint's value (summary.json's "initial")
    metric = traces(at.get("plotly_chart")[1].proto.spec)
    initial = {json.loads((d / "summary.json").read_text())["initial"]["accuracy"] for d in queue.list_runs()}
    assert len(metric) == 3 and all(t["x"][0] == 0 for t in metric) and {t["y"][0] for t in metric} == initial
    # the comparison panel: the full run is the reference; numbers as compare_runs computes them
    panel = at.dataframe[1].value
    source = lambda d: json.loads((d / "summary.json").read_text())["mask_source"]  # noqa: E731
    full = next(d for d in queue.list_runs() if source(d) == "full")
    rand_dir = next(d for d in queue.list_runs() if source(d).startswith("random"))
    expected = compare_runs([full, rand_dir], reference=full)["runs"][1]
    row = panel[panel["mask source"].str.startswith("random")].iloc[0]
    assert row["outside mask"] == 0
    assert row["identical to reference at τ=1e-5"] == pytest.approx(expected["to_reference_identical_fraction"])
    assert row["update cosine"] == pytest.approx(expected["to_reference_cosine"])
    assert "Every masked run changed only elements inside its mask." in at.success[0].value


@pytest.mark.multiprocess
def test_cancel_a_running_run_and_a_queued_one(demo):
    long = FinetuneConfig(checkpoint=str(demo / "sft"), task="demo-sft", random=0.05, steps=100_000, batch_size=4,
                          eval_every=100_000, reward_samples=0)
    first, second = queue.enqueue(long, "first"), queue.enqueue(long, "second")
    queue.ensure_worker()
    t = time.time()
    while not (first / "metrics.jsonl").is_file() or not (first / "metrics.jsonl").read_text():
        assert time.time() - t < 60
        time.sleep(0.2)
    at = _page(demo)
    at.run()
    cancels = [b for b in at.button if b.label == "Cancel"]
    assert len(cancels) == 2  # the running and the queued run
    assert [b.key for b in cancels] == [f"cancel_{second.name}", f"cancel_{first.name}"]  # newest first
    cancels[0].click().run()  # the queued one: never starts
    assert queue.status(second) == "cancelled", [b.key for b in at.button]
    at.button(key=f"cancel_{first.name}").click().run()
    t = time.time()
    while queue.status(first) == "running":
        assert time.time() - t < 10
        time.sleep(0.1)
    stopped = time.time() - t
    s = json.loads((first / "summary.json").read_text())
    assert s["status"] == "cancelled" and stopped < 2.0 + 1.0  # the signal stops it after the current step
    rows = (first / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == s["steps_done"] and s["outside_mask_changed"] == 0
    assert (first / "state" / "meta.json").is_file()  # resumable
    _wait_idle(30)


def test_bad_data_file_is_an_error_and_queues_nothing(demo, tmp_path):
    at = _page(demo)
    at.run()
    at.selectbox[1].set_value("lm").run()
    at.text_input[0].set_value(str(tmp_path / "missing.txt")).run()
    at.radio[0].set_value("full").run()
    next(b for b in at.button if b.label == "Add to queue").click().run()
    assert not at.exception
    assert any("missing.txt" in e.value and "no such data file" in e.value for e in at.error)
    assert queue.list_runs() == []


def test_cli_run_directory_is_listed(demo, tmp_path):
    run = tmp_path / "somewhere" / "r"
    run_finetune(FinetuneConfig(checkpoint=str(demo / "sft"), full=True, steps=1, batch_size=4, reward_samples=0), run)
    assert queue.list_runs() == []  # the API does not register; the CLI does
    queue.register(run)
    assert queue.list_runs() == [run.resolve()] or [p.resolve() for p in queue.list_runs()] == [run.resolve()]


@pytest.mark.multiprocess
def test_filter_and_move_a_finished_run_to_the_trash(demo, tmp_path, monkeypatch):
    """The runs table filters by status / task / start; a finished run goes to the trash folder (not
    deleted), a running one cannot; the overlay starts from the latest four runs."""
    home = tmp_path / "home"
    monkeypatch.setenv("SUBNETSCOPE_HOME", str(home))
    cfg = FinetuneConfig(checkpoint=str(demo / "sft"), task="demo-sft", random=0.05, steps=1, batch_size=4,
                         eval_every=1, reward_samples=0)
    dirs = [queue.enqueue(cfg, title=f"run {i}") for i in range(5)]
    for d in dirs[:4]:
        run_finetune(cfg, d)
    queue.cancel(dirs[4])
    at = _page(demo)
    at.run()
    assert not at.exception, at.exception
    assert at.multiselect(key="ft_pick").value == ["run 4", "run 3", "run 2", "run 1"]  # newest four
    assert at.query_params["runs"] == ["run 4", "run 3", "run 2", "run 1"]  # in the URL
    linked = _page(demo)
    linked.query_params["runs"] = ["run 0", "run 2", "no such run"]
    linked.run()
    assert linked.multiselect(key="ft_pick").value == ["run 0", "run 2"]  # a shared link's overlay
    at.multiselect(key="ft_f_status").set_value(["cancelled"]).run()
    assert list(at.dataframe[0].value["run"]) == ["run 4"]
    at.multiselect(key="ft_f_status").set_value([]).run()
    at.selectbox(key="ft_delete").set_value("run 0").run()
    at.button(key="ft_delete_go").click().run()
    assert not at.exception and not dirs[0].exists()
    trashed = list((home / "trash").iterdir())
    assert len(trashed) == 1 and (trashed[0] / "config.json").is_file()
    assert "run 0" not in list(at.dataframe[0].value["run"])


def test_trash_refuses_active_and_outside_runs(demo, tmp_path, monkeypatch):
    from analysis.errors import SubnetscopeError

    monkeypatch.setenv("SUBNETSCOPE_HOME", str(tmp_path / "home"))
    cfg = FinetuneConfig(checkpoint=str(demo / "sft"), task="demo-sft", random=0.05, steps=1, batch_size=4,
                         reward_samples=0)
    queued = queue.enqueue(cfg, title="waiting")
    with pytest.raises(SubnetscopeError, match="the run is queued; cancel it before deleting it"):
        queue.trash(queued)
    outside = tmp_path / "mine" / "run"
    run_finetune(cfg, outside)
    with pytest.raises(SubnetscopeError, match="not one of the app's runs"):
        queue.trash(outside)
    assert queued.is_dir() and (outside / "config.json").is_file()  # nothing moved
    queue.cancel(queued)


def test_damaged_run_files_are_named_and_the_page_keeps_working(demo):
    """A run whose summary.json is a list, one whose status is a number, one whose config.json is
    random bytes and one with garbage lines in metrics.jsonl: the page named each file with its
    problem (st.error; the good lines of the metrics are kept, st.warning) instead of crashing."""
    import random

    from analysis.jobs import RunDir
    from analysis.paths import runs_dir

    row = {"loss": 3.0, "lr": 1e-3, "grad_norm": 1.0, "trainable": 5, "tokens_per_s": 10.0, "step_s": 0.1}
    config = {"checkpoint": str(demo / "sft"), "task": "demo-sft", "full": True, "steps": 3}
    good = {"status": "finished", "mask_source": "full", "task": "demo-sft", "steps_done": 3, "trainable": 5}
    lines = b"".join(json.dumps({"step": s, **row}).encode() + b"\n" for s in (1, 2))
    runs = {"a-list": ([1], lines, config), "b-status": ({"status": 5}, lines, config),
            "c-config": (good, lines, random.Random(0).randbytes(64)),
            "d-metrics": (good, lines + b"garbage\n" + random.Random(1).randbytes(30).replace(b"\n", b"") + b"\n"
                          + json.dumps({"step": 3, **row}).encode() + b"\n", config)}
    for name, (summary, metrics, cfg) in runs.items():
        run = RunDir(runs_dir() / name)
        run.mark()
        for f, v in (("summary.json", summary), ("metrics.jsonl", metrics), ("config.json", cfg)):
            (run.path / f).write_bytes(v if isinstance(v, bytes) else json.dumps(v).encode())
    at = _page(demo)
    at.run()
    assert not at.exception, at.exception
    errors, warnings = [e.value for e in at.error], [w.value for w in at.warning]
    root = runs_dir()
    assert any(f"{root / 'a-list' / 'summary.json'}: damaged run summary (a list, not a JSON object)" in e
               for e in errors), errors
    assert any(f"{root / 'b-status' / 'summary.json'}: damaged run summary (status must be one of" in e
               for e in errors), errors
    assert any(f"{root / 'c-config' / 'config.json'}: unreadable run configuration (not UTF-8 text)" in e
               for e in errors), errors
    assert warnings == [f"{root / 'd-metrics' / 'metrics.jsonl'}: 2 damaged lines skipped, 3 rows kept "
                        "(first: line 3: not JSON)"]
    table = at.dataframe[0].value
    assert list(table["run"]) == ["d-metrics"] and list(table["steps"]) == ["3/3"]


@pytest.mark.multiprocess
def test_a_masked_run_without_its_control_gets_one_click_to_queue_it(demo):
    """A selector run beside a full run has no verdict yet: the panel says why and queues the random
    control at the same budget; once that has trained, the verdict is shown in words."""
    from analysis.paths import runs_dir

    common = dict(checkpoint=str(demo / "sft"), task="demo-sft", steps=2, batch_size=8, lr=1e-3, eval_every=1)
    run_finetune(FinetuneConfig(selector="magnitude", density=0.03, **common), runs_dir() / "sel")
    run_finetune(FinetuneConfig(full=True, **common), runs_dir() / "full")
    at = _page(demo)
    at.run()
    assert not at.exception, at.exception
    assert any("No verdict yet" in i.value for i in at.info)
    next(b for b in at.button if b.label == "Queue its random control").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    _wait_idle()
    at.run()
    assert not at.exception, at.exception
    shown = [m.value for m in [*at.success, *at.warning, *at.info] if "at the same budget" in m.value]
    assert shown and any(w in shown[0] for w in ("beat", "did worse than", "no detectable difference"))
