"""FID and KID through clean-fid, and Frechet distances in any other feature space.

    python eval/fid.py GEN_DIR REF_DIR                       # FID (+ --kid), Inception, clean-fid resizing
    python eval/fid.py GEN_DIR ref_stats.npz                 # FID against reference statistics (mu, sigma)
    python eval/fid.py GEN_DIR --features digits             # FD-digits against the 1,797 real digits
    python eval/fid.py GEN_DIR REF_DIR --features mypkg.feats:make_net --resize 64

Features (``--features``):
  inception      clean-fid's Inception (inception-2015-12-05.pt), images resized to 299 with clean-fid's
                 mode="clean" (PIL bicubic, float). The result is FID. The weights are never downloaded:
                 ``--inception PATH``, env ``FEWSTEP_INCEPTION``, or clean-fid's own cache file.
  digits         the bundled DigitsNet; the result is FD-digits, which is NOT FID (other network, other
                 scale; only comparable with other FD-digits numbers).
  module:name    ``name`` is an nn.Module/callable, or a factory returning one, that maps float images
                 B x 3 x H x W in [0, 255] to features B x D. Images keep their size unless ``--resize N``.

The Frechet distance is computed here from the features (float64, scipy sqrtm without clean-fid's
deprecated ``disp`` argument); KID is clean-fid's ``kernel_distance`` on the same features, which works for
every feature network (clean-fid's ``compute_kid`` has no custom-extractor hook). Always CPU when there
is no CUDA, and ``num_workers=0`` (clean-fid defaults to 12 workers and cuda).

Before any model loads, every image folder (or .zip) is checked: one that holds no image, or an image that
cannot be read, ends the run with a one-line ``error:`` naming it (exit status 2).
"""
from __future__ import annotations

import argparse
import functools
import importlib
import json
import os
import platform
import sys
import tempfile
import zipfile
from pathlib import Path

INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/" + INCEPTION_FILE
REAL_DIGITS = "digits"
# the files clean-fid reads from a folder (cleanfid.utils.EXTENSIONS), copied so that folders are checked
# before torch is imported
EXTENSIONS = {"bmp", "jpg", "jpeg", "pgm", "png", "ppm", "tif", "tiff", "webp", "npy", "JPEG", "JPG", "PNG"}


class MissingWeights(Exception):
    """A weights file that is never downloaded at run time is absent."""


class BadImages(ValueError):
    """An image folder that holds no image, or an image that cannot be read."""


def cleanfid_cache() -> Path:
    # the folder clean-fid hard-codes for its Inception file (cleanfid/features.py: "./" on Windows, else /tmp)
    return Path("./" if platform.system() == "Windows" else "/tmp") / INCEPTION_FILE


def find_inception(path: str | None = None) -> Path:
    """The Inception torchscript file from ``path``, ``$FEWSTEP_INCEPTION`` or clean-fid's cache (a file or a
    folder holding it). Raises MissingWeights with a one-line message when it is absent."""
    given = path or os.environ.get("FEWSTEP_INCEPTION")
    candidate = Path(given) if given else cleanfid_cache()
    if candidate.is_dir():
        candidate = candidate / INCEPTION_FILE
    if candidate.is_file():
        return candidate
    where = f"{candidate} (from {'--inception' if path else 'FEWSTEP_INCEPTION'})" if given else str(candidate)
    raise MissingWeights(
        f"error: Inception weights {INCEPTION_FILE} not found at {where}; nothing is downloaded: fetch "
        f"{INCEPTION_URL} elsewhere and pass --inception PATH, set FEWSTEP_INCEPTION=PATH or copy it to "
        f"{cleanfid_cache()} (or use --features digits for FD-digits, which is not FID)")


def is_zip(path: Path) -> bool:
    return ".zip" in str(path) and path.is_file()     # clean-fid's own test, on a file


def image_files(path: Path, num: int | None = None) -> list[str]:
    """The images clean-fid reads from a folder (recursively) or a .zip, in its order; the first ``num``."""
    if is_zip(path):
        with zipfile.ZipFile(path) as z:
            files = sorted(n for n in set(z.namelist()) if os.path.splitext(n)[1].lower()[1:] in EXTENSIONS)
    else:
        files = sorted(str(f) for ext in EXTENSIONS for f in path.glob(f"**/*.{ext}"))
    return files[:num] if num is not None else files


