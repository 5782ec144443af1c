"""The JSON each analysis writes, typed (one ``TypedDict`` per spec, checked by pydantic in the tests
and by :func:`check` wherever a result is read back): the top-level fields, their types, and the
``schema`` that versions the format. Nested rows are described in the README's CLI section."""

from __future__ import annotations

from typing import Any

from typing import NotRequired

from typing_extensions import TypedDict  # noqa: UP035 (pydantic reads typing_extensions TypedDicts on 3.11)

Rows = list[dict[str, Any]]


class InspectResult(TypedDict):
    ref: str
    path: str
    source: str
    model_type: str | None
    family: str
    num_layers: int | None
    hidden_size: int | None
    num_heads: int | None
    num_kv_heads: int | None
    head_dim: int | None
    intermediate_size: int | None
    vocab_size: int | None
    tie_word_embeddings: bool | None
    config_dtype: str | None
    total_params: int
    dtypes: dict[str, int]
    size_bytes: int
    files: Rows
    params_by_kind: dict[str, int]
    params_by_layer: list[Any]
    tensors: Rows
    parent: str | None  # the checkpoint it was trained from (docs/design.md §14)
    parent_source: str | None
    parent_file: str | None


class AlignResult(TypedDict):
    refs: list[str]
    aligned: int
    compared_params: int
    missing: Rows
    shape_mismatches: Rows
    resized: Rows
    tensors: Rows


class DiffResult(TypedDict):
    schema: str  # subnetscope.diff/N
    base: str
    tuned: str
    tolerance: float
    total_params: int
    changed_params: int
    update_sparsity: float
    density: float
    by_compare: dict[str, Any]
    tolerance_sweep: Rows
    tensors: Rows
    layers: Rows
    kinds: Rows
    layer_kinds: Rows
    units: Rows
    delta_histogram: dict[str, Any]
    absorption: Rows
    by_tolerance: dict[str, Any]
    skipped: Rows
    resized: Rows


class OverlapResult(TypedDict):
    schema: str  # subnetscope.overlap/N
    base: str
    tuned: list[str]
    tolerance: float
    total_params: int
    by_compare: dict[str, Any]
    pairs: Rows
    consensus: list[int]
    layers: Rows
    kinds: Rows
    relative_norms: Rows  # per tensor: name, ‖Δ_k‖ / ‖θ⁰‖ per run
    skipped: Rows


class TrajectoryResult(TypedDict):
    schema: str  # subnetscope.trajectory/N
    base: str
    tolerance: float
    total_params: int
    checkpoints: Rows
    first_changed_histogram: dict[str, Any]
    layers: Rows
    by_tolerance: dict[str, Any]
    skipped: Rows
    resized: Rows


class GeometryResult(TypedDict):
    schema: str  # subnetscope.geometry/N
    base: str
    tuned: str
    k: str | int | float
    tolerance: float
    tensors: Rows
    layers: Rows
    kinds: Rows
    skipped: Rows
    skipped_matrices: int


class ImportanceResult(TypedDict):
    schema: str  # subnetscope.importance/N
    checkpoint: str
    selector: str
    granularity: str
    scope: str
    layers: NotRequired[Any]  # rows of element scores, or the layer scores themselves
    kinds: NotRequired[Rows]
    layer_kinds: NotRequired[Rows]
    heads: NotRequired[Any]  # {"sum", "mean"} of element scores, or the head scores
    channels: NotRequired[Any]
    rows: NotRequired[Any]
    data: str | None
    samples: int | None
    seq_len: int | None
    options: dict[str, Any]
    info: dict[str, Any]
    mask: NotRequired[dict[str, Any]]


class EvaluateResult(TypedDict):
    schema: str  # subnetscope.evaluate-selectors/N
    checkpoint: str
    selectors: list[str]
    density: float
    scope: str
    data: str | None
    samples: int | None
    agreement: dict[str, Any] | None
    stability: dict[str, float] | None
    against_diff: dict[str, Any] | None
    prediction: Rows | None


class AttributeResult(TypedDict):
    schema: str  # subnetscope.attribute/N
    checkpoint: str
    prompt: str
    method: str
    explains: str
    tokens: list[str]
    scores: list[float]
    target: str
    target_tokens: list[Any]
    target_logit: float
    target_logprob: float
    seconds: float
    device: str
    steps: int | None
    steps_used: int | None
    step_budget: int | None
    converged: bool | None
    completeness_target: float | None
    completeness_error: float | None
    convergence_delta: float | None
    baseline_difference: float | None
    conservation_error: float | None
    relevance_sum: float | None
    layers: list[float] | None
    layer_tokens: list[Any] | None
    heads: list[Any] | None
    faithfulness: dict[str, Any] | None
    info: dict[str, Any]
    compare: NotRequired[dict[str, Any]]


def check(result_type: type, obj: dict) -> dict:
    """``obj`` as ``result_type`` says: every required field, no other, each of its type (pydantic).

    Raises:
        pydantic.ValidationError: naming the field.
    """
    from pydantic import ConfigDict, TypeAdapter, with_config

    typed = with_config(ConfigDict(extra="forbid", strict=False))(result_type)
    return TypeAdapter(typed).validate_python(obj)


class BehaviourResult(TypedDict):
    schema: str  # subnetscope.behaviour/N
    base: str
    tuned: str
    device: str
    both_in_memory: bool
    top: int
    prompts: Rows  # per prompt: prompt, ids, tokens, kl (per position), kl_mean, kl_max, rose, fell
    kl_mean: float  # over every position of every prompt
    kl_prompt_mean: float
    positions: int
    kl_quantiles: dict[str, float]
    rose: Rows
    fell: Rows
    seconds: float


class PatchResult(TypedDict):
    schema: str  # subnetscope.patch/N
    base: str
    tuned: str
    subset: str
    alpha: float
    rank: int | None
    tolerance: float
    selected: int
    total: int
    evaluations: list[str]
    tuned_metrics: dict[str, Any]
    base_metrics: dict[str, Any]
    patched_metrics: dict[str, Any] | None
    recovered: float | None  # of the first evaluation's metric
    recovered_by_metric: dict[str, Any] | None
    sweep: str | None
    rows: Rows  # one per patch of a sweep
    out: dict[str, Any] | None
    not_in_model: list[str]
    seconds: float
    # the patched model's metrics, also at the top (one patch with --eval)
    accuracy: NotRequired[float]
    reward: NotRequired[float]
    kl_to_tuned: NotRequired[float]
    kl_to_base: NotRequired[float]
    loss: NotRequired[float]
    perplexity: NotRequired[float]
    attribution: NotRequired[dict[str, Any]]  # --attribute: weight-space IG per tensor, layer, kind, cell
    layer_agreement: NotRequired[Rows]  # --sweep layers with --selector / --attribute
