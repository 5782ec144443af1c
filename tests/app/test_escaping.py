"""User-given strings are shown as text, never rendered as Markdown: a URL
parameter, a directory name or an exception quoting a path shows its characters in the app's boxes
— no bold, no link, no LaTeX —; a hub id from a link is read from the local cache only (no DNS
lookup, no token file) and downloaded only after a click; the recent list holds only checkpoints
that opened and that the user chose.

Streamlit renders these bodies in the browser (remark with GFM). The checks here read the
Markdown source AppTest gives (``.value``) the way that renderer does: CommonMark (markdown-it),
then GFM's autolink literals, which remark finds in the text after escapes are resolved."""

from __future__ import annotations

import json
import re
import socket

import pytest
from markdown_it import MarkdownIt
from streamlit.testing.v1 import AppTest

from conftest import ROOT, tiny_llama
from ui.text import md_code, md_escape, md_html, visible

_MD = MarkdownIt("commonmark").enable(["table", "strikethrough"])
# mdast-util-gfm-autolink-literal's patterns, as Streamlit's bundle holds them
_GFM_URL = re.compile(r"(https?://|www(?=\.))([-.\w]+)([^ \t\r\n]*)", re.I)
_GFM_EMAIL = re.compile(r"([-.\w+]+)@([-\w]+(?:\.[-\w]+)+)")
_LIVE = re.compile(r"(?<!\\)(?:\\\\)*[$]")  # an unescaped $ (LaTeX) outside code


def shown(source: str) -> str:
    """The text a Markdown body shows, asserting it is plain: one paragraph of text and code
    spans — no emphasis, link, image, HTML, heading, list, quote, table or strikethrough; no
    autolink literal in the text; no unescaped ``$`` outside code."""
    tokens = _MD.parse(source)
    assert [t.type for t in tokens] in ([], ["paragraph_open", "inline", "paragraph_close"]), \
        f"block Markdown in {source!r}: {[t.type for t in tokens]}"
    out = []
    for tok in tokens[1].children if tokens else []:
        assert tok.type in ("text", "code_inline"), f"{tok.type} rendered from {source!r}"
        if tok.type == "text":
            assert not _GFM_URL.search(tok.content) and not _GFM_EMAIL.search(tok.content), \
                f"a live autolink in {source!r}"
        out.append(tok.content)
    outside_code = re.sub(r"(`+).*?\1", "", source)
    assert not _LIVE.search(outside_code), f"LaTeX would render from {source!r}"
    return "".join(out)


NASTY = [
    "**bold**[link](https://example.com)",
    "**x**[y](javascript:alert(1))",
    "<b>hi</b> <img src=x onerror=alert(1)> &amp; &#42;",
    "$x^2$ and $$y$$ ~~gone~~ ~one~ :red[red] :blue-background[b]",
    "# heading",
    "1. item",
    "12) item",
    "- item",
    "+ item",
    "> quote",
    "    four spaces",
    "a_b_c __d__ *e* _f_",
    "snake__case__x intra_word_ok and _lead and trail_ x_*y*_z",
    "back`tick` and ``two``",
    "`",
    "www.example.com",
    "mail me@example.com",
    "a | b | c",
    "C:\\dir\\*x*",
    "line\nbreak\r\n# next",
    "bidi \u202egnp.exe",
    "/tmp/pytest-of-root/test_x0/ck: no such file or directory",
]


@pytest.mark.parametrize("s", NASTY)
def test_md_escape_and_md_code_show_the_characters(s):
    for md in (md_escape(s), md_code(s), f"error: {md_escape(s)} (said twice: {md_escape(s)})"):
        text = shown(md)
        assert visible(s) in text or text.strip() == visible(s).strip(), (md, text)
    assert "\n" not in md_escape(s) and "\n" not in md_code(s)


def test_md_escape_leaves_plain_text_alone():
    assert md_escape("k: not a count 8 and 0.05 or 1%") == "k: not a count 8 and 0.05 or 1%"
    assert md_escape("tol=abc") == "tol=abc" and md_escape("/x/demo/rl-seed1") == "/x/demo/rl-seed1"
    assert md_escape("/tmp/test_bad_path0/model_type") == "/tmp/test_bad_path0/model_type"  # intraword _ is inert


