"""A page whose background job cannot be written (read-only home) shows one st.error naming the path,
never a traceback page."""

from __future__ import annotations

import os

from safetensors.torch import save_file
from streamlit.testing.v1 import AppTest

from conftest import ROOT, tiny_llama, mount_tmpfs_at
from ui.text import md_escape


def test_a_job_that_cannot_be_written_is_an_st_error(tmp_path, monkeypatch):
    model = tiny_llama()
    refs = []
    for name, seed in (("base", 0), ("tuned", 1)):
        p = tmp_path / name
        p.mkdir()
        save_file({k: v.contiguous() for k, v in tiny_llama(seed=seed).state_dict().items()}, p / "model.safetensors")
        model.config.to_json_file(p / "config.json")
        refs.append(str(p))
    home = tmp_path / "home"
    home.mkdir()
    mount_tmpfs_at(home, "ro,size=64k")
    try:
        monkeypatch.setenv("SUBNETSCOPE_HOME", str(home))
        monkeypatch.setenv("SUBNETSCOPE_INLINE_LIMIT", "0")
        at = AppTest.from_file(str(ROOT / "app_pages" / "update_sparsity.py"), default_timeout=120)
        at.session_state["base_ref"], at.session_state["tuned_refs"] = refs[0], [refs[1]]
        at.run()
        (button,) = [b for b in at.button if b.label == "Run diff in the background"]
        button.click().run()
        assert not at.exception
        errors = [e.value for e in at.error]
        # the text of the error (its Markdown source escapes the path: shown character for character)
        assert len(errors) == 1 and md_escape(str(home / "jobs")) in errors[0] and "Read-only file system" in errors[0]
        assert "\n" not in errors[0]
    finally:
        os.system(f"umount {home}")
