"""ONNX export of a trained run's network, checked against PyTorch, and an ONNX Runtime network.

The ONNX graph maps ``image`` (batch, C, *patch) to the full-resolution ``heatmaps`` (batch, K,
*patch) only; the batch axis is dynamic, the spatial axes are the plan's patch (prediction always
feeds patch-sized windows). Export uses the TorchScript-based exporter (``dynamo=False``: no
``onnxscript`` needed), with a few of its translations corrected for the duration of the export
(see :func:`_corrected_translations`). Needs the optional packages ``onnx`` and ``onnxruntime``
(``pip install 'medlandmark[onnx]'``).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from medlandmark.errors import MedlandmarkError
from medlandmark.io.files import atomic_path
from medlandmark.records.run import RunRecord, read_run_record

DEFAULT_OPSET = 17
MIN_OPSET = 15  # CastLike (opset 15) in the floor division; attention needs 14
# Parity tolerance: the largest |torch - onnxruntime| heatmap difference accepted, in units of
# max(1, largest |heatmap|). Float32 reordering gives 1e-7 to 1e-5 on the tested networks; a
# wrongly translated op or a flipped top-k route gives differences of the heatmaps' own size.
PARITY_TOLERANCE = 1e-3
PARITY_BATCH = 2  # > 1 so the check also covers the dynamic batch axis
PARITY_SEED = 0
INPUT_NAME, OUTPUT_NAME = "image", "heatmaps"


class _FullResolution(nn.Module):
    """The network's first (full-resolution) heatmaps only."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x)[0]


def export_onnx(
    run_dir: str | Path, out_path: str | Path, weights: str = "best", opset: int | None = None
) -> dict:
    """Export the run's network (``weights`` = "best" or "final") to ``out_path`` and check that
    ONNX Runtime reproduces PyTorch's heatmaps; returns the parity report."""
    run_dir, out_path = Path(run_dir), Path(out_path)
    opset = DEFAULT_OPSET if opset is None else int(opset)
    if opset < MIN_OPSET:
        raise MedlandmarkError(f"ONNX opset {opset} is too old: {MIN_OPSET} or newer is needed")
    record = read_run_record(run_dir)
    network = run_network(run_dir, record, weights)
    channels = len(record.plan.modalities)
    patch = [int(p) for p in record.plan_configuration.patch_size]
    wrapper = _FullResolution(network).eval()
    with atomic_path(out_path) as tmp:
        _export(wrapper, (1, channels, *patch), tmp, opset, record.arch, out_path)
        try:
            difference, peak = heatmap_difference(wrapper, tmp, (PARITY_BATCH, channels, *patch))
        except MedlandmarkError as error:  # name the file asked for, not the temporary one
            raise MedlandmarkError(
                f"the {record.arch} network was exported but ONNX Runtime cannot run the graph; "
                f"the file was not written ({error.detail})",
                out_path,
            ) from None
        tolerance = PARITY_TOLERANCE * max(1.0, peak)
        if not difference <= tolerance:  # also catches NaN
            raise MedlandmarkError(
                f"ONNX export of the {record.arch} network does not reproduce PyTorch: largest "
                f"heatmap difference {difference:.3g} exceeds {tolerance:.3g} (largest heatmap "
                f"value {peak:.3g}); the file was not written",
                out_path,
            )
    return {
        "onnx_path": str(out_path),
        "opset": opset,
        "input_shape": ["batch", channels, *patch],
        "architecture": record.arch,
        "weights": weights,
        "max_abs_heatmap_difference": difference,
        "max_abs_heatmap": peak,
        "tolerance": tolerance,
    }


def run_network(run_dir: Path, record: RunRecord, weights: str = "best") -> nn.Module:
    """The run's network on the CPU in eval mode, with its ``weights`` ("best" or "final")."""
    from medlandmark.models import load_run_network

    return load_run_network(run_dir, record, weights)


def _export(
    wrapper: nn.Module, shape: tuple[int, ...], path: Path, opset: int, arch: str, out_path: Path
) -> None:
    """Trace ``wrapper`` on a ``shape`` input into ``path`` (dynamic batch axis)."""
    example = torch.randn(shape, generator=torch.Generator().manual_seed(PARITY_SEED + 1))
    axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}
    try:
        with torch.no_grad(), _corrected_translations(opset), warnings.catch_warnings():
            # the exporter's deprecation notice and tracer warnings about shape arithmetic: the
            # traced shapes are the patch's, and the parity check below runs a different batch
            warnings.simplefilter("ignore")
            torch.onnx.export(
                wrapper,
                (example,),
                str(path),
                dynamo=False,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes=axes,
            )
    except Exception as error:  # the exporter raises many types, with the whole graph attached
        reason = (
            str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
        )
        raise MedlandmarkError(
            f"the {arch} network cannot be exported to ONNX (opset {opset}): {reason}", out_path
        ) from None


def heatmap_difference(
    wrapper: nn.Module, onnx_path: Path, shape: tuple[int, ...]
) -> tuple[float, float]:
    """Largest |PyTorch - ONNX Runtime| heatmap difference on a seeded random input of ``shape``,
    and the largest |heatmap| of PyTorch's."""
    generator = torch.Generator().manual_seed(PARITY_SEED)
    x = torch.randn(shape, generator=generator)
    with torch.no_grad():
        expected = wrapper(x).float().numpy()
    [actual] = OnnxNetwork(onnx_path)(x)
    if actual.shape != expected.shape:
        raise MedlandmarkError(
            f"ONNX heatmaps have shape {tuple(actual.shape)}, PyTorch's {expected.shape}", onnx_path
        )
    return float(np.abs(actual.numpy() - expected).max()), float(np.abs(expected).max())


