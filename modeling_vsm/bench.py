"""`vsm bench`: what each `dense_feature_source` costs, measured against the bare transformers components.

In ONE run, on the same inputs (one image and a prompt that ends in `<SEG>`, so one call is the prefill plus one
mask), for every dense-feature source whose model can be built and every requested dtype:

- latency: the median of `runs` timed calls after `warmup` calls, of the VSM and of the "bare" pipeline, the
  transformers components run by hand on the same weights (vision tower, the projector's two linears, the LM with
  `logits_to_keep=1` as in generation's prefill, SAM's or OWL-ViT's image encoder for those sources, SAM's prompt
  encoder + mask decoder on a box prompt). VSM and bare calls alternate, so load on the machine hits both alike.
- peak memory: weight bytes of the modules a call uses plus the activation peak of the call. CUDA:
  `torch.cuda.max_memory_allocated` above the level at entry. CPU (Linux): the resident-set high-water mark
  (`VmHWM`), reset at entry by writing 5 to `/proc/self/clear_refs`, above the resident set at entry (after
  `malloc_trim`, so freed heap is not silently reused). Elsewhere the activation peak is reported as null.
- FLOPs of each part (`torch.utils.flop_counter.FlopCounterMode`, counted on the first warm-up call) and the
  GFLOP/s each part achieves against a plain square matmul measured in the same run and dtype.
- the ratios sam / shared, sam / lm and detector / shared (time and FLOPs), for the VSM and for the bare parts;
- text-only `generate` of `new_tokens` tokens, VSM against the bare `*ForCausalLM` holding the same weights;
- K masks decoded in one `SamMaskDecoder` call, in K calls, and the way `decode_masks` picks for the device.

Sources whose model cannot be built or run get an `"error"` entry instead; the rest still run.
"""

import contextlib
import ctypes
import ctypes.util
import datetime
import gc
import json
import logging
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from configuration_vsm import DENSE_FEATURE_SOURCES, VSMConfig

from .modeling_vsm import VSMForCausalLM, scan_image_grid

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PROMPT_TEXT_TOKENS = 40  # Janus-Pro's chat template around one 576-token image: 616 positions
GENERATE_PROMPT_TOKENS = 32
MATMUL_SIZE = {"tiny": 256}  # the reference matmul's side per preset; others use DEFAULT_MATMUL_SIZE
DEFAULT_MATMUL_SIZE = 2048
# A mask decode takes tens of milliseconds, where one run's jitter is several percent (measured: 3 runs put K
# chunk-1 calls at 1.09x K single decodes, the same calls): these cheap timings take at least this many runs.
MIN_MASK_TIMING_RUNS = 10
TARGETS = {
    "single_encoder_speedup_fraction_of_bare": 0.9,  # shared / lm vs sam speedup >= 90% of the bare parts' ratio
    "vsm_vs_bare_time": 1.05,
    "vsm_vs_bare_memory": 1.05,
    "generate_vs_bare": 1.03,
}
# Module names (`FlopCounterMode`'s breakdown and timing hooks) of each part of a VSM call.
VSM_PARTS = {
    "vision_tower": ("model.vision_tower", "model.multi_modal_projector", "model.conv_stem"),
    "dense_encoder": ("dense_encoder", "vision_to_dense", "lm_to_dense", "detector_to_dense"),
    "lm_prefill": ("model.language_model", "lm_head"),
    "mask_decoder": ("text_hidden_fcs_seg", "prompt_encoder", "mask_decoder", "mask_refiner"),
}
logger = logging.getLogger(__name__)


# ---- measuring --------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(function, device):
    """(seconds, result) of one call."""
    synchronize(device)
    start = time.perf_counter()
    result = function()
    synchronize(device)
    return time.perf_counter() - start, result


