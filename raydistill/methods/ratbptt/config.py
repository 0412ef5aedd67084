"""RaT-BPTT's config section (`ratbptt:`) and its checks."""

from __future__ import annotations

from dataclasses import dataclass

from raydistill.config.checks import choice, in_range, positive
from raydistill.config.errors import ConfigError

WINDOW_MODES = ("random", "end", "fixed", "full", "random_length")
INNER_OPTIMIZERS = ("adam", "sgd")
PRECISIONS = ("float32", "bf16")


@dataclass
class RatBpttConfig:
    unroll: int = 200  # T: inner steps from a fresh init to the meta-loss
    window: int = 60  # W: the last steps of a sampled window are back-propagated through
    window_mode: str = "random"
    fixed_start: int = 0  # the window start for window_mode=fixed
    inner_optimizer: str = "adam"
    inner_lr: float = 1e-3
    inner_momentum: float = 0.9  # sgd only
    batch_per_class: int | None = None  # None: every synthetic image of a chosen class
    classes_per_step: int | None = None  # None: every class
    real_batch: int = 256
    # Speed options (only precision changes the function differentiated; see benchmarks/README.md for what each
    # one buys):
    channels_last: bool = False  # ConvNormReLU convolutions in NHWC, norms in NCHW (slower on the 2-core CPU)
    # >1: keep only the inner state at k segment starts and recompute each segment's graph during the backward pass
    # (window memory ~W/k + k states instead of W; about one more forward of the window in time). Validated <= window;
    # a run-time window shorter than k (only possible unvalidated) uses one step per segment.
    window_segments: int = 1
    # >1: the meta-loss's real batch runs forward/backward in this many chunks whose gradients are accumulated into
    # the same meta-gradient: real-batch activation memory / chunks, the same gradient to float rounding. Validated
    # <= real_batch
    real_batch_chunks: int = 1
    # float32 | bf16: the window's and the meta-loss's forward passes under torch.autocast(bfloat16) on the images'
    # device type (the prefix stays float32); changes the numerics: cosine to the float32 gradient > 0.99 in
    # tests/unit/test_window_options.py (0.96-0.97 for an Adam window from step 0). For GPUs: 4-5x slower on a CPU
    # without bf16 instructions
    precision: str = "float32"
    # >1: each gradient task draws this many independent samples (own network, minibatches, augmentations and
    # window start) and runs them as one batched computation (torch.func.vmap over stacked networks); the task
    # returns their mean, so the parameter server still averages per sample. A GPU lever at small IPC; slower on CPU
    # (benchmarks/README.md). Float32 windows of a fixed length only, without checkpointing, real-batch chunks or NHWC
    # convolutions.
    samples_per_task: int = 1
    # The prefix's inner steps (forward and first-order backward) through torch.compile, once per process and network
    # shape (compiled.py); the window cannot be compiled (no double backward). Needs inductor's compiler (a C++
    # compiler on CPU, Triton on GPU); the first step pays the compile time. Float32 rounding only
    compile_prefix: bool = False