def test_md_html_inside_a_span():
    """Text inside raw HTML (the attribution page's tokens) is still Markdown: escaped here too,
    and an autolink cut by an empty element (html_inline, no text)."""
    for s in NASTY:
        tokens = _MD.parse(f"<span>{md_html(s.replace(chr(10), ' '))}</span>")[1].children
        for tok in tokens:
            assert tok.type in ("text", "html_inline", "softbreak"), (s, tok.type)
            if tok.type == "html_inline":
                assert tok.content in ("<span>", "</span>", "<span></span>"), (s, tok.content)
            else:
                assert not _GFM_URL.search(tok.content) and not _GFM_EMAIL.search(tok.content), s


# ---------------------------------------------------------------- the pages


def _values(elements) -> list[str]:
    return [e.value for e in elements]


def test_a_markdown_k_from_the_link_is_shown_as_text(demo):
    """``geometry?k=**bold**[link](https://example.com)``: the error box shows those characters."""
    from analysis.errors import SubnetscopeError
    from analysis.sparsity.geometry import parse_k

    k = "**bold**[link](https://example.com)"
    with pytest.raises(SubnetscopeError) as e:
        parse_k(k)
    at = AppTest.from_file(str(ROOT / "app_pages" / "geometry.py"), default_timeout=120)
    at.session_state["base_ref"], at.session_state["tuned_refs"] = str(demo / "sft"), [str(demo / "rl-seed1")]
    at.query_params["k"] = k
    at.run()
    assert not at.exception, at.exception
    (error,) = _values(at.error)
    assert shown(error) == f"k: {e.value}" and k in shown(error)


def test_a_directory_named_with_markdown_is_shown_as_text(tmp_path):
    """A directory named ``**x**[y](javascript:alert(1))`` given in the link: its error names it,
    character for character, in a box without bold or a link; it is not remembered."""
    d = tmp_path / "**x**[y](javascript:alert(1))"
    d.mkdir()
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
    at.query_params["base"] = str(d)
    at.run()
    assert not at.exception, at.exception
    (error,) = _values(at.error)
    assert shown(error) == f"{d}: empty directory, not a checkpoint"
    assert not (tmp_path / "recent.json").exists()  # a path that failed to open is never recorded


def test_a_dropped_path_and_a_bad_parameter_from_the_link_are_shown_as_text(tmp_path, monkeypatch):
    monkeypatch.setenv("SUBNETSCOPE_HOME", str(tmp_path / "home"))  # no demo family: nothing else to load
    gone = tmp_path / "**gone**[here](https://example.com)"
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
    at.query_params["tuned"] = [str(gone)]
    at.run()
    assert not at.exception, at.exception
    assert [shown(w) for w in _values(at.sidebar.warning)] == [f"{gone}: no such path; dropped from the link"]
    page = AppTest.from_file(str(ROOT / "app_pages" / "geometry.py"), default_timeout=120)
    page.session_state["base_ref"], page.session_state["tuned_refs"] = str(tmp_path / "a"), [str(tmp_path / "b")]
    page.query_params.update(tol="`$x$` **1e-5**", k="$k$")  # the bad k stops the page before any work
    page.run()
    assert not page.exception, page.exception
    assert [shown(w) for w in _values(page.warning)] == [
        "tol=`$x$` **1e-5** from the link does not apply here; using the default"]
    assert "$k$" in shown(page.error[0].value)


