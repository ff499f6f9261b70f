"""Networks users actually ship, for trying every command beyond the 8x8 demo.

ResNet-18 and MobileNetV3-small re-stated in plain torch with torchvision's layer layout
(module names and shapes match ``torchvision.models``, so its state dicts load). They
are not imported from torchvision or timm: the registry's torchvision wheels are CUDA
builds that fail to import against the CPU torch (``operator torchvision::nms does not
exist``), and timm imports torchvision at import time (docs/robustness.md).

``build_reference`` trains one briefly on scikit-learn's digits upsampled to
``channels x size x size`` (nothing is downloaded) and writes what a user would bring:
an ONNX file (opset 18, dynamic batch, one ``logits`` output, its own input name), a
TorchScript source and a data file.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from hardening.errors import InputError

INPUT_NAME = "pixel_values"
OUTPUT_NAME = "logits"


def _divisible(v: float, divisor: int = 8) -> int:
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * v else new


class _ConvBNAct(nn.Sequential):
    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1,
                 act: type[nn.Module] | None = nn.ReLU) -> None:
        layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False),
                                   nn.BatchNorm2d(cout)]
        if act is not None:
            layers.append(act())
        super().__init__(*layers)


class _SqueezeExcitation(nn.Module):
    def __init__(self, channels: int, squeeze: int) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.activation = nn.ReLU()
        self.scale_activation = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))
        return x * s


class _InvertedResidual(nn.Module):
    def __init__(self, cin: int, k: int, expanded: int, cout: int, se: bool, hs: bool, stride: int) -> None:
        super().__init__()
        act = nn.Hardswish if hs else nn.ReLU
        self.use_res_connect = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expanded != cin:
            layers.append(_ConvBNAct(cin, expanded, 1, act=act))
        layers.append(_ConvBNAct(expanded, expanded, k, stride, groups=expanded, act=act))
        if se:
            layers.append(_SqueezeExcitation(expanded, _divisible(expanded // 4)))
        layers.append(_ConvBNAct(expanded, cout, 1, act=None))
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return x + y if self.use_res_connect else y


# torchvision's mobilenet_v3_small: (in, kernel, expanded, out, SE, hardswish, stride)
_MNV3_SMALL = [
    (16, 3, 16, 16, True, False, 2), (16, 3, 72, 24, False, False, 2), (24, 3, 88, 24, False, False, 1),
    (24, 5, 96, 40, True, True, 2), (40, 5, 240, 40, True, True, 1), (40, 5, 240, 40, True, True, 1),
    (40, 5, 120, 48, True, True, 1), (48, 5, 144, 48, True, True, 1), (48, 5, 288, 96, True, True, 2),
    (96, 5, 576, 96, True, True, 1), (96, 5, 576, 96, True, True, 1),
]


class MobileNetV3Small(nn.Module):
    """torchvision's ``mobilenet_v3_small``: 1.5 M parameters at 10 classes and width 1.0;
    ``width_mult`` scales every channel count as torchvision's does (0.5: the half-width
    student ``edgeward harden`` distils into)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width_mult: float = 1.0) -> None:
        super().__init__()

        def w(c: int) -> int:
            return c if width_mult == 1.0 else _divisible(c * width_mult)

        cfgs = [(w(cin), k, w(exp), w(cout), se, hs, st) for cin, k, exp, cout, se, hs, st in _MNV3_SMALL]
        last_in = cfgs[-1][3]
        layers: list[nn.Module] = [_ConvBNAct(in_channels, cfgs[0][0], 3, 2, act=nn.Hardswish)]
        layers += [_InvertedResidual(*cfg) for cfg in cfgs]
        layers.append(_ConvBNAct(last_in, 6 * last_in, 1, act=nn.Hardswish))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(6 * last_in, w(1024)), nn.Hardswish(), nn.Dropout(0.2),
                                        nn.Linear(w(1024), num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                           if stride != 1 or cin != cout else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return self.relu(out + identity)


class ResNet18(nn.Module):
    """torchvision's ``resnet18`` (7x7 stem, max-pool, [2, 2, 2, 2] basic blocks): 11.2 M parameters."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        widths, cin = (64, 128, 256, 512), 64
        for i, w in enumerate(widths, start=1):
            stride = 1 if i == 1 else 2
            setattr(self, f"layer{i}", nn.Sequential(_BasicBlock(cin, w, stride), _BasicBlock(w, w, 1)))
            cin = w
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


REFERENCE_ARCHITECTURES: dict[str, type[nn.Module]] = {
    "resnet18": ResNet18,
    "mobilenet_v3_small": MobileNetV3Small,
}


def upsampled_digits(size: int, channels: int = 3, seed: int = 0) -> dict[str, np.ndarray]:
    """scikit-learn's 8x8 digits (all 10 classes) bilinearly resized to ``size``, each channel
    a differently weighted copy so the channels are not identical; values in [0, 1]. Splits
    as the demo's: train 45% / cal 20% / test 20% / thief 15%, stratified."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.from_numpy((d.data / 16.0).astype(np.float32).reshape(-1, 1, 8, 8))
    x = nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    weights = torch.linspace(1.0, 0.6, channels).view(1, channels, 1, 1)
    x_np = (x * weights).clamp(0.0, 1.0).numpy().astype(np.float32)
    y = d.target.astype(np.int64)
    x_tr, x_rest, y_tr, y_rest = train_test_split(x_np, y, train_size=0.45, stratify=y, random_state=seed)
    x_cal, x_rest, y_cal, y_rest = train_test_split(x_rest, y_rest, train_size=20 / 55, stratify=y_rest,
                                                    random_state=seed)
    x_te, x_th, y_te, _ = train_test_split(x_rest, y_rest, train_size=20 / 35, stratify=y_rest, random_state=seed)
    return {"x_train": x_tr, "y_train": y_tr, "x_cal": x_cal, "y_cal": y_cal, "x": x_te, "y": y_te, "x_thief": x_th}


@dataclass(frozen=True)
class ReferenceModel:
    arch: str
    model_path: str
    torchscript_path: str
    data_path: str
    input_shape: tuple[int, ...]
    parameters: int
    test_accuracy: float
    train_seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def _train(model: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(xt), generator=g).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
    return model.eval()


def _export(model: nn.Module, sample: np.ndarray, path: Path) -> None:
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    batch = torch.export.Dim("batch", min=1, max=4096)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(model, (torch.from_numpy(sample[:2]),), input_names=[INPUT_NAME],
                                 output_names=[OUTPUT_NAME], dynamic_shapes=({0: batch},), dynamo=True,
                                 external_data=False, opset_version=18, verbose=False)
        prog.save(str(path), external_data=False)


def build_reference(arch: str, out_dir: str | Path, size: int, channels: int = 3, epochs: int = 8,
                    seed: int = 0) -> ReferenceModel:
    """Train ``arch`` briefly (``epochs`` passes, seeded) and write ``model.onnx``,
    ``model.ts`` (TorchScript) and ``data.npz`` to ``out_dir``, plus ``reference.json``."""
    if arch not in REFERENCE_ARCHITECTURES:
        raise InputError(f"unknown reference architecture {arch!r}; choose from "
                         f"{', '.join(REFERENCE_ARCHITECTURES)}")
    from hardening.data import dataset_from_arrays, save_dataset

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    splits = upsampled_digits(size, channels, seed)
    model = REFERENCE_ARCHITECTURES[arch](num_classes=10, in_channels=channels)
    t0 = time.perf_counter()
    model = _train(model, splits["x_train"], splits["y_train"], epochs, seed)
    train_s = time.perf_counter() - t0
    with torch.no_grad():
        pred = torch.cat([model(b).argmax(1) for b in torch.from_numpy(splits["x"]).split(128)]).numpy()
    acc = float((pred == splits["y"]).mean())
    model_path, ts_path, data_path = out / "model.onnx", out / "model.ts", out / "data.npz"
    _export(model, splits["x"], model_path)
    torch.jit.save(torch.jit.trace(model, torch.from_numpy(splits["x"][:2])), str(ts_path))
    save_dataset(data_path, dataset_from_arrays(splits, src=str(data_path)))
    ref = ReferenceModel(arch, str(model_path), str(ts_path), str(data_path), (channels, size, size),
                         sum(p.numel() for p in model.parameters()), acc, round(train_s, 1))
    (out / "reference.json").write_text(json.dumps(ref.to_dict(), indent=2))
    return ref