def validate_section(r: RatBpttConfig, norm: str | None = None) -> None:
    """The section's own checks; `norm` (the config's model.norm, when known) for what samples_per_task excludes."""
    positive(r.unroll, "ratbptt.unroll")
    positive(r.window, "ratbptt.window")
    choice(r.window_mode, WINDOW_MODES, "ratbptt.window_mode")
    choice(r.inner_optimizer, INNER_OPTIMIZERS, "ratbptt.inner_optimizer")
    if r.window > r.unroll:
        raise ConfigError(
            f"ratbptt.window: window {r.window} > unroll {r.unroll}; set window <= unroll "
            "(the window is the back-propagated tail of the unroll)"
        )
    if r.window_mode == "fixed":
        if r.fixed_start < 0:
            raise ConfigError(f"ratbptt.fixed_start: must be >= 0, got {r.fixed_start}")
        if r.fixed_start + r.window > r.unroll:
            raise ConfigError(
                f"ratbptt.fixed_start: fixed_start {r.fixed_start} + window {r.window} > unroll {r.unroll}; "
                f"set fixed_start <= {r.unroll - r.window}"
            )
    positive(r.inner_lr, "ratbptt.inner_lr")
    in_range(r.inner_momentum, 0, 1, "ratbptt.inner_momentum")
    if r.batch_per_class is not None:
        positive(r.batch_per_class, "ratbptt.batch_per_class")
    if r.classes_per_step is not None:
        positive(r.classes_per_step, "ratbptt.classes_per_step")
    positive(r.real_batch, "ratbptt.real_batch")
    if isinstance(r.window_segments, bool) or not isinstance(r.window_segments, int) or r.window_segments < 1:
        raise ConfigError(
            f"ratbptt.window_segments: must be an integer >= 1, got {r.window_segments!r}; "
            "use 1 for no checkpointing, k > 1 to recompute the window in k segments"
        )
    if r.window_segments > r.window:
        raise ConfigError(
            f"ratbptt.window_segments: {r.window_segments} segments > window {r.window}; "
            f"set window_segments <= {r.window} (each segment holds at least one inner step)"
        )
    chunks = r.real_batch_chunks
    if isinstance(chunks, bool) or not isinstance(chunks, int) or chunks < 1:
        raise ConfigError(
            f"ratbptt.real_batch_chunks: must be an integer >= 1, got {chunks!r}; "
            "use 1 for one real batch, k > 1 to run the meta-loss's real batch in k chunks"
        )
    if chunks > r.real_batch:
        raise ConfigError(
            f"ratbptt.real_batch_chunks: {chunks} chunks > real_batch {r.real_batch}; "
            f"set real_batch_chunks <= {r.real_batch} (each chunk holds at least one real image)"
        )
    choice(r.precision, PRECISIONS, "ratbptt.precision")
    if not isinstance(r.compile_prefix, bool):
        raise ConfigError(f"ratbptt.compile_prefix: must be true or false, got {r.compile_prefix!r}")
    if r.compile_prefix and norm == "batch":
        raise ConfigError("ratbptt.compile_prefix: does not combine with model.norm batch (the compiled prefix would "
                          "update another module's running statistics); set compile_prefix: false or another norm")
    validate_samples(r, norm)


def validate_samples(r: RatBpttConfig, norm: str | None = None) -> None:
    """`samples_per_task` and what it combines with (`norm`: the config's model.norm, when known)."""
    k = r.samples_per_task
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"ratbptt.samples_per_task: must be an integer >= 1, got {k!r}; use 1 for one sample a task")
    if k == 1:
        return
    clashes = [(r.window_mode == "random_length", "window_mode random_length (windows of different lengths)"),
               (r.window_segments > 1, "window_segments > 1"), (r.real_batch_chunks > 1, "real_batch_chunks > 1"),
               (r.precision != "float32", f"precision {r.precision}"),
               (r.channels_last, "channels_last"), (norm == "batch", "model.norm batch (running statistics)"),
               (r.compile_prefix, "compile_prefix")]
    for clash, what in clashes:
        if clash:
            raise ConfigError(f"ratbptt.samples_per_task: {k} samples per task do not combine with {what}; "
                              "set samples_per_task: 1 or change that option")


def validate_against_data(r: RatBpttConfig, ipc: int, num_train: int, num_classes: int) -> None:
    if r.real_batch > num_train:
        raise ConfigError(
            f"ratbptt.real_batch: {r.real_batch} is larger than the training split ({num_train} images); "
            f"set ratbptt.real_batch <= {num_train}"
        )
    if r.classes_per_step is not None and r.classes_per_step > num_classes:
        raise ConfigError(
            f"ratbptt.classes_per_step: {r.classes_per_step} > {num_classes} classes; set it <= {num_classes}"
        )
    if r.batch_per_class is not None and r.batch_per_class > ipc:
        raise ConfigError(f"ratbptt.batch_per_class: {r.batch_per_class} > ipc {ipc}; set it <= {ipc}")
