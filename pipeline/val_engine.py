"""The engine that runs validation's windows while a network trains on the CPU (train.val_backend): the engines of
pipeline/engines.py, applied to weights that change every epoch.

An export through torch.export takes seconds (about 10 s for the study's attention_unet on a 2-core Xeon); a
compile by OpenVINO a fraction of one. So the network is exported once, with its batch norms folded into the
convolutions (as inference runs it); at every later validation the ONNX file's weights are replaced by the
current ones (its initializers are the parameters by name), the engine compiles that file, and one batch of
windows is checked against fp32 PyTorch on the same weights, by engines.py's rule (within TOLERANCE, or twice
PyTorch's own bf16 difference). A refresh that cannot map a weight exports again; one whose check fails leaves
the rest of the run's validations to PyTorch, said in one line.

`auto` runs the first validation in PyTorch and times its batches there; then it exports, times the engines on the
same batch size and the cost of a refresh, and keeps an engine for the run's later validations only where the
batches it saves per validation outweigh that refresh, said in one line with the figures either way.
"""

from __future__ import annotations

import copy
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from attention3d.fusion import fold_batch_norms
from pipeline.engines import CHOICES, TOLERANCE, _best_ms, engine_network, export_onnx
from pipeline.errors import Seg3dError
from pipeline.predict import Predictor

WEIGHT_PREFIX = "net."  # pipeline.export wraps the network as `net` of its logits-only graph
TIMED_BATCHES = 3