class OnnxNetwork:
    """An exported network run by ONNX Runtime, called like the PyTorch networks for inference:
    ``network(x)`` gives ``[heatmaps]`` (full resolution only) on ``x``'s device."""

    training = False

    def __init__(self, path: str | Path, providers: Sequence[str] | None = None):
        ort = _onnxruntime()
        self.path = Path(path)
        if not self.path.is_file():
            raise MedlandmarkError("ONNX model does not exist", self.path)
        available = ort.get_available_providers()
        if providers is None:
            providers = [
                p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available
            ]
        try:
            self.session = ort.InferenceSession(str(self.path), providers=list(providers))
        except Exception as error:  # onnxruntime raises its own Fail / InvalidProtobuf / ...
            raise MedlandmarkError(
                f"not a usable ONNX model, truncated or corrupt ({str(error).strip()[:300]})",
                self.path,
            ) from None
        [model_input] = self.session.get_inputs()
        self.input_name = model_input.name
        self.input_shape = list(model_input.shape)

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        array = np.ascontiguousarray(x.detach().float().cpu().numpy())
        try:
            [heatmaps] = self.session.run(None, {self.input_name: array})
        except Exception as error:
            raise MedlandmarkError(
                f"ONNX Runtime failed on an input of shape {list(array.shape)} (the model takes "
                f"{self.input_shape}): {str(error).strip()[:300]}",
                self.path,
            ) from None
        return [torch.from_numpy(heatmaps).to(x.device)]

    def eval(self) -> OnnxNetwork:
        return self

    def to(self, *args, **kwargs) -> OnnxNetwork:
        """No-op (the session's providers decide the device); outputs follow the input."""
        return self

    def __repr__(self) -> str:
        return f"OnnxNetwork({str(self.path)!r}, providers={self.session.get_providers()})"


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise MedlandmarkError(
            "ONNX needs the optional packages onnx and onnxruntime: pip install 'medlandmark[onnx]'"
        ) from None
    return onnxruntime


# --- translations of the TorchScript-based exporter corrected for these networks -------------


def _contiguous(g, x, memory_format):
    """Memory layout (channels-last) has no meaning in ONNX: the values are unchanged."""
    return x


def _floor_divide(g, a, b):
    """Floor division (Python ``//``, used in region-size arithmetic on traced shapes); the
    exporter's own truncates, which is wrong for negative operands such as ``-(-n // k)``."""
    double = 11  # TensorProto.DOUBLE: exact for integers below 2**53
    quotient = g.op("Div", g.op("Cast", a, to_i=double), g.op("Cast", b, to_i=double))
    return g.op("CastLike", g.op("Floor", quotient), a)


def _kron(g, a, b):
    """Kronecker product of two matrices: (m, n) x (p, q) -> (m p, n q)."""
    outer = g.op(
        "Mul",
        g.op("Unsqueeze", a, g.op("Constant", value_t=torch.tensor([1, 3]))),
        g.op("Unsqueeze", b, g.op("Constant", value_t=torch.tensor([0, 2]))),
    )
    return g.op("Reshape", outer, g.op("Mul", g.op("Shape", a), g.op("Shape", b)))


def _movedim_symbolic():
    from torch.onnx import symbolic_helper

    @symbolic_helper.parse_args("v", "t", "t")
    def movedim(g, x, source, destination):
        """``movedim`` with negative axes normalised (the exporter's puts -1 into the perm)."""
        rank = x.type().dim()
        sources = [int(s) % rank for s in source.view(-1).tolist()]
        targets = [int(d) % rank for d in destination.view(-1).tolist()]
        return g.op("Transpose", x, perm_i=movedim_permutation(rank, sources, targets))

    return movedim


def movedim_permutation(rank: int, sources: Sequence[int], targets: Sequence[int]) -> list[int]:
    """The permutation ``perm`` with ``x.movedim(sources, targets) == x.permute(perm)``."""
    others = iter(axis for axis in range(rank) if axis not in sources)
    placed = dict(zip(targets, sources, strict=True))
    return [placed[axis] if axis in placed else next(others) for axis in range(rank)]


@contextlib.contextmanager
def _corrected_translations(opset: int) -> Iterator[None]:
    """Register the corrected translations for ``opset``, removing them afterwards.

    Routing attention uses ``torch.kron`` (not translated), channels-last ``contiguous``
    (refused), ``movedim(-1, 1)`` (translated into an invalid Transpose) and ``//`` on traced
    shapes (translated as truncation).
    """
    symbolics = {
        "aten::contiguous": _contiguous,
        "aten::kron": _kron,
        "aten::movedim": _movedim_symbolic(),
        "aten::floordiv": _floor_divide,
        "aten::floor_divide": _floor_divide,
    }
    registered = []
    try:
        for name, symbolic in symbolics.items():
            torch.onnx.register_custom_op_symbolic(name, symbolic, opset)
            registered.append(name)
        yield
    finally:
        for name in registered:
            torch.onnx.unregister_custom_op_symbolic(name, opset)
