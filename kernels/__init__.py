"""Fused kernels. Convention (shared/STYLE.md): ``kernels/<name>.py`` holds the Triton kernel
behind an import check, a ``<name>_reference()`` in plain torch, and a public function that
chooses at call time (CUDA + Triton -> kernel, else the reference). Tests compare the two."""
