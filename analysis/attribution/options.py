"""What an attribution can be asked for: the methods, IG's steps and budgets, and the size limits
checked before anything is allocated. Importable without torch: the command line's parser reads it
(``python -m analysis --help`` answers without loading torch). :mod:`analysis.attribution.methods` uses
these and re-exports them."""

METHODS = {
    "ig": "Integrated Gradients",
    "saliency": "Saliency |∇|",
    "ixg": "Input × Gradient",
    "ablation": "Feature Ablation",
    "lrp-cp": "CP-LRP",
    "lrp-attn": "AttnLRP",
}
LRP_VARIANT = {"lrp-cp": "cp", "lrp-attn": "attn"}
RELEVANCE_METHODS = ("ixg", "lrp-cp", "lrp-attn")  # one pass, target logit, layers and heads
DEFAULT_STEPS = 50  # IG's steps when a fixed number is asked for without one (the page's field)
# Adaptive IG (steps="auto", the default): START_PANELS segments of PANEL_STEPS Gauss-Legendre points
# each, refined until the completeness bound and the scores' error are at most COMPLETENESS_TARGET or
# DEFAULT_BUDGET points (forward + backward passes) are spent
COMPLETENESS_TARGET = 0.01
# LRP's conservation error |Σ relevance − logit| / |logit| above which the page flags the relevances: CP-LRP
# conserves to float precision on bias-free Llama-family models; AttnLRP's softmax rule loses a few percent
CONSERVATION_FLAG = 0.05
PANEL_STEPS = 16
START_PANELS = 4
DEFAULT_BUDGET = 4096
# the least budget: the first rule and one split of every segment, which measures a scores error (a
# segment's is unknown until it is compared with its halves)
MIN_BUDGET = 3 * PANEL_STEPS * START_PANELS
MIN_PANEL = 1e-7  # a segment this short is not split again (float32 resolution of α)
# one Gauss-Legendre rule of n points: numpy's leggauss builds an n x n matrix (measured: 4,096 points
# in 15 s, 8,192 in 87 s, 10^9 a MemoryError); more points are the adaptive rule's job
MAX_STEPS = 4096
MAX_BUDGET = 65536  # gradient passes of one adaptive IG
MAX_BATCH = 65536  # rows of one forward
MAX_PROMPT_CHARS = 1_000_000  # refused before tokenizing
MAX_TOKENS = 131_072  # positions, when the model's config states no limit
DEFAULT_TARGET_TOKENS = 4  # a greedy continuation of at most this many tokens when no target is given
# tokens per forward when IG's steps or the ablations are batched (batch = budget // sequence length):
# one batch of all 50 steps of a short prompt is the fastest IG on CPU too (measured: SmolLM2-135M,
# 6 tokens, IG-50 2.65 s in one batch, 3.39 s in batches of 16)
BATCH_TOKENS = {"cpu": 4096, "cuda": 16384}
