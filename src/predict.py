"""Assess one hand radiograph (or a folder of them) with the trained models.

    python src/predict.py IMAGE --sex F|M [--chronological-age MONTHS] [--models DIR] [--out DIR] [--force]

IMAGE: a PNG, JPEG or DICOM file, or a folder of them. Sex: `--sex`, else the DICOM's PatientSex; a
radiograph without either is refused. `--models DIR`: a work dir holding `models/` (default: the config's
work_dir); the blend is `--blend FILE`, else `DIR/blend.json`, `DIR/submissions/blend.json`, then the config's
`submissions/blend.json` (see `boneage.assess`). Writes `{out}/{name}.json` (method.md section 5) and
`{out}/{name}.png` (one page) per radiograph; `--out` defaults to `{work_dir}/predict`.

Exit status: 0 all assessed; 2 a bad input or setup (message names the file; no number is written);
3 a radiograph the self-check rejected (no bone age; with --force the number is given, status `forced`,
exit 0). The self-check (`boneage.assess.quality_score`) refuses a colour photograph, a blank or saturated
frame, no hand, two hands, an outline without fingers (forearm, foot, other body parts) and a low quality
score; the first three even with --force (nothing to read), the others give a number with --force, marked.
"""

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from boneage.config import REPO_ROOT, load_config
from boneage.errors import BoneAgeError, InputError
from boneage.fileio import IMAGE_SUFFIXES, _looks_like_dicom, atomic_write_json

log = logging.getLogger("boneage.predict")
HAND_BODY_PARTS = ("HAND", "WRIST", "FINGER", "CARPUS", "MANUS", "BONE AGE", "BONEAGE")
DEFAULT_CONFIG = "configs/demo.yaml"
NEUTRAL_BODY_PARTS = ("", "EXTREMITY", "UPPER EXTREMITY", "UPPER_EXTREMITY", "UPPEREXTREMITY", "ARM", "UNKNOWN")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Bone age of one hand radiograph (or a folder) with the trained models")
    p.add_argument("image", help="PNG, JPEG or DICOM file, or a folder of them")
    p.add_argument("--sex", choices=["F", "M", "f", "m"], help="F or M (default: the DICOM's PatientSex)")
    p.add_argument("--chronological-age", type=float, metavar="MONTHS",
                   help="chronological age in months: adds the difference and the Greulich-Pyle Z-score")
    p.add_argument("--models", metavar="DIR", help="work dir holding models/ (default: the config's work_dir)")
    p.add_argument("--blend", metavar="FILE", help="blend.json (default: DIR/blend.json, then submissions/)")
    p.add_argument("--out", metavar="DIR", help="output folder (default: {work_dir}/predict)")
    p.add_argument("--force", action="store_true", help="give a (clearly marked) bone age even when rejected")
    p.add_argument("--config", default=DEFAULT_CONFIG, help="YAML profile the models were trained with")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p.parse_args(argv)


def list_inputs(path: Path) -> list[Path]:
    if not path.exists():
        raise InputError(f"{path}: not found")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")
                       and (p.suffix.lower() in IMAGE_SUFFIXES or _looks_like_dicom(p)))
        if not files:
            raise InputError(f"{path}: no PNG, JPEG or DICOM files in this folder")
        return files
    return [path]


def read_input(path: Path, sex_arg: str | None):
    """(uint8 image, male, notes) or an InputError naming the file: unreadable, not a hand DICOM, no sex."""
    from boneage.fileio import read_dicom, read_gray

    notes = []
    dicom_sex = ""
    if path.suffix.lower() in (".dcm", ".dicom") or _looks_like_dicom(path):
        image, tags = read_dicom(path)
        part = tags.get("body_part", "").strip().upper()
        if part not in NEUTRAL_BODY_PARTS and not any(h in part for h in HAND_BODY_PARTS):
            raise InputError(f"{path}: DICOM of another body part (BodyPartExamined '{tags['body_part']}'); "
                             "bone age needs a hand/wrist radiograph")
        dicom_sex = tags.get("sex", "").strip().upper()[:1]
        if tags.get("laterality"):
            notes.append(f"DICOM laterality {tags['laterality']}")
    else:
        image = read_gray(path)
    sex = (sex_arg or "").upper() or (dicom_sex if dicom_sex in ("F", "M") else "")
    if not sex:
        raise InputError(f"{path}: sex unknown; pass --sex F or --sex M"
                         + (" (the DICOM has no usable PatientSex)" if dicom_sex or path.suffix.lower() == ".dcm"
                            else ""))
    if sex_arg and dicom_sex in ("F", "M") and dicom_sex != sex:
        notes.append(f"--sex {sex} differs from the DICOM's PatientSex {dicom_sex}; --sex used")
    return image, sex == "M", notes


