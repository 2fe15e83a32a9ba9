"""Where a batched decoding's time goes (`mt bench translate --profile`): torch.profiler over one
translate_batch, each operator's own time sorted into the parts of a step, and what no operator
accounts for (Python: the search loop, the layers' glue, the dispatcher) as the rest.

The model's `step` is wrapped in a profiler scope for the run only, which tells the decoder step's
operators from the search's; the wrapper is removed afterwards.
"""
from __future__ import annotations

import time

from torch.profiler import ProfilerActivity, profile, record_function

# operator name -> part of the step (names as torch.profiler reports them; the rest is "other ops")
PARTS = {
    "products": ("aten::addmm", "aten::mm", "aten::bmm", "aten::baddbmm", "aten::mv", "aten::linear_fwd",
                 "mkldnn::_linear_pointwise", "aten::mkldnn_linear", "quantized::linear_dynamic",
                 "aten::_weight_int8pack_mm"),
    "attention": ("aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_softmax", "aten::softmax"),
    "norms, activations, residuals": ("aten::native_layer_norm", "aten::relu", "aten::add", "aten::add_",
                                      "aten::mul", "aten::gelu", "aten::embedding", "aten::index_select"),
    "log-softmax": ("aten::_log_softmax", "aten::sub", "aten::logsumexp", "aten::exp", "aten::sum"),
    "cache writes and reorder": ("aten::copy_", "aten::index", "aten::index_put_", "aten::index_copy_",
                                 "aten::repeat_interleave", "aten::clone"),
    "top-k and bookkeeping": ("aten::topk", "aten::argmax", "aten::sort", "aten::argsort", "aten::gather",
                              "aten::cat", "aten::nonzero", "aten::item", "aten::_local_scalar_dense",
                              "aten::masked_fill", "aten::where", "aten::eq", "aten::ne", "aten::isfinite"),
}
_PART_OF = {name: part for part, names in PARTS.items() for name in names}
NO_OPERATOR = "no operator (Python; --aot: compiled code)"


def profile_translate(translator, sources: list[str], **options) -> dict:
    """Profile one translate_batch(sources, **options) after a warm-up; ms in each part, in total
    and per decoder step, and the run's wall time with and without the profiler."""
    translator.translate_batch(sources[:32], **options)
    start = time.perf_counter()
    translator.translate_batch(sources, **options)
    plain = time.perf_counter() - start
    target = translator.decoder or translator.model
    real_step, calls = target.step, [0]

    def step(tokens, cache):
        calls[0] += 1
        with record_function("mt.step"):
            return real_step(tokens, cache)

    target.step = step
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            translator.translate_batch(sources, **options)
            wall = time.perf_counter() - start
    finally:
        del target.step  # the instance attribute: the class's step again
    names = [*PARTS, "other ops"]
    inside, outside = dict.fromkeys(names, 0.0), dict.fromkeys(names, 0.0)
    in_step = 0.0
    for event in prof.events():
        if event.name == "mt.step":
            in_step += event.cpu_time_total / 1e3
            continue
        parent = event.cpu_parent
        while parent is not None and parent.name != "mt.step":
            parent = parent.cpu_parent
        (inside if parent is not None else outside)[_PART_OF.get(event.name, "other ops")] += event.self_cpu_time_total / 1e3
    # time no operator accounts for: inside the step the layers' Python glue (eager) or the compiled
    # code (--aot: its kernels are not torch operators); outside it, the search loop
    inside[NO_OPERATOR] = in_step - sum(inside.values())
    outside[NO_OPERATOR] = wall * 1e3 - in_step - sum(outside.values())
    return {"sentences": len(sources), "steps": calls[0], "wall_ms": plain * 1e3, "profiled_wall_ms": wall * 1e3,
            "in_step_ms": in_step, "search_ms": wall * 1e3 - in_step, "in_step_parts_ms": inside,
            "outside_step_parts_ms": outside,
            "parts_ms": {k: inside[k] + outside[k] for k in inside}}


def print_profile(result: dict) -> None:
    wall, steps = result["profiled_wall_ms"], max(result["steps"], 1)
    print(f"{result['sentences']} sentences, {steps} decoder steps; {result['wall_ms']:.0f} ms "
          f"({wall:.0f} ms profiled): {result['in_step_ms']:.0f} ms in the decoder step, "
          f"{result['search_ms']:.0f} ms in search outside it (the encoder included)")
    print(f"  {'part':44} {'in step ms/step':>16} {'outside ms/step':>16} {'share':>6}")
    inside, outside = result["in_step_parts_ms"], result["outside_step_parts_ms"]
    for part, ms in sorted(result["parts_ms"].items(), key=lambda kv: -kv[1]):
        print(f"  {part:44} {inside[part] / steps:16.3f} {outside[part] / steps:16.3f} {ms / wall:6.1%}")