def why_unreadable(open_file, name: str) -> str | None:
    """None when the image decodes as clean-fid will read it, else the reason (PIL verify: header and, for
    PNG, every chunk's checksum, without decoding the pixels)."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    try:
        with open_file(name) as f:
            if name.endswith(".npy"):
                np.load(f)
            else:
                with Image.open(f) as im:
                    im.verify()
    except UnidentifiedImageError:
        return "not an image PIL can read"
    except Exception as e:   # truncated or corrupt files raise OSError, SyntaxError, ValueError, ... by format
        return f"{type(e).__name__}: {e}"
    return None


def check_images(path: Path, role: str, num: int | None = None) -> int:
    """The number of images in ``path``; raises BadImages (a one-line message) when it holds none, or when one
    of them cannot be read, naming the first and counting the others."""
    if path.is_file() and not is_zip(path):
        raise BadImages(f"error: {role} {path} is a file; pass a folder of images or a .zip of images")
    files = image_files(path, num)
    if not files:
        kinds = ", .".join(sorted({e.lower() for e in EXTENSIONS}))
        fix = "generate some first, e.g. with eval/generate.py" if role == "generated" else \
            "pass the folder of real images (or a statistics .npz)"
        raise BadImages(f"error: {role} folder {path} holds no images (.{kinds} files); {fix}")
    if is_zip(path):
        with zipfile.ZipFile(path) as z:
            bad = [(n, why) for n in files if (why := why_unreadable(z.open, n))]
    else:
        bad = [(n, why) for n in files if (why := why_unreadable(functools.partial(open, mode="rb"), n))]
    if bad:
        (name, why), more = bad[0], f" (and {len(bad) - 1} more unreadable)" if len(bad) > 1 else ""
        where = f"{name} in {path}" if is_zip(path) else name
        raise BadImages(f"error: {role} image {where} cannot be read: {why}{more}; delete or replace it "
                        "(eval/generate.py regenerates missing images)")
    return len(files)


def inception_extractor(weights: Path, device):
    """clean-fid's InceptionV3W (expects 299 x 299 inputs in [0, 255]), loaded without a download attempt."""
    from cleanfid.inception_torchscript import InceptionV3W

    folder = weights.parent
    if weights.name != INCEPTION_FILE:   # InceptionV3W only takes a folder holding the canonical file name
        folder = Path(tempfile.mkdtemp(prefix="fewstep-inception-"))
        (folder / INCEPTION_FILE).symlink_to(weights.resolve())
    return InceptionV3W(str(folder), download=False).to(device).eval()


class DigitsFeatures:
    """[0, 255] RGB batches -> DigitsNet penultimate features (grey = channel mean, scaled to [-1, 1])."""

    def __init__(self):
        from fewstep.digits import metrics

        self.metrics, self.net = metrics, metrics.load_digits_net()

    def __call__(self, x):
        grey = x.float().mean(1, keepdim=True) / 127.5 - 1.0
        return self.metrics.extract_features(grey, self.net)


def import_features(spec: str):
    """``module:name`` -> feature network (an nn.Module instance is used as is, anything else is called)."""
    import torch

    module, _, name = spec.partition(":")
    if not name:
        raise ValueError(f"--features {spec!r}: expected inception, digits or module:callable")
    obj = getattr(importlib.import_module(module), name)
    net = obj if isinstance(obj, torch.nn.Module) else obj()
    return net.eval() if isinstance(net, torch.nn.Module) else net


def float_identity(img):
    # clean-fid's hook must return uint8 or float32 (anything else crashes inside clean-fid)
    import numpy as np

    return np.asarray(img, dtype=np.float32)


def make_features(features, device, inception: str | None = None, resize: int | None = None):
    """(extractor, custom_fn_resize for clean-fid, metric name)."""
    from cleanfid.resize import make_resizer

    sized = make_resizer("PIL", False, "bicubic", (resize, resize)) if resize else float_identity
    if callable(features):
        return features, sized, "FD (custom features)"
    if features == "inception":
        return inception_extractor(find_inception(inception), device), None, "FID"
    if features == "digits":
        return DigitsFeatures(), float_identity, "FD-digits"
    return import_features(features), sized, f"FD ({features} features)"