def file_colourfulness(path: Path) -> float:
    """Colourfulness of a PNG/JPEG as stored (read_gray turns colour to grey, which would hide a photograph);
    0 for a grey file, a DICOM or anything OpenCV cannot read in colour."""
    import cv2
    import numpy as np

    from boneage.assess import colourfulness

    if path.suffix.lower() in (".dcm", ".dicom") or _looks_like_dicom(path):
        return 0.0
    raw = np.fromfile(str(path), dtype=np.uint8)
    img = cv2.imdecode(raw, cv2.IMREAD_COLOR) if raw.size else None
    return 0.0 if img is None else colourfulness(img)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO, format="%(levelname)s %(message)s")
    try:
        cfg_path = args.config
        if cfg_path == DEFAULT_CONFIG and not (REPO_ROOT / cfg_path).exists():
            cfg_path = None  # no demo profile in this checkout: the built-in defaults
        cfg = load_config(cfg_path, args.overrides)
        if args.chronological_age is not None and not (0 <= args.chronological_age <= 300):
            raise InputError(f"--chronological-age {args.chronological_age}: expected months between 0 and 300")
        files = list_inputs(Path(args.image))
    except BoneAgeError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from boneage.assess import assess_image_full, load_models, render_assessment_png, warm_up

    out_dir = Path(args.out) if args.out else cfg.work_path / "predict"
    models = None
    status = 0
    for path in files:
        try:
            image, male, notes = read_input(path, args.sex)
            if models is None:  # loaded once, after the first input is known to be usable
                from boneage.runtime import select_device, setup_torch

                setup_torch(cfg.threads, cfg.seed)
                t0 = time.perf_counter()
                models = load_models(Path(args.models) if args.models else cfg.work_path, cfg,
                                     select_device(cfg.device), Path(args.blend) if args.blend else None)
                warm_up(models, cfg)
                log.info("models loaded in %.1f s from %s (blend %s)", time.perf_counter() - t0, models.models_dir,
                         models.blend_path or "none: equal-weight mean")
            t0 = time.perf_counter()
            result, arrays = assess_image_full(image, male, models, cfg, args.chronological_age, path.stem, args.force,
                                               colourfulness_value=file_colourfulness(path))
            result["file"] = str(path)
            result["seconds"] = round(time.perf_counter() - t0, 3)
            result.setdefault("qc", {}).setdefault("flags", []).extend(notes)
            atomic_write_json(out_dir / f"{path.stem}.json", result)
            render_assessment_png(result, arrays, out_dir / f"{path.stem}.png")
        except BoneAgeError as exc:
            if args.debug:
                raise
            msg = str(exc) if str(path) in str(exc) else f"{path}: {exc}"
            print(f"error: {msg}", file=sys.stderr)
            atomic_write_json(out_dir / f"{path.stem}.json", {"id": path.stem, "file": str(path), "status": "error",
                                                               "error": msg, "bone_age_months": None})
            status = 2
            continue
        if result["status"] == "rejected":
            print(f"rejected: {path}: " + "; ".join(result.get("rejection_reasons", [])) + " (no bone age)",
                  file=sys.stderr)
            status = status or 3
        else:
            line = f"{path}: bone age {result['bone_age_months']:.1f} ± {result['uncertainty_months']:.1f} months"
            if "z_score" in result:
                line += f", Z {result['z_score']:+.2f} ({result['interpretation']})"
            if result["status"] == "forced":
                line = "FORCED (self-check rejected; do not rely on it) " + line
            print(line)
        print(f"  -> {out_dir / (path.stem + '.json')}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