class PeakMemory:
    """Activation peak of the code inside the block, in bytes (`self.peak`; None where it cannot be measured)."""

    def __init__(self, device: torch.device):
        self.device, self.peak = device, None

    @staticmethod
    def method(device: torch.device) -> str:
        if device.type == "cuda":
            return "torch.cuda.max_memory_allocated above the allocation at entry"
        if os.path.exists("/proc/self/clear_refs"):
            return "Linux VmHWM (reset via /proc/self/clear_refs) above VmRSS at entry, after malloc_trim"
        return "unavailable on this platform"

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        elif os.path.exists("/proc/self/clear_refs"):
            trim_heap()
            self.start = proc_status_bytes("VmRSS")
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")  # reset the high-water mark to the current resident set
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.start
        elif os.path.exists("/proc/self/clear_refs"):
            self.peak = max(0, proc_status_bytes("VmHWM") - self.start)
        return False


def proc_status_bytes(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def trim_heap() -> None:
    """Hands freed heap back to the OS (glibc), so a measured call cannot reuse it unseen."""
    name = ctypes.util.find_library("c")
    if name:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(name).malloc_trim(0)


def module_bytes(*modules) -> int:
    """Bytes of the parameters and buffers of `modules` (each tensor counted once)."""
    seen, total = set(), 0
    for module in modules:
        for tensor in [*module.parameters(), *module.buffers()]:
            if id(tensor) not in seen:
                seen.add(id(tensor))
                total += tensor.numel() * tensor.element_size()
    return total


def count_flops(function):
    """(result, {module name: FLOPs}, total FLOPs) of one call."""
    with FlopCounterMode(display=False, depth=None) as counter:
        result = function()
    per_module = {name: sum(counts.values()) for name, counts in counter.get_flop_counts().items()}
    return result, per_module, counter.get_total_flops()


def median(values):
    return statistics.median(values) if values else None


def matmul_gflops(size: int, dtype, device, runs: int) -> float:
    """GFLOP/s of a plain (size x size) @ (size x size) matmul: the machine's reference rate."""
    a, b = torch.randn(size, size, dtype=dtype, device=device), torch.randn(size, size, dtype=dtype, device=device)
    a @ b  # warm-up
    seconds = median([timed(lambda: a @ b, device)[0] for _ in range(max(runs, 3))])
    return 2 * size**3 / seconds / 1e9


class PartTimer:
    """Forward hooks that add up the seconds spent in each VSM part (`VSM_PARTS`) during one call."""

    def __init__(self, model, device):
        self.device, self.seconds, self.handles, self.started = device, {}, [], {}
        for part, names in VSM_PARTS.items():
            for name in names:
                module = get_submodule(model, name)
                if module is not None:
                    self.handles.append(module.register_forward_pre_hook(self._start(part, name)))
                    self.handles.append(module.register_forward_hook(self._stop(part, name)))

    def _start(self, part, name):
        def hook(*args):
            synchronize(self.device)
            self.started[name] = time.perf_counter()

        return hook

    def _stop(self, part, name):
        def hook(*args):
            synchronize(self.device)
            self.seconds[part] = self.seconds.get(part, 0.0) + time.perf_counter() - self.started.pop(name)

        return hook

    def reset(self):
        self.seconds = {}

    def remove(self):
        for handle in self.handles:
            handle.remove()


def get_submodule(model, name):
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


# ---- inputs and the bare pipeline -----------------------------------------------------------


def make_inputs(config, device, generator) -> dict:
    """One image and a prompt `<bos> text <image>*N text <SEG>`; the dense views a "sam" / "detector" source reads."""
    text = config.text_config
    vocab = [i for i in range(min(text.vocab_size, 1000)) if i not in special_ids(config)]
    words = torch.tensor(vocab)[torch.randint(len(vocab), (PROMPT_TEXT_TOKENS,), generator=generator)]
    half = PROMPT_TEXT_TOKENS // 2
    image = torch.full((config.num_image_tokens,), config.image_token_index)
    input_ids = torch.cat([words[:half], image, words[half:-1], torch.tensor([config.seg_token_index])])[None]

    def pixels(size):
        return torch.randn(1, 3, size, size, generator=generator).to(device)

    generate_ids = words[:GENERATE_PROMPT_TOKENS][None]
    return {
        "input_ids": input_ids.to(device),  # (1, T)
        "pixel_values": pixels(config.vision_config.image_size),
        "sam_pixel_values": pixels(config.sam_config.vision_config.image_size),
        "detector_pixel_values": pixels(config.detector_config.vision_config.image_size),
        "generate_ids": generate_ids.to(device),  # (1, T_text) text only
    }


def special_ids(config) -> set:
    ids = {config.image_token_index, config.seg_token_index, config.loc_token_index} - {None}
    text = config.text_config
    return ids | {i for i in (text.pad_token_id, text.bos_token_id, text.eos_token_id) if isinstance(i, int)}


class BareComponents:
    """The transformers components a VSM composes, run by hand: the VSM's own vision tower and LM (same tensors,
    wrapped in the bare `*ForCausalLM`), a `SamModel` (image encoder, prompt encoder, mask decoder) and an
    OWL-ViT vision model of the preset's shapes."""

    def __init__(self, config, device):
        from transformers import AutoModelForCausalLM, SamModel
        from transformers.models.owlvit.modeling_owlvit import OwlViTVisionModel

        self.config, self.device = config, device
        self.sam = SamModel(config.sam_config).to(device).eval()
        self.owlvit = OwlViTVisionModel(config.detector_config.vision_config).to(device).eval()
        with torch.device("meta"):
            self.lm = AutoModelForCausalLM.from_config(config.text_config)
        self.lm.eval()
        size, grid = config.sam_config.vision_config.image_size, config.prompt_grid_size
        self.box = torch.tensor([[[size * 0.25, size * 0.25, size * 0.75, size * 0.75]]], device=device)
        # What the mask decoder reads for the VLM-fed sources (its cost does not depend on the values).
        self.stand_in_embeddings = torch.randn(1, config.dense_size, grid, grid, device=device)  # (1, D, G, G)

    def attach(self, vsm) -> None:
        """Points the bare LM at the VSM's LM and LM head (no copy)."""
        self.vision_tower, self.projector = vsm.model.vision_tower, vsm.model.multi_modal_projector
        self.lm.model, self.lm.lm_head = vsm.model.language_model, vsm.lm_head

    def detach(self) -> None:
        """Drops the references to the VSM's modules, so that the VSM can be freed."""
        self.vision_tower = self.projector = self.lm.model = self.lm.lm_head = None

    def to_dtype(self, dtype) -> None:
        """The encoders take `dtype`; SAM's prompt encoder and mask decoder stay fp32, as in the VSM."""
        self.sam.to(dtype)
        self.sam.prompt_encoder.float()
        self.sam.mask_decoder.float()
        self.sam.shared_image_embedding.float()
        self.owlvit.to(dtype)

    def parts(self, source):
        """The components one call of `source` runs, in order (name, module(s) whose weights it reads)."""
        encoder = {"sam": [("sam_encoder", [self.sam.vision_encoder])], "detector": [("owlvit_encoder", [self.owlvit])]}
        mask = ("mask_decoder", [self.sam.prompt_encoder, self.sam.mask_decoder, self.sam.shared_image_embedding])
        return [("vision_tower", [self.vision_tower, self.projector]), ("lm_prefill", [self.lm])] + encoder.get(source, []) + [mask]

    def run(self, source, inputs, dtype, seconds=None, flops=None):
        """One bare call of `source`: each component in turn; adds each component's seconds (and FLOPs) up."""
        state = {}

        def vision():
            layer = self.config.vision_feature_layer
            outputs = self.vision_tower(inputs["pixel_values"].to(dtype), output_hidden_states=layer != -1)
            features = outputs.last_hidden_state if layer == -1 else outputs.hidden_states[layer]  # (1, N', D_v)
            scans = self.config.image_scans
            features = features[:, -(self.config.num_image_tokens // len(scans)) :]  # without a CLS token, as the VSM
            projected = self.projector(features)  # (1, N, D_lm)
            state["image_features"] = torch.cat([scan_image_grid(projected, scan) for scan in scans], dim=1)

        def lm_prefill():
            ids = inputs["input_ids"]
            mask = (ids == self.config.image_token_index)[..., None]
            embeds = self.lm.get_input_embeddings()(ids.masked_fill(mask[..., 0], 0))  # the placeholder may be past the rows
            embeds = embeds.masked_scatter(mask, state["image_features"].to(embeds.dtype))
            return self.lm(inputs_embeds=embeds, logits_to_keep=1, use_cache=False).logits

        def sam_encoder():
            state["embeddings"] = self.sam.vision_encoder(inputs["sam_pixel_values"].to(dtype)).last_hidden_state

        def owlvit_encoder():
            self.owlvit(pixel_values=inputs["detector_pixel_values"].to(dtype))

        def mask_decoder():
            embeddings = state.get("embeddings", self.stand_in_embeddings)
            return self.sam(image_embeddings=embeddings.float(), input_boxes=self.box, multimask_output=False).pred_masks

        calls = {"vision_tower": vision, "lm_prefill": lm_prefill, "sam_encoder": sam_encoder,
                 "owlvit_encoder": owlvit_encoder, "mask_decoder": mask_decoder}
        for name, _ in self.parts(source):
            if flops is not None:
                _, _, total = count_flops(calls[name])
                flops[name] = total
            else:
                elapsed, _ = timed(calls[name], self.device)
                if seconds is not None:
                    seconds[name] = seconds.get(name, 0.0) + elapsed


# ---- one source -------------------------------------------------------------------------------


def vsm_call(model, source, inputs):
    kwargs = {"input_ids": inputs["input_ids"], "pixel_values": inputs["pixel_values"], "logits_to_keep": 1, "use_cache": False}
    if source == "sam":
        kwargs["dense_pixel_values"] = inputs["sam_pixel_values"]
    elif source == "detector":
        kwargs["dense_pixel_values"] = inputs["detector_pixel_values"]
    outputs = model(**kwargs)
    assert outputs.pred_masks[0].shape[0] == 1, "the benchmark prompt must give exactly one mask"
    return outputs


def to_dtype(model, dtype):
    """Casts the VSM to `dtype`, keeping the modules of `_keep_in_fp32_modules_strict` in fp32 (as loading does)."""
    model.to(dtype)
    for name in model._keep_in_fp32_modules_strict or []:
        module = get_submodule(model, name)
        if module is not None:
            module.float()
    return model


def vsm_part_flops(per_module: dict, total: int) -> dict:
    """FLOPs of each VSM part, from `FlopCounterMode`'s per-module counts; "other" is the rest of the call."""
    root = "VSMForCausalLM."
    parts = {part: sum(per_module.get(root + name, 0) for name in names) for part, names in VSM_PARTS.items()}
    return {**parts, "other": total - sum(parts.values()), "total": total}


def bench_source(model, bare, source, inputs, dtype, runs, warmup) -> dict:
    """Latency, memory and FLOPs of one source in one dtype, VSM and bare alternating."""
    device = inputs["input_ids"].device
    result = {"vsm": {}, "bare": {}}
    with torch.inference_mode():
        # One call of each counts FLOPs; then `warmup` plain calls. Counting runs through FlopCounterMode's own
        # dispatch, so it warms nothing up: measured, a first plain call after it took 1.2x the others.
        _, per_module, total = count_flops(lambda: vsm_call(model, source, inputs))
        result["vsm"]["flops"] = vsm_part_flops(per_module, total)
        bare_flops = {}
        bare.run(source, inputs, dtype, flops=bare_flops)
        result["bare"]["flops"] = {**bare_flops, "total": sum(bare_flops.values())}
        for _ in range(warmup):
            vsm_call(model, source, inputs)
            bare.run(source, inputs, dtype)

        timer = PartTimer(model, device)
        vsm_times, bare_times, vsm_parts, bare_parts = [], [], [], []
        vsm_memory, bare_memory = PeakMemory(device), PeakMemory(device)  # measured on the first timed run
        try:
            for run in range(runs):
                timer.reset()
                with vsm_memory if run == 0 else contextlib.nullcontext():
                    vsm_times.append(timed(lambda: vsm_call(model, source, inputs), device)[0])
                vsm_parts.append(dict(timer.seconds))
                seconds = {}
                with bare_memory if run == 0 else contextlib.nullcontext():
                    bare_times.append(timed(lambda: bare.run(source, inputs, dtype, seconds=seconds), device)[0])
                bare_parts.append(seconds)
        finally:
            timer.remove()

    for side, times, parts, memory, weights in (
        ("vsm", vsm_times, vsm_parts, vsm_memory, module_bytes(model)),
        ("bare", bare_times, bare_parts, bare_memory, module_bytes(*[m for _, ms in bare.parts(source) for m in ms])),
    ):
        entry = result[side]
        entry["latency_s"], entry["latency_runs_s"] = median(times), times
        entry["parts_s"] = {name: median([p.get(name, 0.0) for p in parts]) for name in parts[0]}
        entry["parts_s"]["other"] = max(0.0, entry["latency_s"] - sum(entry["parts_s"].values()))
        entry["weight_bytes"], entry["activation_peak_bytes"] = weights, memory.peak
        entry["peak_memory_bytes"] = None if memory.peak is None else weights + memory.peak
        entry["gflops_per_s"] = {
            name: entry["flops"][name] / seconds / 1e9
            for name, seconds in entry["parts_s"].items()
            if name in entry["flops"] and seconds and entry["flops"][name]
        }
    result["time_vs_bare"] = ratio(result["vsm"]["latency_s"], result["bare"]["latency_s"])
    result["memory_vs_bare"] = ratio(result["vsm"]["peak_memory_bytes"], result["bare"]["peak_memory_bytes"])
    return result


def ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


# ---- text-only generation and several masks ---------------------------------------------------


def bench_generate(model, bare, inputs, new_tokens, runs, warmup) -> dict:
    device = inputs["generate_ids"].device
    ids = inputs["generate_ids"]
    kwargs = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False,
              "attention_mask": torch.ones_like(ids), "pad_token_id": 0}
    sequences = {}

    def vsm():
        sequences["vsm"] = model.generate(input_ids=ids, **kwargs)

    def plain():
        sequences["bare"] = bare.lm.generate(input_ids=ids, **kwargs)

    for _ in range(warmup):
        vsm()
        plain()
    vsm_times, bare_times = [], []
    for _ in range(runs):
        vsm_times.append(timed(vsm, device)[0])
        bare_times.append(timed(plain, device)[0])
    return {
        "new_tokens": new_tokens,
        "prompt_tokens": ids.shape[1],
        "vsm_s": median(vsm_times),
        "bare_s": median(bare_times),
        "overhead_ratio": ratio(median(vsm_times), median(bare_times)),
        "same_tokens": bool(torch.equal(sequences["vsm"], sequences["bare"])),
    }


def bench_mask_counts(model, mask_counts, runs, warmup, device) -> dict:
    """K masks in one decoder call, in K calls, and as `predict_masks` (under `decode_masks`) chooses for this device."""
    config = model.config
    grid = config.prompt_grid_size
    features = torch.randn(1, grid, grid, config.dense_size, device=device)  # (1, G, G, D)
    default_chunk = model.mask_decode_chunk_size
    results = {}
    with torch.inference_mode():
        for count in mask_counts:
            prompts = torch.randn(count, 1, 1, config.dense_size, device=device)  # (K, 1, 1, D)
            image_index = torch.zeros(count, dtype=torch.long, device=device)
            schemes = {"one_call": lambda *args, count=count: count, "k_calls": lambda *args: 1, "auto": default_chunk}
            row = {}
            for name, chunking in schemes.items():
                model.mask_decode_chunk_size = chunking
                try:
                    for _ in range(warmup):
                        model.predict_masks(features, prompts, image_index)
                    row[f"{name}_s"] = median([timed(lambda: model.predict_masks(features, prompts, image_index), device)[0]
                                               for _ in range(max(runs, MIN_MASK_TIMING_RUNS))])
                finally:
                    del model.mask_decode_chunk_size  # back to the class's method
            row["auto_chunk_size"] = default_chunk(features.permute(0, 3, 1, 2), count)
            row["one_call_vs_k_calls"] = ratio(row["one_call_s"], row["k_calls_s"])
            results[count] = row
    single = results[mask_counts[0]]["k_calls_s"] / mask_counts[0]  # one single decode
    for count, row in results.items():
        row["auto_vs_k_single"] = ratio(row["auto_s"], count * single)  # target: <= 1
    return {str(count): row for count, row in results.items()}


# ---- the whole benchmark ----------------------------------------------------------------------


def run_benchmark(preset="tiny", dtypes=("fp32", "bf16"), runs=3, warmup=1, new_tokens=8, mask_counts=(1, 4, 8),
                  sources=DENSE_FEATURE_SOURCES, device=None, seed=0, partial_output=None, model_dir=None) -> dict:
    """Runs every measurement of the module docstring; returns the JSON-ready report. With `partial_output`, the
    report so far is written there after each source (a long run that is cut short still leaves its figures).

    With `model_dir` (a saved VSM, e.g. a converted LISA) the shapes are that model's: its own source runs the saved
    model, the other sources a model of the same shapes with that source (random weights: the timings do not depend
    on the values), so the original layout (LISA's SAM ViT-H encoder) is measured against a shared-encoder VSM."""
    unknown = [d for d in dtypes if d not in DTYPES]
    if unknown:
        raise ValueError(f"Unknown dtype(s) {unknown}; choose from {sorted(DTYPES)}.")
    bad_sources = [s for s in sources if s not in DENSE_FEATURE_SOURCES]
    if bad_sources:
        raise ValueError(f"Unknown dense_feature_source(s) {bad_sources}; choose from {list(DENSE_FEATURE_SOURCES)}.")
    if runs < 1:
        raise ValueError(f"--runs must be at least 1, got {runs}.")
    started = time.perf_counter()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    generator = torch.Generator().manual_seed(seed)
    base_config = VSMConfig.from_pretrained(model_dir) if model_dir else VSMConfig.from_preset(preset)
    if model_dir:
        preset = Path(model_dir).name
    inputs = make_inputs(base_config, device, generator)
    report = {
        "preset": preset,
        "model": str(model_dir) if model_dir else None,
        "device": describe_device(device),
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "threads": torch.get_num_threads(),
        "runs": runs,
        "warmup": warmup,
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "memory_method": PeakMemory.method(device),
        "flops_method": "torch.utils.flop_counter.FlopCounterMode (matmuls, convolutions, attention), first warm-up call",
        "inputs": {"prompt_positions": inputs["input_ids"].shape[1], "image_tokens": base_config.num_image_tokens,
                   "image_size": base_config.vision_config.image_size, "masks_per_call": 1},
        "dtypes": {name: {"sources": {}} for name in dtypes},
        "targets": dict(TARGETS),
    }
    logger.info(f"bench {preset}: {len(sources)} sources x {list(dtypes)}, {runs} runs after {warmup} warm-up, {device}")
    torch.manual_seed(seed)
    bare = BareComponents(base_config, device)
    for name in dtypes:
        report["dtypes"][name]["matmul_gflops"] = matmul_gflops(MATMUL_SIZE.get(preset, DEFAULT_MATMUL_SIZE), DTYPES[name], device, runs)
        report["dtypes"][name]["matmul_size"] = MATMUL_SIZE.get(preset, DEFAULT_MATMUL_SIZE)
    for source in sources:
        try:
            build_started = time.perf_counter()
            model = build_model(base_config, source, model_dir).to(device).eval()
            build_seconds = time.perf_counter() - build_started
            logger.info(f"  built {source} in {build_seconds:.1f} s")
        except Exception as error:  # a source this version cannot build: recorded, the others still run
            for name in dtypes:
                report["dtypes"][name]["sources"][source] = {"error": f"{type(error).__name__}: {error}"}
            logger.info(f"  {source}: cannot build ({type(error).__name__}: {error})")
            continue
        bare.attach(model)
        for name in dtypes:
            dtype = DTYPES[name]
            to_dtype(model, dtype)
            bare.to_dtype(dtype)
            entry = report["dtypes"][name]
            try:
                entry["sources"][source] = bench_source(model, bare, source, inputs, dtype, runs, warmup)
                entry["sources"][source]["build_seconds"] = round(build_seconds, 1)
                logger.info(f"  {source} {name}: vsm {entry['sources'][source]['vsm']['latency_s']:.3f} s, "
                            f"bare {entry['sources'][source]['bare']['latency_s']:.3f} s")
            except Exception as error:
                entry["sources"][source] = {"error": f"{type(error).__name__}: {error}"}
                logger.info(f"  {source} {name}: failed ({type(error).__name__}: {error})")
                continue
            if "text_generate" not in entry:  # once per dtype, with the first source that runs
                with torch.inference_mode():
                    entry["text_generate"] = bench_generate(model, bare, inputs, new_tokens, runs, warmup)
            if "mask_decoding" not in report and mask_counts:  # the decoder is fp32 in every dtype: once
                report["mask_decoding"] = bench_mask_counts(model, list(mask_counts), runs, warmup, device)
        bare.detach()
        del model
        gc.collect()
        if partial_output:
            Path(partial_output).write_text(json.dumps(report, indent=2) + "\n")
    for name in dtypes:
        summarise(report["dtypes"][name])
    report["targets_status"] = targets_status(report)
    report["seconds"] = round(time.perf_counter() - started, 1)
    return report


def build_model(config, source: str, model_dir=None):
    """The saved model when `source` is its own, else a random VSM of `config`'s shapes reading `source`."""
    if model_dir and source == config.dense_feature_source:
        return VSMForCausalLM.from_pretrained(model_dir)
    return VSMForCausalLM(type(config).from_dict({**config.to_dict(), "dense_feature_source": source}))


def describe_device(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def summarise(entry: dict) -> None:
    """Adds the bare components' own figures and the sources' ratios to one dtype's entry."""
    sources = {k: v for k, v in entry["sources"].items() if "error" not in v}
    components = {}
    for result in sources.values():
        for name, seconds in result["bare"]["parts_s"].items():
            if name != "other":
                components.setdefault(name, {"latency_s": [], "flops": result["bare"]["flops"].get(name)})["latency_s"].append(seconds)
    for name, component in components.items():
        component["latency_s"] = median(component["latency_s"])
        rate = component["flops"] / component["latency_s"] / 1e9 if component["flops"] and component["latency_s"] else None
        component["gflops_per_s"] = rate
        component["fraction_of_matmul"] = ratio(rate, entry["matmul_gflops"])
    entry["bare_components"] = components
    for result in sources.values():
        result["vsm"]["fraction_of_matmul"] = {k: v / entry["matmul_gflops"] for k, v in result["vsm"]["gflops_per_s"].items()}
    ratios = {}
    for slow, fast in (("sam", "shared"), ("sam", "lm"), ("detector", "shared")):
        if slow in sources and fast in sources:
            vsm = ratio(sources[slow]["vsm"]["latency_s"], sources[fast]["vsm"]["latency_s"])
            bare = ratio(sources[slow]["bare"]["latency_s"], sources[fast]["bare"]["latency_s"])
            ratios[f"{slow}_vs_{fast}"] = {
                "vsm_time": vsm,
                "bare_time": bare,
                "fraction_of_bare": ratio(vsm, bare),
                "vsm_flops": ratio(sources[slow]["vsm"]["flops"]["total"], sources[fast]["vsm"]["flops"]["total"]),
                "bare_flops": ratio(sources[slow]["bare"]["flops"]["total"], sources[fast]["bare"]["flops"]["total"]),
                "vsm_memory": ratio(sources[slow]["vsm"]["peak_memory_bytes"], sources[fast]["vsm"]["peak_memory_bytes"]),
            }
    entry["ratios"] = ratios


def targets_status(report: dict) -> dict:
    """Each target of `TARGETS`, per dtype: the measured value and whether it is met (None: not measured)."""
    status = {}
    for name, entry in report["dtypes"].items():
        rows = {}
        for key in ("sam_vs_shared", "sam_vs_lm"):
            value = entry["ratios"].get(key, {}).get("fraction_of_bare")
            rows[f"{key}_speedup_fraction_of_bare"] = check(value, TARGETS["single_encoder_speedup_fraction_of_bare"], at_least=True)
        for source, result in entry["sources"].items():
            if "error" not in result:
                rows[f"{source}_time_vs_bare"] = check(result["time_vs_bare"], TARGETS["vsm_vs_bare_time"])
                rows[f"{source}_memory_vs_bare"] = check(result["memory_vs_bare"], TARGETS["vsm_vs_bare_memory"])
        generate = entry.get("text_generate")
        rows["generate_vs_bare"] = check(generate and generate["overhead_ratio"], TARGETS["generate_vs_bare"])
        status[name] = rows
    masks = report.get("mask_decoding") or {}
    status["several_masks_auto_vs_k_single"] = {k: check(v["auto_vs_k_single"], 1.0) for k, v in masks.items()}
    return status


def check(value, target, at_least=False) -> dict:
    met = None if value is None else (value >= target if at_least else value <= target)
    return {"value": value, "target": (">= " if at_least else "<= ") + str(target), "met": met}


# ---- plot ---------------------------------------------------------------------------------------


def plot_report(report: dict, path) -> str:
    """A PNG of the latency breakdown (VSM parts next to the bare parts) and peak memory, per source and dtype.
    Uses matplotlib when it is installed (`pip install -e '.[bench]'`), else draws plain bars with PIL."""
    bars = []  # (label, {part: seconds}, weight GB, activation GB)
    for dtype, entry in report["dtypes"].items():
        for source, result in entry["sources"].items():
            if "error" in result:
                continue
            for side in ("vsm", "bare"):
                side_result = result[side]
                peak = side_result["activation_peak_bytes"] or 0
                bars.append((f"{source}\n{side} {dtype}", side_result["parts_s"], side_result["weight_bytes"] / 1e9, peak / 1e9))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return plot_with_pil(bars, path, report["preset"])
    parts = sorted({part for _, seconds, _, _ in bars for part in seconds})
    figure, (time_axis, memory_axis) = plt.subplots(2, 1, figsize=(max(8, 1.1 * len(bars)), 9))
    positions = range(len(bars))
    bottom = [0.0] * len(bars)
    for part in parts:
        values = [seconds.get(part, 0.0) for _, seconds, _, _ in bars]
        time_axis.bar(positions, values, bottom=bottom, label=part)
        bottom = [b + v for b, v in zip(bottom, values)]
    time_axis.set_ylabel("seconds (median)")
    time_axis.set_title(f"vsm bench --preset {report['preset']}: prefill + 1 mask, {report['device']}")
    time_axis.legend(fontsize=8)
    weights = [w for _, _, w, _ in bars]
    memory_axis.bar(positions, weights, label="weights")
    memory_axis.bar(positions, [a for _, _, _, a in bars], bottom=weights, label="activation peak")
    memory_axis.set_ylabel("GB")
    memory_axis.legend(fontsize=8)
    for axis in (time_axis, memory_axis):
        axis.set_xticks(list(positions), [label for label, *_ in bars], fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return "matplotlib"


def plot_with_pil(bars, path, preset) -> str:
    from PIL import Image, ImageDraw

    width, height, margin = max(640, 90 * len(bars)), 520, 40
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((margin, 8), f"vsm bench {preset}: latency (top, s) and memory (bottom, GB)", fill="black")
    colours = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]
    parts = sorted({part for _, seconds, _, _ in bars for part in seconds})
    top_time = max(sum(s.values()) for _, s, _, _ in bars) or 1.0
    top_memory = max(w + a for _, _, w, a in bars) or 1.0
    panel = (height - 3 * margin) // 2
    for index, (label, seconds, weights, activations) in enumerate(bars):
        x = margin + index * (width - 2 * margin) // len(bars)
        y = margin + panel
        for part_index, part in enumerate(parts):
            h = seconds.get(part, 0.0) / top_time * panel
            draw.rectangle([x, y - h, x + 40, y], fill=colours[part_index % len(colours)])
            y -= h
        base = height - margin
        for value, colour in ((weights, colours[0]), (activations, colours[1])):
            h = value / top_memory * panel
            draw.rectangle([x, base - h, x + 40, base], fill=colour)
            base -= h
        draw.text((x, height - margin + 4), label.replace("\n", " ")[:14], fill="black")
    image.save(path)
    return "pil"


def write_report(report: dict, output) -> tuple[Path, Path]:
    """Writes the JSON and, next to it, the PNG plot (same name, `.png`)."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    plot_path = output.with_suffix(".png")
    report["plot"] = {"path": plot_path.name, "backend": plot_report(report, plot_path)}
    output.write_text(json.dumps(report, indent=2) + "\n")
    return output, plot_path
