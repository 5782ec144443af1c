"""Architecture map: tensor name -> (layer index, module kind), per model family.

HF models are never modified; this module only reads names and config fields. Every
per-family alias lives in the one ``FAMILIES`` dict below, so adding a family is adding
one entry.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

# Prefixes that wrappers put in front of the same tensor (task heads, PEFT, DDP, GPT-2's
# LMHead, BERT's task heads). Stripped, longest first, to align checkpoints of one family.
KNOWN_PREFIXES = (
    "base_model.model.",
    "module.",
    "_orig_mod.",
    "model.",
    "transformer.",
    "bert.",
    "roberta.",
)

# Module kinds, in the order charts show them.
KINDS = (
    "embed", "pos_embed", "type_embed", "embed_norm",
    "q", "k", "v", "qkv", "o", "qk_norm",
    "gate", "up", "down",
    "attn_norm", "mlp_norm", "final_norm",
    "lm_head", "pooler", "buffer", "other",
)

# kind -> coarse group (used for scopes: the weight matrices inside the blocks, etc.)
KIND_GROUP = {
    "embed": "embedding", "pos_embed": "embedding", "type_embed": "embedding",
    "embed_norm": "norm",
    "q": "attention", "k": "attention", "v": "attention", "qkv": "attention", "o": "attention",
    "qk_norm": "norm",
    "gate": "mlp", "up": "mlp", "down": "mlp",
    "attn_norm": "norm", "mlp_norm": "norm", "final_norm": "norm",
    "lm_head": "head", "pooler": "head", "buffer": "buffer", "other": "other",
}

# family -> ordered (regex on the prefix-stripped name, kind). First match wins.
FAMILIES: dict[str, tuple[tuple[str, str], ...]] = {
    # Llama, Mistral, Qwen2/Qwen3, SmolLM2 ... (HF "LlamaForCausalLM" naming)
    "llama": (
        (r"^embed_tokens\.", "embed"),
        (r"^layers\.\d+\.self_attn\.q_proj\.", "q"),
        (r"^layers\.\d+\.self_attn\.k_proj\.", "k"),
        (r"^layers\.\d+\.self_attn\.v_proj\.", "v"),
        (r"^layers\.\d+\.self_attn\.o_proj\.", "o"),
        (r"^layers\.\d+\.self_attn\.[qk]_norm\.", "qk_norm"),
        (r"^layers\.\d+\.self_attn\.rotary_emb\.", "buffer"),
        (r"^layers\.\d+\.mlp\.gate_proj\.", "gate"),
        (r"^layers\.\d+\.mlp\.up_proj\.", "up"),
        (r"^layers\.\d+\.mlp\.down_proj\.", "down"),
        (r"^layers\.\d+\.input_layernorm\.", "attn_norm"),
        (r"^layers\.\d+\.post_attention_layernorm\.", "mlp_norm"),
        (r"^norm\.", "final_norm"),
        (r"^lm_head\.", "lm_head"),
        (r"^rotary_emb\.", "buffer"),
    ),
    "gpt2": (
        (r"^wte\.", "embed"),
        (r"^wpe\.", "pos_embed"),
        (r"^h\.\d+\.ln_1\.", "attn_norm"),
        (r"^h\.\d+\.attn\.c_attn\.", "qkv"),
        (r"^h\.\d+\.attn\.c_proj\.", "o"),
        (r"^h\.\d+\.attn\.(bias|masked_bias)$", "buffer"),
        (r"^h\.\d+\.ln_2\.", "mlp_norm"),
        (r"^h\.\d+\.mlp\.c_fc\.", "up"),
        (r"^h\.\d+\.mlp\.c_proj\.", "down"),
        (r"^ln_f\.", "final_norm"),
        (r"^lm_head\.", "lm_head"),
    ),
    "bert": (
        (r"^embeddings\.word_embeddings\.", "embed"),
        (r"^embeddings\.position_embeddings\.", "pos_embed"),
        (r"^embeddings\.token_type_embeddings\.", "type_embed"),
        (r"^embeddings\.LayerNorm\.", "embed_norm"),
        (r"^embeddings\.position_ids$", "buffer"),
        (r"^encoder\.layer\.\d+\.attention\.self\.query\.", "q"),
        (r"^encoder\.layer\.\d+\.attention\.self\.key\.", "k"),
        (r"^encoder\.layer\.\d+\.attention\.self\.value\.", "v"),
        (r"^encoder\.layer\.\d+\.attention\.output\.dense\.", "o"),
        (r"^encoder\.layer\.\d+\.attention\.output\.LayerNorm\.", "attn_norm"),
        (r"^encoder\.layer\.\d+\.intermediate\.dense\.", "up"),
        (r"^encoder\.layer\.\d+\.output\.dense\.", "down"),
        (r"^encoder\.layer\.\d+\.output\.LayerNorm\.", "mlp_norm"),
        (r"^pooler\.", "pooler"),
        (r"^cls\.", "lm_head"),
    ),
}
_COMPILED = {fam: tuple((re.compile(p), k) for p, k in rules) for fam, rules in FAMILIES.items()}

# config.json model_type -> family of tensor names
MODEL_TYPE_FAMILY = {
    "llama": "llama", "mistral": "llama", "qwen2": "llama", "qwen3": "llama",
    "gemma": "llama", "gemma2": "llama", "phi3": "llama", "olmo": "llama", "olmo2": "llama",
    "gpt2": "gpt2",
    "bert": "bert", "roberta": "bert",
}

# a transformer block in a tensor or module name: ``layers.3`` (Llama), ``h.3`` (GPT-2),
# ``layer.3`` (BERT), ``blocks.3``; followed by a dot or the end of the name
_BLOCK_RE = re.compile(r"(?:^|\.)(?:layers|h|layer|blocks)\.(\d+)(?=\.|$)")

# the kinds that PEFT's LoRA adapts: the attention and MLP projections of the blocks
LORA_KINDS = ("q", "k", "v", "qkv", "o", "gate", "up", "down")


@dataclass(frozen=True)
class TensorRole:
    """Where a tensor sits in the architecture."""

    layer: int | None  # transformer block index, None outside the blocks
    kind: str  # one of KINDS
    group: str  # KIND_GROUP[kind]
    param: str  # "weight", "bias", or the last name component


def normalize_name(name: str) -> str:
    """Strips the known wrapper prefixes (``model.``, ``transformer.``, ``bert.`` ...).

    Args:
        name (str): a tensor name as stored.
    Returns:
        str: the name that aligns across wrappers of one family, e.g.
        ``model.layers.0.mlp.up_proj.weight`` -> ``layers.0.mlp.up_proj.weight``.
    """
    changed = True
    while changed:
        changed = False
        for p in KNOWN_PREFIXES:
            if name.startswith(p) and len(name) > len(p):
                name = name[len(p):]
                changed = True
                break
    return name


def layer_index(name: str) -> int | None:
    """The transformer block a tensor or module belongs to.

    Args:
        name (str): a tensor or module name, stored or normalized
            (``model.layers.3.mlp.up_proj.weight``, ``transformer.h.3``, ``encoder.layer.3.output``).
    Returns:
        int or None: the block index, None outside the blocks (embeddings, final norm, head).
    """
    m = _BLOCK_RE.search(name)
    return int(m.group(1)) if m else None


def block_index(module_name: str) -> int | None:
    """The index of a transformer block when ``module_name`` names the block itself.

    Args:
        module_name (str): a ``named_modules()`` name.
    Returns:
        int or None: 3 for ``model.layers.3``, ``transformer.h.3`` or ``encoder.layer.3``; None for
        anything else (``model.layers.3.mlp`` is inside a block, not a block).
    """
    m = _BLOCK_RE.search(module_name)
    return int(m.group(1)) if m and m.end() == len(module_name) else None


def lora_targets(model) -> list[str]:
    """The modules a LoRA control adapts: every attention and MLP projection of the blocks
    (kinds ``LORA_KINDS``), chosen by module kind from the family's names, so that Llama's
    ``q_proj`` ... ``down_proj``, GPT-2's ``c_attn`` / ``c_proj`` / ``c_fc`` (``Conv1D``) and BERT's
    ``query`` ... ``output.dense`` are all found.

    Args:
        model (nn.Module): a Hugging Face model (its config's ``model_type`` names the family;
            without one the family is detected from the parameter names).
    Returns:
        list[str]: full module names in model order (PEFT's ``target_modules`` accepts them);
        empty when no module has a known projection name.
    """
    cfg = getattr(model, "config", None)
    names = [n for n, _ in model.named_parameters()]
    family = detect_family(names, getattr(cfg, "model_type", None))
    out = []
    for mname, m in model.named_modules():
        weight = getattr(m, "weight", None)
        if mname and hasattr(weight, "dim") and weight.dim() == 2:
            role = tensor_role(mname + ".weight", family)
            if role.layer is not None and role.kind in LORA_KINDS:
                out.append(mname)
    return out


def detect_family(names, model_type: str | None = None) -> str | None:
    """The naming family of a checkpoint: from config's model_type, else by majority of names."""
    if model_type and model_type in MODEL_TYPE_FAMILY:
        return MODEL_TYPE_FAMILY[model_type]
    counts = {fam: 0 for fam in _COMPILED}
    for n in names:
        key = normalize_name(n)
        for fam, rules in _COMPILED.items():
            if any(r.match(key) for r, _ in rules):
                counts[fam] += 1
    best = max(counts, key=counts.get)
    return best if counts[best] else None


def tensor_role(name: str, family: str | None) -> TensorRole:
    """Maps one tensor name to (layer, kind).

    Args:
        name (str): the stored or normalized tensor name.
        family (str or None): a key of ``FAMILIES``; None tries every family.
    Returns:
        TensorRole: layer index (None outside blocks), module kind, group and param name.
    """
    key = normalize_name(name)
    layer = layer_index(key)
    kind = "other"
    families = [family] if family in _COMPILED else list(_COMPILED)
    for fam in families:
        for rule, k in _COMPILED[fam]:
            if rule.match(key):
                kind = k
                break
        if kind != "other":
            break
    return TensorRole(layer=layer, kind=kind, group=KIND_GROUP[kind], param=key.rsplit(".", 1)[-1])


@dataclass(frozen=True)
class Architecture:
    """Architecture fields read from config.json (None where the checkpoint has no config)."""

    model_type: str | None
    family: str | None
    num_layers: int | None
    hidden_size: int | None
    num_heads: int | None  # query heads
    num_kv_heads: int | None  # GQA: each kv head serves num_heads // num_kv_heads query heads
    head_dim: int | None
    intermediate_size: int | None  # MLP channels
    vocab_size: int | None
    tie_word_embeddings: bool | None
    config_dtype: str | None  # torch_dtype / dtype declared in config.json

    def to_dict(self) -> dict:
        return asdict(self)

    def signature(self) -> tuple:
        """Fields that must agree for two checkpoints to be compared (vocab may differ)."""
        return (self.family, self.num_layers, self.hidden_size, self.num_heads,
                self.num_kv_heads, self.head_dim, self.intermediate_size)


def architecture_from_config(cfg, names=()) -> Architecture:
    """Reads the architecture fields from a transformers ``PretrainedConfig`` (or None).

    transformers' config classes supply the family defaults (GPT-2's n_inner = 4·n_embd,
    Llama's kv heads = heads, tied embeddings ...) and the attribute aliases (n_layer ->
    num_hidden_layers), so they are used rather than re-implemented here.

    Raises:
        ValueError: a size field of a known family (``MODEL_TYPE_FAMILY``) that is not a
            positive integer (for unknown families such a field reads as None).
    """
    if cfg is None:
        return Architecture(None, detect_family(names), *([None] * 9))
    model_type = getattr(cfg, "model_type", None) or None
    known = model_type in MODEL_TYPE_FAMILY

    def size(*keys, minimum: int = 1):
        """The first field set among keys: an integer ≥ minimum. Anything else is a ValueError
        for a family whose layout is known, and unknown (None) otherwise."""
        key = next((k for k in keys if getattr(cfg, k, None) is not None), None)
        if key is None:
            return None
        v = getattr(cfg, key)
        if type(v) is int and v >= minimum:
            return v
        if known:
            raise ValueError(f"{key} is {v!r}, expected an integer ≥ {minimum}")
        return None

    hidden = size("hidden_size", "n_embd", "d_model")
    heads = size("num_attention_heads", "n_head")
    kv = size("num_key_value_heads") or heads
    head_dim = size("head_dim")
    if head_dim is None and hidden and heads and hidden >= heads:
        head_dim = hidden // heads  # transformers' default
    inter = size("intermediate_size", "n_inner", "ffn_dim")
    if inter is None and model_type == "gpt2" and hidden:
        inter = 4 * hidden
    # transformers' config answers `torch_dtype` with a deprecation warning: read the plain field only
    dtype = getattr(cfg, "dtype", None) or vars(cfg).get("torch_dtype")
    return Architecture(
        model_type=model_type,
        family=detect_family(names, model_type),
        num_layers=size("num_hidden_layers", "n_layer", minimum=0),
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=kv,
        head_dim=head_dim,
        intermediate_size=inter,
        vocab_size=size("vocab_size", minimum=0),
        tie_word_embeddings=getattr(cfg, "tie_word_embeddings", None),
        config_dtype=str(dtype).replace("torch.", "") if dtype is not None else None,
    )


def config_mismatch(arch: Architecture, tensors) -> str | None:
    """The first way a config's sizes disagree with the stored weights, or None.

    Checked for the model types whose layout is known (``MODEL_TYPE_FAMILY``): query heads
    come in whole groups per kv head; no block index reaches num_layers; and every block's
    q/k/v/o and gate/up/down weight and bias (GPT-2: c_attn, attn.c_proj, c_fc, mlp.c_proj;
    BERT: query/key/value, attention.output.dense, intermediate.dense, output.dense) has the
    shape that hidden_size, num_heads, num_kv_heads, head_dim and intermediate_size imply.
    A config that disagrees would slice heads and channels wrongly (:func:`unit_slices`).
    Head counts that multiply out to the same sizes (8 heads of 8 vs 4 of 16) cannot be told
    apart from shapes and pass.

    Args:
        arch (Architecture): read from the config.
        tensors: iterable of (stored name, shape).
    Returns:
        str or None: one line, e.g. ``model.layers.0.mlp.up_proj.weight has shape [96, 64],
        but intermediate_size 100, hidden_size 64 imply [100, 64]``.
    """
    if arch.model_type not in MODEL_TYPE_FAMILY:
        return None
    H, KV = arch.num_heads, arch.num_kv_heads
    if H and KV and H % KV:
        return f"num_heads {H} is not a multiple of num_kv_heads {KV}"
    for name, shape in tensors:
        role = tensor_role(name, arch.family)
        if role.layer is None:
            continue
        if arch.num_layers is not None and role.layer >= arch.num_layers:
            return f"{name} belongs to block {role.layer}, but num_layers is {arch.num_layers}"
        expected = _expected_shape(role, arch)
        if expected is not None and tuple(shape) != expected[0]:
            return f"{name} has shape {list(shape)}, but {expected[1]} imply {list(expected[0])}"
    return None


def _expected_shape(role: TensorRole, arch: Architecture) -> tuple[tuple[int, ...], str] | None:
    """(shape, the config fields it follows from) of a block's projection weight or bias."""
    if role.param not in ("weight", "bias"):
        return None
    D, H, hd, C = arch.hidden_size, arch.num_heads, arch.head_dim, arch.intermediate_size
    KV = arch.num_kv_heads or H
    if role.kind in ("q", "k", "v", "qkv", "o") and D and H and hd:
        heads, kv_heads = f"num_heads {H} × head_dim {hd}", f"num_kv_heads {KV} × head_dim {hd}"
        out, inp, why = {
            "q": (H * hd, D, f"{heads}, hidden_size {D}"),
            "k": (KV * hd, D, f"{kv_heads}, hidden_size {D}"),
            "v": (KV * hd, D, f"{kv_heads}, hidden_size {D}"),
            "qkv": ((H + 2 * KV) * hd, D, f"(num_heads {H} + 2 × num_kv_heads {KV}) × head_dim {hd}, "
                                          f"hidden_size {D}"),
            "o": (D, H * hd, f"hidden_size {D}, {heads}"),
        }[role.kind]
    elif role.kind in ("gate", "up", "down") and D and C:
        out, inp, why = (D, C, f"hidden_size {D}, intermediate_size {C}") if role.kind == "down" else \
            (C, D, f"intermediate_size {C}, hidden_size {D}")
    else:
        return None
    if role.param == "bias":
        return (out,), why
    return ((inp, out) if arch.family == "gpt2" else (out, inp)), why  # GPT-2's Conv1D stores [in, out]


# ---------------------------------------------------------------------------- heads / channels

@dataclass(frozen=True)
class UnitSlices:
    """How one 2-D weight splits into attention heads or MLP channels.

    ``axis`` 0 means rows of the stored matrix, 1 columns; unit u covers
    ``[start + u*size, start + (u+1)*size)`` along that axis.
    """

    unit: str  # "head" (query heads), "kv_head", or "channel"
    component: str  # q | k | v | o | gate | up | down
    axis: int
    start: int
    size: int
    count: int


def unit_slices(kind: str, shape: tuple[int, ...], arch: Architecture) -> list[UnitSlices]:
    """Head / channel slicing of a weight matrix, GQA-aware.

    Llama family (``nn.Linear`` stores [out, in]): q rows per query head; k and v rows per kv
    head (kv head g serves query heads g·G .. g·G+G−1, G = heads / kv heads); o columns per
    query head; gate/up rows and down columns per MLP channel. GPT-2 (``Conv1D`` stores
    [in, out]): c_attn columns [q | k | v], c_proj rows per head, c_fc columns and mlp c_proj rows
    per channel. BERT as Llama without GQA.

    Returns:
        list of UnitSlices ([] when the tensor has no head / channel structure or the
        architecture is unknown).
    """
    if len(shape) != 2 or not arch.num_heads or not arch.head_dim:
        return []
    H, KV, hd = arch.num_heads, arch.num_kv_heads or arch.num_heads, arch.head_dim
    transposed = arch.family == "gpt2"  # Conv1D: [in, out]
    out_axis, in_axis = (1, 0) if transposed else (0, 1)
    if kind == "q":
        return [UnitSlices("head", "q", out_axis, 0, hd, H)]
    if kind in ("k", "v"):
        return [UnitSlices("kv_head", kind, out_axis, 0, hd, KV)]
    if kind == "qkv" and shape[out_axis] == (H + 2 * KV) * hd:
        return [UnitSlices("head", "q", out_axis, 0, hd, H),
                UnitSlices("kv_head", "k", out_axis, H * hd, hd, KV),
                UnitSlices("kv_head", "v", out_axis, (H + KV) * hd, hd, KV)]
    if kind == "o" and shape[in_axis] == H * hd:
        return [UnitSlices("head", "o", in_axis, 0, hd, H)]
    if arch.intermediate_size:
        C = arch.intermediate_size
        if kind in ("gate", "up") and shape[out_axis] == C:
            return [UnitSlices("channel", kind, out_axis, 0, 1, C)]
        if kind == "down" and shape[in_axis] == C:
            return [UnitSlices("channel", kind, in_axis, 0, 1, C)]
    return []
