"""First view of every page: seconds from opening the page's URL until its script has run to the
end (``stApp[data-test-script-state=notRunning]``) with content drawn — in headless Chromium against
a real Streamlit server on the demo family.

Each page is opened twice: on a cold server (a new server process, nothing cached, nothing computed
before) and again in a new browser tab on the now warm server. Usage::

    python -m bench.first_view [--root DIR] [--pages checkpoints,importance] [--json OUT]

A page that asks before it reads weights shows its button within the first view; what it computes
inline (below the inline limit) is part of the time.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
PAGES = ["checkpoints", "update_sparsity", "overlap", "trajectory", "geometry", "importance", "attribution",
         "finetune"]
DONE = ("() => { const a = document.querySelector('[data-testid=stApp]');"
        " return a && a.getAttribute('data-test-script-state') === 'notRunning'"
        " && document.querySelector('[data-testid=stMain] h2, [data-testid=stMain] h1') !== null; }")


LLAMA3_8B = dict(hidden=4096, inter=14336, layers=32, heads=32, kv=8, vocab=128256)


def make_8b_pair(d: Path) -> tuple[Path, Path]:
    """Two checkpoints with Llama-3-8B's config and tensor shapes (bf16, 4 shards and an index, 16 GB
    each) whose data are holes of a sparse file: the headers are real, the disk holds almost nothing.
    A first view reads headers only, so it sees an 8B-sized pair exactly as a real one; the diff job
    would read zeros. Built once in ``d``; the safetensors header is written as the format specifies
    (8-byte little-endian length, JSON, data), since no library writes a header without the data."""
    import struct

    c = LLAMA3_8B
    shapes = {"model.embed_tokens.weight": (c["vocab"], c["hidden"]), "lm_head.weight": (c["vocab"], c["hidden"]),
              "model.norm.weight": (c["hidden"],)}
    kv = c["hidden"] // c["heads"] * c["kv"]
    h, i = c["hidden"], c["inter"]
    for L in range(c["layers"]):
        p = f"model.layers.{L}."
        shapes |= {p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
                   p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
                   p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                   p + "mlp.down_proj.weight": (h, i), p + "input_layernorm.weight": (h,),
                   p + "post_attention_layernorm.weight": (h,)}
    names = list(shapes)
    shards = [names[i::4] for i in range(4)]
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": c["hidden"],
              "intermediate_size": c["inter"], "num_hidden_layers": c["layers"], "num_attention_heads": c["heads"],
              "num_key_value_heads": c["kv"], "vocab_size": c["vocab"], "max_position_embeddings": 8192,
              "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
    out = []
    for which in ("base", "tuned"):
        m = d / which
        out.append(m)
        if (m / "model.safetensors.index.json").is_file():
            continue
        m.mkdir(parents=True, exist_ok=True)
        weight_map = {}
        for k, group in enumerate(shards):
            fname = f"model-{k + 1:05d}-of-00004.safetensors"
            header, off = {}, 0
            for n in group:
                size = 2 * math.prod(shapes[n])
                header[n] = {"dtype": "BF16", "shape": list(shapes[n]), "data_offsets": [off, off + size]}
                off += size
                weight_map[n] = fname
            raw = json.dumps(header).encode()
            raw += b" " * (-len(raw) % 8)
            with open(m / fname, "wb") as f:
                f.write(struct.pack("<Q", len(raw)) + raw)
                f.truncate(8 + len(raw) + off)  # the data: a hole
        (m / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        (m / "config.json").write_text(json.dumps(config))
    return out[0], out[1]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server(root: Path, env: dict) -> tuple[subprocess.Popen, str]:
    port = _port()
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", "app.py", "--server.address", "127.0.0.1",
                             "--server.port", str(port), "--server.headless", "true",
                             "--browser.gatherUsageStats", "false"], cwd=root, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(180):
        try:
            if urllib.request.urlopen(url + "/_stcore/health", timeout=2).status == 200:
                return proc, url
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("streamlit did not start")


def _visit(browser, url: str, timeout_s: float = 180) -> float:
    """Seconds until the page's first script run has ended with its header drawn."""
    page = browser.new_page(viewport={"width": 1400, "height": 2200})
    t = time.perf_counter()
    page.goto(url, wait_until="domcontentloaded")
    page.wait_for_timeout(300)  # the first script run starts after the websocket connects
    page.wait_for_function(DONE, timeout=timeout_s * 1000, polling=100)
    s = time.perf_counter() - t
    page.close()
    return s


def measure(root: Path, pages: list[str], env: dict, query: str = "") -> dict[str, tuple[float, float]]:
    from playwright.sync_api import sync_playwright

    out = {}
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            for name in pages:  # a new server per page: its first view is cold
                proc, url = _server(root, env)
                try:
                    path = ("" if name == "checkpoints" else "/" + name) + query
                    cold = _visit(browser, url + path)
                    warm = _visit(browser, url + path)
                    out[name] = (cold, warm)
                    print(f"{name:<16} cold {cold:6.1f} s   warm {warm:6.1f} s", flush=True)
                finally:
                    proc.terminate()
                    proc.wait(timeout=20)
        finally:
            browser.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=str(ROOT), help="the checkout whose app.py to serve (e.g. an older commit's)")
    ap.add_argument("--home", help="SUBNETSCOPE_HOME for the server (default: a fresh temporary one beside the demo)")
    ap.add_argument("--pages", default=",".join(PAGES))
    ap.add_argument("--json", help="write the table as JSON")
    ap.add_argument("--8b", dest="big", metavar="DIR",
                    help="open the pages on an 8B-sized pair (Llama-3-8B shapes, sparse files) built in DIR")
    a = ap.parse_args()
    from analysis.paths import default_demo_dir

    import tempfile

    home = Path(a.home) if a.home else Path(tempfile.mkdtemp(prefix="first-view-"))
    if not a.home:  # the demo family, but no jobs, runs or caches of earlier sessions
        (home / "demo").symlink_to(default_demo_dir())
    env = dict(os.environ, SUBNETSCOPE_HOME=str(home), HF_HUB_OFFLINE="1", PYTHONPATH=a.root)
    query = ""
    if a.big:
        from urllib.parse import urlencode

        base, tuned = make_8b_pair(Path(a.big))
        query = "?" + urlencode({"base": str(base), "tuned": str(tuned)})
    res = measure(Path(a.root), a.pages.split(","), env, query)
    print("\n| page | first view, cold server (s) | again, warm server (s) |\n|---|---:|---:|")
    for name, (cold, warm) in res.items():
        print(f"| {name} | {cold:.1f} | {warm:.1f} |")
    if a.json:
        Path(a.json).write_text(json.dumps({k: {"cold_s": c, "warm_s": w} for k, (c, w) in res.items()}, indent=1))


if __name__ == "__main__":
    main()
