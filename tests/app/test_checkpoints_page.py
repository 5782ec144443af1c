"""AppTest of the Checkpoints page on tiny checkpoints, including a bad path."""

from __future__ import annotations

from streamlit.testing.v1 import AppTest

from conftest import ROOT, tiny_llama
from plotly_data import traces


def _page(base, tuned):
    at = AppTest.from_file(str(ROOT / "app_pages" / "checkpoints.py"), default_timeout=120)
    at.session_state["base_ref"] = base
    at.session_state["tuned_refs"] = tuned
    return at.run()


def test_checkpoints_page_counts_charts_and_alignment(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    tiny_llama(seed=0).save_pretrained(a)
    tiny_llama(seed=1, vocab=53).save_pretrained(b)
    at = _page(str(a), [str(b)])
    assert not at.exception
    assert not at.error
    totals = [m.value for m in at.metric if m.label == "Total parameters"]
    assert totals == ["68,160", f"{68_160 + 2 * 3 * 64:,}"]
    charts = at.get("plotly_chart")
    by_kind = traces(charts[0].proto.spec)
    assert [sum(tr["y"]) for tr in by_kind] == [68_160, 68_544]
    q = by_kind[0]["x"].index("q")
    assert by_kind[0]["y"][q] == 2 * 64 * 64
    text = " ".join(m.value for m in at.markdown)
    assert "21 tensors aligned" in text and "2 resized" in text


def test_bad_path_shows_error_and_rest_still_works(tmp_path):
    a = tmp_path / "a"
    tiny_llama().save_pretrained(a)
    bad = tmp_path / "no-such-model"
    noise = tmp_path / "noise.safetensors"
    noise.write_bytes(b"\x07" * 100)
    at = _page(str(a), [str(bad), str(noise)])
    assert not at.exception
    errors = [e.value for e in at.error]
    assert any(str(bad) in e and "no such file or directory" in e for e in errors)
    assert any(str(noise) in e and "not a valid safetensors file" in e for e in errors)
    assert [m.value for m in at.metric if m.label == "Total parameters"] == ["68,160"]