def _hub_cache(root, repo_id: str):
    """A local HF cache holding ``repo_id`` laid out as huggingface_hub writes it."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    entry = root / f"models--{repo_id.replace('/', '--')}"
    tiny_llama().save_pretrained(entry / "snapshots" / commit)
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text(commit)
    return entry / "snapshots" / commit


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    """HF_HUB_OFFLINE unset (as a user's server runs), an empty hub cache, and every way to the
    network or the token recorded: DNS lookups, connections, huggingface_hub's token, and any
    snapshot_download that may go online."""
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.utils import _auth

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    calls = []
    real_snapshot = huggingface_hub.snapshot_download

    def snapshot(repo_id, *a, local_files_only=False, **kw):
        if not local_files_only:
            calls.append(("snapshot_download", repo_id))
            raise OSError("the network is not reachable in this test")
        return real_snapshot(repo_id, *a, local_files_only=True, **kw)

    def refuse(name):
        def f(*a, **kw):
            calls.append((name, a[:1]))
            raise OSError(f"{name} is not allowed in this test")
        return f

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot)
    monkeypatch.setattr(socket, "getaddrinfo", refuse("getaddrinfo"))
    monkeypatch.setattr(socket, "create_connection", refuse("create_connection"))
    monkeypatch.setattr(_auth, "get_token", refuse("get_token"))
    monkeypatch.setattr(huggingface_hub, "get_token", refuse("get_token"))
    return calls


def test_a_hub_id_from_the_link_is_read_from_the_cache_only(demo, no_network, tmp_path, monkeypatch):
    """``?tuned=a/b``: the server never resolves it online from a link; the sidebar says it is not
    in the local cache and offers a download, which only a click starts."""
    import analysis.checkpoints

    downloads = []

    def download(repo_id, revision=None):
        downloads.append(repo_id)
        return _hub_cache(tmp_path / "hub", repo_id)

    monkeypatch.setattr(analysis.checkpoints, "download_hub_id", download, raising=False)
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
    at.query_params["base"] = str(demo / "base")
    at.query_params["tuned"] = "a/b"
    at.run()
    assert not at.exception, at.exception
    assert no_network == [] and downloads == []
    assert [shown(w) for w in _values(at.sidebar.warning)] == [
        "a/b: hub id not in the local cache; a link or the picker never downloads"]
    assert at.session_state["tuned_refs"] == []  # left out of the pages until it is downloaded
    for _ in range(2):  # reruns do not download either
        at.run()
    assert no_network == [] and downloads == []
    (button,) = [b for b in at.sidebar.button if b.label.startswith("Download")]
    assert shown(button.label) == "Download a/b"
    button.click().run()
    assert not at.exception, at.exception
    assert downloads == ["a/b"] and no_network == []
    assert at.session_state["tuned_refs"] == ["a/b"] and not at.sidebar.warning
    totals = [m.value for m in at.metric if m.label == "Total parameters"]
    assert totals == [f"{analysis.checkpoints.open_checkpoint(demo / 'base').total_params:,}", "68,160"]


def test_a_relative_path_that_is_no_directory_is_not_looked_up_online(demo, no_network):
    """A run recorded with a relative checkpoint (``ck/sft``) read by the server elsewhere: it
    looks like a hub id, and is still never resolved online from the page."""
    at = AppTest.from_file(str(ROOT / "app_pages" / "checkpoints.py"), default_timeout=120)
    at.session_state["base_ref"], at.session_state["tuned_refs"] = "ck/sft", []
    at.run()
    assert not at.exception, at.exception
    (error,) = _values(at.error)
    assert shown(error).startswith("ck/sft: hub id not in the local cache")
    assert no_network == []


def test_recent_list_only_holds_what_the_user_chose_and_opened(demo, tmp_path, monkeypatch):
    import ui.state

    monkeypatch.setenv("SUBNETSCOPE_HOME", str(tmp_path / "home"))
    mine = tmp_path / "mine"
    tiny_llama().save_pretrained(mine)
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
    at.query_params["base"] = str(mine)  # a link alone: opened and shown, not recorded
    at.run()
    assert not at.exception, at.exception
    assert [m.value for m in at.metric if m.label == "Total parameters"] == ["68,160"]
    assert not (tmp_path / "recent.json").exists()
    ui.state.remember("/tmp/evil\n/path")  # a string with a control character: never recorded
    assert not (tmp_path / "recent.json").exists()
    (tmp_path / "recent.json").write_text(json.dumps(["/tmp\n", "acme/x\u202e", "acme/tiny"]))
    assert ui.state.recent_refs() == ["acme/tiny"]
