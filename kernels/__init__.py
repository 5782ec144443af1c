"""Fused kernels. Convention (as in Liger-Kernel and fla: a reference beside each kernel):
``kernels/<name>.py`` holds the Triton kernel
behind an import check, a ``<name>_reference()`` in plain torch, and a public function that
chooses at call time (CUDA + Triton -> kernel, else the reference). Tests compare the two."""
