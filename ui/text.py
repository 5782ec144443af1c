"""User-given strings shown as text, never as Markdown.

Streamlit renders the body of ``st.error`` / ``st.warning`` / ``st.info`` / ``st.success`` /
``st.caption`` / ``st.markdown``, and widget labels, as GitHub-flavoured Markdown with LaTeX
between ``$`` and its own ``:color[…]`` directives, and has no escaper of its own. A URL
parameter, a directory name or an exception message quoting a path goes through :func:`md_escape`
(or :func:`md_code`, inside a code span) before it is put into such a string, so that
``**x**[y](javascript:alert(1))`` shows those characters and is neither bold nor a link.

CommonMark lets a backslash escape any ASCII punctuation character
(https://spec.commonmark.org/0.31.2/#backslash-escapes); what is escaped here is what can start
or close an inline construct, an autolink, an HTML tag or entity, or LaTeX, and what a line can
start with (a heading, a list, a quote). GitHub's autolink literals (``https://…``, ``www.…``,
``a@b.c``, https://github.github.com/gfm/#autolinks-extension-) are found by remark in the text
*after* escapes are resolved, so no escape stops them: a string holding one is shown as a code
span instead, where no link is made. Control characters are shown as their escapes
(``\\n``), so one message stays one line. :func:`md_html` is the same for a body rendered with
``unsafe_allow_html=True``.
"""

from __future__ import annotations

import html
import re

# characters that open or close inline Markdown, HTML, entities, LaTeX, tables or GFM extensions
# (Streamlit's ``:color[…]`` directives need the bracket); "_" is handled by _UNDERSCORES
_INLINE = re.compile(r"([\\`*\[\]<>&$~|])")
# a run of "_" between two letters or digits can neither open nor close emphasis (CommonMark's
# flanking rules: https://spec.commonmark.org/0.31.2/#emphasis-and-strong-emphasis), so
# model_type or test_x0 stay as they are; any other is escaped
_UNDERSCORES = re.compile(r"_+")


def _underscores(m: re.Match) -> str:
    t, i, j = m.string, m.start(), m.end()
    inside = 0 < i and j < len(t) and t[i - 1].isalnum() and t[j].isalnum()
    return m.group() if inside else "\\_" * (j - i)
# what a line may start with to become a heading, list item, quote, rule or ordered list
_LINE_START = re.compile(r"^( *)([#+\-=>]|\d+(?=[.)]))")
# what remark-gfm links in text whatever its escapes (mdast-util-gfm-autolink-literal's patterns)
_AUTOLINK = re.compile(r"(?i)(https?://|www(?=\.))[-.\w]+|[-.\w+]+@[-\w]+(\.[-\w]+)+")
# control and format characters that break a line or reorder what is shown (bidi overrides)
_CONTROLS = {c: repr(chr(c))[1:-1] if c < 0x100 else f"\\u{c:04x}"
             for c in [*range(0x00, 0x20), 0x7F, *range(0x80, 0xA0), 0x2028, 0x2029,
                       *range(0x202A, 0x202F), *range(0x2066, 0x206A)]}


def visible(s) -> str:
    """``s`` as one line of text: control characters, line and paragraph separators and bidi
    controls shown as their escapes (``\\n``, ``\\x00``, ``\\u202e``)."""
    return str(s).translate(_CONTROLS)


def md_escape(s) -> str:
    """``s`` escaped for any Streamlit Markdown body: shown character for character.

    Args:
        s: any value (``str()`` of it is shown), e.g. a path, a URL parameter, an exception.
    Returns:
        str: Markdown source that renders as the text of ``s`` on one line.
    """
    t = visible(s)
    if _AUTOLINK.search(t):
        return md_code(t)
    t = _INLINE.sub(r"\\\1", t)
    t = _UNDERSCORES.sub(_underscores, t)
    m = _LINE_START.match(t)
    if m:
        lead, mark = m.groups()
        t = lead + (mark + "\\" if mark[0].isdigit() else "\\" + mark) + t[m.end():]
    stripped = t.lstrip(" ")
    return "&#32;" * (len(t) - len(stripped)) + stripped  # leading spaces: neither dropped nor a code block


def md_code(s) -> str:
    """``s`` as an inline code span: shown verbatim in a monospace font, whatever it holds
    (backticks included: the fence is longer than any run of backticks in ``s``)."""
    t = visible(s)
    if not t:
        return ""
    fence = "`" * (max((len(r) for r in re.findall(r"`+", t)), default=0) + 1)
    pad = " " if t[0] == "`" or t[-1] == "`" or (t[0] == " " and t[-1] == " ") else ""
    return f"{fence}{pad}{t}{pad}{fence}"


def md_html(s) -> str:
    """``s`` as text inside HTML in a Markdown body rendered with ``unsafe_allow_html=True`` (e.g.
    a prompt token in a ``<span>``): HTML-escaped, Markdown-escaped, and every autolink literal
    cut by an empty ``<span></span>`` (invisible; remark finds links within one text node only)."""
    t = html.escape(visible(s), quote=False)
    t = re.sub(r"([\\`*_\[\]~$|])", r"\\\1", t)
    t = re.sub(r"(?i)(https?:|www)(?=\S)", r"\1<span></span>", t)
    return t.replace("@", "<span></span>@")


def fmt_tau(t: float) -> str:
    """A tolerance as a reader writes it: ``0``, ``1e-7``, ``1.26e-4``, ``0.01`` (three significant
    digits, no zero-padded exponent) — one style on every page."""
    if t == 0:
        return "0"
    if t >= 1e-2:
        return f"{t:.3g}"
    mant, exp = f"{t:.2e}".split("e")
    mant = mant.rstrip("0").rstrip(".")
    return f"{mant}e{int(exp)}"