def pre_resizer(size: int | None):
    """Protocol downsampling before feature extraction (e.g. 512 -> 256 for COCO-30k): PIL bicubic, then
    8-bit rounding, as if the images had been saved at ``size``; None keeps images as they are."""
    if not size:
        return None
    from cleanfid.resize import make_resizer

    return make_resizer("PIL", True, "bicubic", (size, size))


def folder_features(path: Path, extractor, fn_resize, device, batch_size: int = 64, num=None, verbose=True,
                    pre_resize: int | None = None):
    """Features of every image in a folder (or zip) through clean-fid's loader and resizing."""
    from cleanfid.fid import get_folder_features

    return get_folder_features(str(path), model=extractor, num_workers=0, num=num, batch_size=batch_size,
                               device=device, mode="clean", custom_fn_resize=fn_resize,
                               description=f"features {path.name}: ", verbose=verbose,
                               custom_image_tranform=pre_resizer(pre_resize))


def generator_features(G, extractor, fn_resize, device, num_gen: int, z_dim: int, batch_size: int = 64,
                       verbose=True, pre_resize: int | None = None):
    """Features of ``num_gen`` images from ``G(z)`` (B x 3 x H x W in [0, 255]) through clean-fid."""
    from cleanfid.fid import get_model_features

    return get_model_features(G, extractor, mode="clean", z_dim=z_dim, num_gen=num_gen, batch_size=batch_size,
                              device=device, verbose=verbose, custom_fn_resize=fn_resize,
                              custom_image_tranform=pre_resizer(pre_resize))


def reference(ref, metric: str, extractor, fn_resize, device, batch_size, verbose, pre_resize=None):
    """(mu, sigma, feats or None) of the reference: a folder, a statistics .npz, or the real digits."""
    import numpy as np

    from fewstep.digits import metrics

    if ref == REAL_DIGITS:
        if metric != "FD-digits":
            raise ValueError("the real-digits reference needs --features digits")
        from fewstep.digits.data import load_digits

        x0, _ = load_digits(metrics.IMAGE_SIZE)
        feats = metrics.extract_features(x0).numpy()
        return (*metrics.feature_stats(feats), feats)
    ref = Path(ref)
    if ref.suffix == ".npz":
        stats = np.load(ref)
        saved = str(stats["metric"]) if "metric" in stats else "FID"
        if saved != metric:
            raise ValueError(f"{ref} holds {saved} statistics; it cannot be the reference for {metric}")
        return stats["mu"], stats["sigma"], stats["feats"] if "feats" in stats else None
    feats = folder_features(ref, extractor, fn_resize, device, batch_size, verbose=verbose, pre_resize=pre_resize)
    return (*metrics.feature_stats(feats), feats)


def distances(feats, ref_stats, kid: bool = False, kid_seed: int = 0) -> dict:
    """Frechet distance (float64, own implementation) and optionally KID from features."""
    import numpy as np

    from fewstep.digits import metrics

    mu_r, sigma_r, feats_r = ref_stats
    out = {"frechet_distance": metrics.frechet_distance(*metrics.feature_stats(feats), mu_r, sigma_r),
           "num_images": int(len(feats))}
    if kid:
        if feats_r is None:
            raise ValueError("KID needs reference features; the .npz holds only mu and sigma (save it with "
                             "--save-stats, which stores features too)")
        from cleanfid.fid import kernel_distance

        np.random.seed(kid_seed)   # clean-fid draws its KID subsets from numpy's global RNG
        out["kid"] = kernel_distance(np.asarray(feats, np.float64), np.asarray(feats_r, np.float64))
    return out