class ValidationEngine:
    """Which engine runs the validation windows of one training process; `with engine.use(predictor):` around a
    validation. `notes` gets the lines worth saying (the choice, a fallback)."""

    def __init__(self, backend: str, *, device: torch.device, notes: Callable[[str], None] = print):
        if backend not in CHOICES:
            raise Seg3dError(f"train.val_backend {backend} is not an engine; choose one of {', '.join(CHOICES)}")
        self.notes = notes
        self.backend = backend
        if backend != "torch" and device.type != "cpu":
            notes(f"train.val_backend {backend}: the engines run on the CPU; validation runs in PyTorch on {device}")
            self.backend = "torch"
        self.engine: str | None = None if self.backend == "auto" else self.backend  # auto: chosen after validation 1
        self.folder: Path | None = None
        self.template = None  # the exported ONNX graph, its weights replaced at every refresh
        self.validations = 0
        self.refresh_s: list[float] = []

    def close(self) -> None:
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None

    @contextmanager
    def use(self, predictor: Predictor) -> Iterator[Predictor]:
        """`predictor` with this validation's engine (the current weights) in place of PyTorch, restored after."""
        self.validations += 1
        network = None
        if self.engine not in (None, "torch"):
            try:
                network = self._refresh(predictor)
            except Seg3dError as err:
                self.notes(f"validation: {self.engine}: {err}; this run's validations run in PyTorch")
                self.engine = "torch"
            else:
                if len(self.refresh_s) == 1:  # the first: the export, said once (auto has said its choice)
                    self.notes(
                        f"validation: {self.engine} runs the windows (exported, compiled and checked against PyTorch"
                        f" in {self.refresh_s[0]:.1f} s; later validations refresh its weights)"
                    )
        predictor.engine = network
        try:
            yield predictor
        finally:
            predictor.engine = None
        if self.backend == "auto" and self.engine is None:
            self._choose(predictor)

    # -- the engine on the current weights ----------------------------------------------------------------------

    def _folded(self, predictor: Predictor) -> nn.Module:
        """A copy of the training network as inference runs it: eval mode, fp32 on the CPU, batch norms folded."""
        model = copy.deepcopy(predictor.model).to("cpu").float().eval()
        fold_batch_norms(model)
        return model

    def _refresh(self, predictor: Predictor) -> nn.Module:
        """The engine `self.engine` on the current weights, checked; Seg3dError where it cannot be."""
        start = time.perf_counter()
        model = self._folded(predictor)
        network = self._compiled(self._weights_written(model, predictor), predictor)
        self._check(network, model, predictor)
        self.refresh_s.append(time.perf_counter() - start)
        return network

    def _weights_written(self, model: nn.Module, predictor: Predictor) -> Path:
        """The ONNX file with `model`'s weights: the template's initializers replaced by name, or (the first time,
        or where a weight does not map) a new export."""
        import onnx
        from onnx import numpy_helper

        if self.folder is None:
            self.folder = Path(tempfile.mkdtemp(prefix="seg3d-validation-engine-"))
        path = self.folder / "current.onnx"
        if self.template is not None:
            state = model.state_dict()
            graph = onnx.ModelProto()
            graph.CopyFrom(self.template)
            for init in graph.graph.initializer:
                if not init.name.startswith(WEIGHT_PREFIX):
                    continue  # a constant of the graph itself, not a weight
                tensor = state.get(init.name.removeprefix(WEIGHT_PREFIX))
                if tensor is None or tuple(tensor.shape) != tuple(init.dims):
                    self.template = None  # the graph changed: export again
                    break
                init.CopyFrom(numpy_helper.from_array(tensor.detach().float().numpy(), init.name))
            else:
                onnx.save(graph, str(path))
                return path
        exported = export_onnx(model, predictor.patch_size, predictor.inference.sw_batch_size, self.folder)
        self.template = onnx.load(str(exported))
        shutil.copyfile(exported, path)
        return path

    def _compiled(self, path: Path, predictor: Predictor) -> nn.Module:
        shutil.rmtree(path.parent / "ov", ignore_errors=True)  # last validation's compiled blobs: other weights
        return engine_network(self.engine, path, predictor.inference.sw_batch_size, predictor.dtype)

    def _check(self, network: nn.Module, model: nn.Module, predictor: Predictor) -> None:
        """One batch of windows (fixed seed): the engine's probabilities within engines.py's bar of fp32 PyTorch."""
        batch = predictor.inference.sw_batch_size
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(batch, 1, *predictor.patch_size, generator=generator)
        with torch.no_grad():
            reference = torch.softmax(model(x).float(), dim=1)
            torch_own = torch.softmax(predictor._network(gates=False)(x).float(), dim=1)
            ours = torch.softmax(network(x).float(), dim=1)
        limit = max(TOLERANCE, 2 * float((torch_own - reference).abs().max()))
        difference = float((ours - reference).abs().max())
        if not difference <= limit:
            raise Seg3dError(f"its probabilities differ from PyTorch's by {difference:.2g} (> {limit:.2g})")

    # -- auto: after the first validation ------------------------------------------------------------------------

    def _choose(self, predictor: Predictor) -> None:
        """Keep an engine for the later validations where the batches it saves outweigh its refresh."""
        timed = predictor.last_network  # the first validation's PyTorch network: its batches and seconds
        if timed is None or not timed.calls:
            self.engine = "torch"
            return
        batches, torch_ms = timed.calls, 1000 * timed.seconds / timed.calls
        generator = torch.Generator().manual_seed(0)  # training's own random stream is left alone
        x = torch.randn(predictor.inference.sw_batch_size, 1, *predictor.patch_size, generator=generator)
        start = time.perf_counter()
        try:  # the export, once: what each engine is timed on below is a refresh, as later validations pay
            self._weights_written(self._folded(predictor), predictor)
        except Seg3dError as err:
            self.notes(f"validation stays in PyTorch: {err}")
            self.engine = "torch"
            return
        export_s = time.perf_counter() - start
        figures, why = {}, {}
        for name in ("openvino", "onnxruntime"):
            self.engine = name
            try:
                network = self._refresh(predictor)
            except Seg3dError as err:
                why[name] = str(err)
                continue
            figures[name] = (_best_ms({name: network}, [x] * TIMED_BATCHES)[name], self.refresh_s[-1])
        saved = {name: batches * (torch_ms - ms) / 1000 - refresh for name, (ms, refresh) in figures.items()}
        best = max(saved, key=saved.get, default=None)
        if best is not None and saved[best] > 0:
            ms, refresh = figures[best]
            self.engine = best
            self.notes(
                f"validation: {best} runs the windows from now on ({batches} batches, {torch_ms:.0f} -> {ms:.0f} ms"
                f" each in {best}: {saved[best] + refresh:.1f} s less per validation for a {refresh:.1f} s refresh of"
                f" its weights; exported once in {export_s:.1f} s)"
            )
            return
        self.engine = "torch"
        said = "; ".join(
            [f"{name} {ms:.0f} ms per batch, refresh {refresh:.1f} s" for name, (ms, refresh) in figures.items()]
            + [f"{name}: {reason}" for name, reason in why.items()]
        )
        self.notes(
            f"validation stays in PyTorch ({batches} batch{'es' if batches != 1 else ''} at {torch_ms:.0f} ms each;"
            f" {said}): no engine pays back its refresh"
        )
        self.close()
