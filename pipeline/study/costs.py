"""What a variant costs, measured on the study's own device: parameters, FLOPs of one patch, milliseconds per
sliding window at inference, seconds per training iteration and the peak memory of one training step.

Each number is measured the way the pipeline itself runs the network, so that a gain in Dice can be set against
what it really costs there: the network built as training builds it (pipeline/rank_setup.py), inference in eval
mode under no_grad at the precision `seg3d infer` resolves by default ("auto") with the bundle predictor's layout
(channels-last on CPU, batch norms folded: Predictor.from_bundle), and a training step with the training loss
(pipeline/losses.py, the variant's auxiliary outputs included), its optimiser, grad scaler and clipping
(pipeline/epochs.py). Times are medians of `repeats` runs after one warm-up; random inputs, as the time of a
dense 3D network does not depend on the values it sees.
"""

from __future__ import annotations

import contextlib
import copy
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from attention3d.fusion import fold_batch_norms
from pipeline.config import Config
from pipeline.devices import autocast, resolve_device, resolve_precision
from pipeline.errors import Seg3dError
from pipeline.losses import SegLoss
from pipeline.optimizer import build_optimizer
from pipeline.rank_setup import torch_settings_restored
from pipeline.summary import build, count_parameters, forward_flops

COST_KEYS = ("parameters", "gflops_per_patch", "ms_per_window", "train_s_per_iteration", "peak_train_mib")


def build_network(cfg: Config, num_classes: int) -> nn.Module:
    """The network of `cfg` as training builds it: one CT channel in, `num_classes` outputs (background included)."""
    return build(cfg.model.name, spatial_dims=3, in_channels=1, out_channels=num_classes, **cfg.model.overrides())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_seconds(step: Callable[[], object], *, device: torch.device, repeats: int) -> float:
    step()  # warm-up: kernels chosen, memory pools and optimiser state allocated
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _inference_network(model: nn.Module, device: torch.device) -> tuple[nn.Module, bool]:
    """A copy of `model` laid out as Predictor.from_bundle runs it: eval mode, batch norms folded into the
    convolutions, channels-last weights on the CPU. Returns it and whether its inputs go channels-last."""
    net = copy.deepcopy(model).eval()
    if any(isinstance(m, _BatchNorm) for m in net.modules()):
        fold_batch_norms(net)
    channels_last = device.type == "cpu"
    if channels_last:
        net.to(memory_format=torch.channels_last_3d)
    return net, channels_last


def _window_seconds(model: nn.Module, cfg: Config, *, device: torch.device, repeats: int) -> float:
    """Seconds per window: a batch of inference.sw_batch_size windows through the network, divided by the batch."""
    net, channels_last = _inference_network(model, device)
    dtype = resolve_precision("auto", device)
    batch = cfg.inference.sw_batch_size
    x = torch.randn(batch, 1, *cfg.data.patch_size, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)

    @torch.no_grad()
    def forward() -> torch.Tensor:
        with autocast(device, dtype):
            return net(x).float()

    return _median_seconds(forward, device=device, repeats=repeats) / batch


class _TrainStep:
    """One training iteration as pipeline/epochs.py runs it, on a fixed random batch."""

    def __init__(self, model: nn.Module, cfg: Config, *, num_classes: int, device: torch.device):
        self.model, self.cfg, self.device = model.train(), cfg, device
        self.dtype = resolve_precision(cfg.train.precision, device)
        if self.dtype == torch.float16 and device.type != "cuda":
            raise Seg3dError("train.precision=fp16 needs a CUDA device; use bf16 or fp32 on CPU")
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.dtype == torch.float16)
        total = cfg.train.epochs * cfg.train.iterations_per_epoch
        self.optimizer, _ = build_optimizer(cfg, model, total_steps=total)
        self.loss_fn = SegLoss(cfg, model.aux_outputs, num_classes)
        shape = (cfg.train.batch_size, 1, *cfg.data.patch_size)
        self.image = torch.randn(shape, device=device)
        self.label = torch.randint(0, num_classes, shape, device=device)

    def __call__(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device, self.dtype):
            outputs = self.model(self.image)
        loss = self.loss_fn(outputs, self.label)
        self.scaler.scale(loss).backward()
        if self.cfg.train.grad_clip:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def resident_bytes(self) -> int:
        """Bytes of what lives across steps: parameters, buffers, optimiser state and the batch."""
        tensors = [*self.model.parameters(), *self.model.buffers(), self.image, self.label]
        for state in self.optimizer.state.values():
            tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
        return sum(t.numel() * t.element_size() for t in tensors)


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """File descriptor 2 sent to /dev/null: the profiler's C++ library writes a start and a stop line there that no
    setting turns off. The step inside ran twice before without a word, so nothing worth reading is lost."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _cpu_step_peak_bytes(step: _TrainStep) -> int:
    """Peak bytes of one training step on the CPU: what lives across steps plus the highest net growth of tensor
    allocations during the step, from the allocation and free events torch.profiler records. (The process's
    resident set says little here: the C allocator keeps freed memory, so a second step barely grows it.)"""
    from torch.profiler import ProfilerActivity, profile

    step.optimizer.zero_grad(set_to_none=True)  # gradients are freed inside the step, so allocated inside it
    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [
        e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]" and e.device_type().name == "CPU"
    ]
    growth = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        growth += event.nbytes()  # negative for a free
        peak = max(peak, growth)
    return step.resident_bytes() + peak


def _step_peak_mib(step: _TrainStep) -> float:
    device = step.device
    if device.type == "cuda":
        step.optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) / 2**20
    return _cpu_step_peak_bytes(step) / 2**20


def measure_costs(
    cfg: Config, *, num_classes: int, device: str | torch.device = "cpu", repeats: int = 3
) -> dict[str, float]:
    """The costs of `cfg`'s network on `device` (COST_KEYS): parameters; GFLOPs of one eval-mode forward of one
    patch of data.patch_size (torch's FlopCounterMode, a multiply-add = 2 FLOPs); milliseconds per window (median
    of `repeats` forwards of inference.sw_batch_size windows, divided by that batch); training seconds per
    iteration at train.batch_size (median of `repeats` steps); the peak memory of one training step in MiB
    (torch.cuda.max_memory_allocated on CUDA; on CPU, what the step's tensors occupy at most: parameters,
    optimiser state, batch, activations and gradients). `num_classes` counts the background. The caller's random
    state, thread count and cuDNN flags are left as they were; train.threads applies while measuring."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    device = resolve_device(device)
    with torch_settings_restored(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        torch.manual_seed(cfg.train.seed)
        model = build_network(cfg, num_classes).to(device)
        parameters = count_parameters(model)
        flops = forward_flops(model, torch.zeros(1, 1, *cfg.data.patch_size, device=device))
        window_s = _window_seconds(model, cfg, device=device, repeats=repeats)
        step = _TrainStep(model, cfg, num_classes=num_classes, device=device)
        train_s = _median_seconds(step, device=device, repeats=repeats)
        peak_mib = _step_peak_mib(step)
        del step, model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {
        "parameters": float(parameters),
        "gflops_per_patch": flops / 1e9,
        "ms_per_window": window_s * 1e3,
        "train_s_per_iteration": train_s,
        "peak_train_mib": peak_mib,
    }