def device_for(name: str | None = None):
    import torch

    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def compute(gen, ref=None, features="inception", kid=False, inception=None, resize=None, batch_size=64,
            num=None, device=None, verbose=False, save_stats=None, pre_resize=None) -> dict:
    """Python entry point. ``gen``: an image folder or ``(G, num_gen, z_dim)``; ``ref``: a folder, a .npz, or
    ``"digits"`` (default for --features digits). Returns the metric name, its value and optionally KID."""
    device = device_for(device)
    extractor, fn_resize, metric = make_features(features, device, inception, resize)
    ref = REAL_DIGITS if ref is None and metric == "FD-digits" else ref
    if isinstance(gen, tuple):
        feats = generator_features(gen[0], extractor, fn_resize, device, gen[1], gen[2], batch_size, verbose,
                                   pre_resize)
    else:
        feats = folder_features(Path(gen), extractor, fn_resize, device, batch_size, num, verbose, pre_resize)
    if save_stats is not None:
        import numpy as np

        from fewstep.digits import metrics

        mu, sigma = metrics.feature_stats(feats)
        np.savez(save_stats, mu=mu, sigma=sigma, feats=feats, metric=metric)
    result = {"metric": metric, "features": features if isinstance(features, str) else "custom"}
    if ref is not None:
        d = distances(feats, reference(ref, metric, extractor, fn_resize, device, batch_size, verbose,
                                       pre_resize), kid)
        result.update(value=d.pop("frechet_distance"), **d)
    return result


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("gen", nargs="?", help="folder (or .zip) of generated images")
    p.add_argument("ref", nargs="?", help="reference folder, statistics .npz, or 'digits' (the real digits; "
                   "the default with --features digits)")
    p.add_argument("--features", default="inception", help="inception (FID), digits (FD-digits) or module:callable")
    p.add_argument("--inception", default=None, help=f"path to {INCEPTION_FILE} (or its folder)")
    p.add_argument("--gen-fn", default=None, help="module:callable returning G, with G(z) -> B x 3 x H x W in "
                   "[0, 255]; replaces the GEN folder (use with --num-gen and --z-dim)")
    p.add_argument("--num-gen", type=int, default=50_000)
    p.add_argument("--z-dim", type=int, default=512)
    p.add_argument("--kid", action="store_true", help="also report KID (clean-fid kernel_distance on features)")
    p.add_argument("--resize", type=int, default=None, help="custom features: resize to N x N (clean-fid PIL "
                   "bicubic) first; Inception always uses 299")
    p.add_argument("--pre-resize", type=int, default=None, help="protocol resolution: downsample GEN and a "
                   "reference folder to N x N (PIL bicubic, 8-bit) before the feature network's own resizing")
    p.add_argument("--num", type=int, default=None, help="use only the first N images of GEN")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--save-stats", default=None, help="write mu, sigma and features of GEN to this .npz")
    p.add_argument("--json", default=None, help="also write the result to this JSON file")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.gen is None and args.gen_fn is None:
        print("error: give a folder of generated images (or --gen-fn module:callable)", file=sys.stderr)
        return 2
    try:
        if args.features == "inception":
            find_inception(args.inception)      # before importing torch: fail fast with one line
        for p in (args.gen, args.ref):
            if p is not None and p != REAL_DIGITS and not Path(p).exists():
                raise FileNotFoundError(f"error: {p} does not exist")
        if args.ref is None and args.features != "digits" and args.save_stats is None:
            raise ValueError("error: give a reference folder or .npz (or --save-stats to only write statistics)")
        if args.gen_fn is None:
            check_images(Path(args.gen), "generated", args.num)
        if args.ref not in (None, REAL_DIGITS) and Path(args.ref).suffix != ".npz":
            check_images(Path(args.ref), "reference")
    except (MissingWeights, FileNotFoundError, ValueError) as e:
        print(str(e), file=sys.stderr)
        return 2
    import torch

    if not torch.cuda.is_available():
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    gen = args.gen
    if args.gen_fn is not None:
        gen = (import_features(args.gen_fn), args.num_gen, args.z_dim)
    try:
        result = compute(gen, args.ref, args.features, args.kid, args.inception, args.resize, args.batch_size,
                         args.num, args.device, verbose=not args.quiet, save_stats=args.save_stats,
                         pre_resize=args.pre_resize)
    except (ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:   # an image the check could not catch (verify does not decode every format fully)
        folders = " and ".join(str(p) for p in (args.gen, args.ref) if p not in (None, REAL_DIGITS))
        print(f"error: reading the images of {folders} failed: {e}", file=sys.stderr)
        return 2
    if "value" in result:
        print(f"{result['metric']}: {result['value']:.6g}  ({result['num_images']} images)")
    if "kid" in result:
        print(f"KID ({result['features']} features): {result['kid']:.6g}")
    if args.save_stats:
        print(f"statistics written to {args.save_stats}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
