"""One typed configuration for every stage: YAML -> nested dataclasses, `--set key=value` overrides.

Every number a user may change lives here (or, for the phantom generator, in `boneage.phantom`)
with its default. Unknown keys are an error naming the key, so a typo never silently falls back
to a default. Paths are relative to the repository root unless absolute.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from boneage.errors import ConfigError
from boneage.phantom import PhantomConfig

REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class DemoDataConfig:
    """Stage 0: the phantom data set written into `input/`."""

    n_train: int = 400
    n_test: int = 100
    seed: int = 2018
    out_dir: str = ""  # empty: the run's input_dir
    annotated_fraction: float = 0.10  # share of training images with manual masks and points
    workers: int = 2


@dataclass
class InputConfig:
    """The input contract: how bad rows are treated."""

    train_csv: str = ""  # training labels CSV (relative to input_dir); empty: detected from the columns
    test_csv: str = ""  # test list CSV; empty: detected
    drop_bad_train_rows: bool = True  # False: any bad training row is an error
    max_rejected_fraction: float = 0.05  # above this share, stop rather than drop


@dataclass
class SegmentConfig:
    """Stage 1: U-Net hand segmentation with a bootstrap from zero masks."""

    work_size_px: int = 256  # long side of the working resolution (image is padded to a square)
    encoder: str = "resnet18"
    encoder_depth: int = 4
    decoder_channels: list[int] = field(default_factory=lambda: [64, 32, 16, 8])  # narrow: fast on CPU
    weights_path: str = ""  # local state dict to start from; empty: from scratch
    epochs: int = 12
    batch_size: int = 16
    lr: float = 1e-3
    self_training_rounds: int = 1
    epochs_per_round: int = 4
    pseudo_label_min_quality: float = 0.6  # classical / predicted masks below this are not labels
    flag_below_quality: float = 0.5  # masks below this are flagged for a person
    max_train_images: int = 2000
    qc_sheet_n: int = 48
    pseudo_label_min_confidence: float = 0.9  # self-training keeps predictions with mean |2p-1| above this
    smooth_sigma_frac: float = 0.004  # border smoothing of predicted masks, share of the long side
    dilate_frac: float = 0.01  # grow predicted masks by this share of the long side (fingertip soft tissue)
    # the "long side" of the two shares above and of the edge band below is this x the hand's length
    # (masks.hand_scale_px; 1.16 is the median ratio on rsna-half), so that a film rotated onto a larger canvas or
    # cropped gets the same mask (issue 11); 0: the image's long side itself (the masks of models before 2026-11-27)
    hand_scale_ratio: float = 1.16
    # predicted masks at the radiograph's size: clip bright collimation bands (masks.exposed_field), then move
    # the border onto the soft-tissue edge within this many working pixels (masks.refine_edges; 0: off)
    clip_bright_bands: bool = True
    refine_edge_work_px: float = 1.5
    # and deeper than that band where it carves at most this share off the mask: the webs between the fingers,
    # which the network fills at a coarse working size (phantoms: median IoU 0.953 -> 0.975; 0: off)
    refine_carve_frac: float = 0.1
    # then, around each fingertip of the mask (masks.extend_fingertips), grow it into faint soft tissue brighter than
    # the local background by k x its SD (at most this share of the hand length; 0: off), and optionally dilate a
    # cap over each tip by fingertip_margin_frac of the hand scale above (keypoints sit at the soft tissue's very tip;
    # 0.01 gains 0.3-0.9 pp of points inside on rsna-half but costs 0.01 median phantom IoU, so it is off)
    fingertip_grow_frac: float = 0.03
    fingertip_k_noise: float = 3.0
    fingertip_margin_frac: float = 0.0
    # before the fingertip growth, a mask that took in a tray or field box around a small hand (quality below
    # tray_max_quality: straight sides, a mitten) is cut back to the classical first guess when that scores
    # tray_min_gain better and lies inside it (masks.shed_tray; rsna-half: 2 masks above 2.5 x the keypoints' hull
    # -> 0, points inside unchanged)
    tray_fallback: bool = True
    tray_max_quality: float = 0.9
    tray_min_gain: float = 0.1
    predict_batch_size: int = 16
    # the U-Net also reads each radiograph mirrored and the two probability maps are averaged (the mirrored one
    # mirrored back): a flipped film then gets the same mask, flipped (flip stress: 1.06 months median without it,
    # 0.16 with; keypoints.flip_average). Twice the network's time
    flip_tta: bool = True
    # join the two maps by their maximum, not their mean (both give a mirrored film its mirror). The maximum keeps
    # faint fingers one reading misses (rsna-half 7014), but on /tmp/realrun8 it moved rotated, cropped and downscaled
    # films more (stress medians 2.78 / 1.87 / 1.69 months against 2.43 / 1.55 / 1.47) and the self-check's accepted
    # MAE rose from 8.93 to 9.02 (99.1 % accepted against 99.0 %)
    flip_tta_max: bool = False
    amp: bool = True  # inference on CUDA in bf16 autocast and channels-last (CPU: fp32, channels-last as before)
    # threads for the post-processing at each radiograph's own size (OpenCV and numpy release the GIL): on a GPU box
    # it, not the network, bounds stage 1 (bench/stage12_speed.py: 65 ms per image on an H100, about what the
    # post-processing alone takes on one CPU thread)
    post_workers: int = 1
    polarity_retry_quality: float = 0.0  # masks below this (or a negative polarity score) are retried inverted
    upright_retry_deg: float = 35.0  # a mask whose long axis is further off vertical is segmented again upright; 0: off
    # every hand segmented a second time turned upright (fingers up) and cut to its box with this share of its length
    # around it (`segmentation.canonical_frame`): rotated, cropped and downscaled copies of a film then get the same
    # mask (issue 11). The second mask is kept unless its quality falls more than canonical_max_loss below the first's.
    # The first reading then only finds the hand: once (no flip), at canonical_locate_px, no tray cut or fingertips
    canonical_view: bool = True
    canonical_locate_px: int = 0  # the first reading's working size with canonical_view (0: work_size_px)
    canonical_flip_tta: bool = False  # the view read mirrored as well (its right hands are mirrored already)
    canonical_margin_frac: float = 0.08
    canonical_max_loss: float = 0.1
    invert_aug_p: float = 0.5  # share of training samples shown inverted: the U-Net learns both polarities
    aug_rotate_deg: float = 20.0  # training rotations drawn from +-this (180: any orientation)
    # the bootstrap (classical labels, self-training rounds) at this working size (0: work_size_px), then
    # `relabel_epochs` epochs at work_size_px on labels made by the whole stage-1 pipeline at the radiographs' own
    # size (edges refined, fingertips grown; no dilation or margin, or every round would loosen the masks); 0: off.
    # rsna-half, 84 held-out annotated radiographs: 99.39 % of manual points inside with the cpu profile's round,
    # 98.05 % with a 192 px bootstrap alone (bench/notes/segmentation.md)
    bootstrap_work_size_px: int = 0
    relabel_epochs: int = 0


@dataclass
class CleanConfig:
    """Stage 2: keep the hand, black background, contrast equalised inside the hand."""

    clahe_clip_limit: float = 2.0
    clahe_tile_grid: int = 8
    # with > 0: square CLAHE tiles of this share of the hand scale (hand_scale_ratio x the hand's length) instead of
    # the fixed grid, whose tiles grow with the canvas (0.125: the grid's tile on a film of median shape)
    clahe_tile_frac: float = 0.0
    smooth_sigma_frac: float = 0.004  # border smoothing, fraction of the image's long side
    # that long side: this x the hand's length; 0: the image's own (segment.hand_scale_ratio)
    hand_scale_ratio: float = 1.16
    # the hand's percentiles (hand_stretch) from the part of the mask at least this share of that length inside its
    # border (masks.interior): a mask drawn a few pixels wider or narrower then gives the same grey levels; 0: all of it
    stretch_erode_frac: float = 0.0
    min_area_frac: float = 0.03  # a hand smaller than this share of the image is implausible
    max_area_frac: float = 0.95  # a hand larger than this share of the image is implausible
    dilate_frac: float = 0.0  # grow the mask by this share of the long side before cutting the hand out
    min_quality: float = 0.25  # a mask below this quality (masks.mask_quality) is not used: radiograph kept whole
    # estimated pixel noise (grey levels, inside the hand) above which non-local means runs before CLAHE
    # (masks.denoise); 0: never. The 1,000 rsna-half radiographs give 1.3 median, 6.3 at most after the input
    # stretch; sigma-10 noise gives 10-30
    denoise_above_sigma: float = 7.0
    denoise_strength: float = 1.0  # its h = strength x the estimated sigma
    # JPEG block edges in the stretched hand (masks.block_artefacts, clean grey levels) above which the hand is blurred
    # with this sigma before CLAHE; 0: never. Tried on real films (session 11): it doubled the bone age's shift under
    # compression, so it is off and the self-check's compression part judges the edges (predict.block_ok_levels)
    deblock_above: float = 0.0
    deblock_sigma_px: float = 1.5
    # before CLAHE, grey levels stretched so that these percentiles of the hand's own pixels span 0..255
    # (masks.stretch_inside): what lies outside the hand (letters, rulers, the film's range) no longer changes the
    # hand's contrast (stress test, issue 11); [] for none (models trained before 2026-11-27 had none)
    hand_stretch: list[float] = field(default_factory=lambda: [1.0, 99.5])
    workers: int = 1  # radiographs cleaned side by side in threads (stage 2)
    qc_sheet_n: int = 48


@dataclass
class KeypointsConfig:
    """Stage 3: three-point regression CNN, with a geometric bootstrap."""

    input_size_px: int = 128  # square input of the VGG-style network (CPU speed: >= 10 radiographs/s with stage 4)
    filters: list[int] = field(default_factory=lambda: [16, 32, 64, 128, 128])  # one VGG module each
    epochs: int = 20
    batch_size: int = 16
    lr: float = 1e-3
    min_geometric_confidence: float = 0.6  # geometric points above this become pseudo-labels
    min_manual_for_manual_only: int = 200  # with fewer manual points, add geometric pseudo-labels
    point_names: dict[str, str] = field(
        default_factory=lambda: {
            "middle_tip": "middle_tip",
            "thumb_tip": "thumb_tip",
            "capitate": "capitate",
        }
    )
    qc_sheet_n: int = 48
    via_attribute: str = ""  # VIA region attribute holding the point name; empty: any attribute
    fc_units: int = 256  # width of the hidden fully connected layer
    aug_zoom: float = 0.15  # augmentation: zoom range, rotation (degrees), shift (fraction of the input)
    aug_rotate_deg: float = 20.0
    aug_shift: float = 0.08
    # share of training images shown mirrored (points moved with them; the thumb stays the thumb): RSNA hands are
    # nearly all left hands, and a network that saw no right hand put the thumb of a flipped film on the left hand's
    # side, so registration did not mirror it back (stress test, issue 11)
    aug_hflip_p: float = 0.5
    # read every view and its mirror image and average the two answers (the mirror's moved back): a flipped film then
    # gets the same points, mirrored (with segment.flip_tta and the pixel-centre fixes of session 9, 20 hold-out films
    # flipped moved 0.16 months median, against 0.92 before; bench/notes/robustness.md). Needs a network trained with
    # aug_hflip_p > 0
    flip_average: bool = True
    min_train_images: int = 8  # fewer labelled images (manual + pseudo): no network, geometric points only
    max_pseudo_labels: int = 400  # at most this many geometric pseudo-labels (the most confident; CPU time)
    tip_inset_frac: float = 0.03  # geometric: step from the soft-tissue tip toward the bone tip (x tip-palm length)
    capitate_along: float = 0.21  # geometric: capitate beyond the palm centre (x tip-palm length), rsna-half fit
    capitate_across: float = -0.02  # geometric: and across, toward the thumb side (x tip-palm length)
    # the network reads the hand turned upright along the geometric axis (rotation robustness, issue 11);
    # upright_min_confidence above 1 switches this off
    upright_min_confidence: float = 0.5
    upright_min_deg: float = 1.0
    view_margin: float = 0.08  # the network's square: the mask's bounding box plus this share of its long side
    # the network's answer must come back within view_consistent_frac of the hand length when the hand is turned
    # upright along it and read again; else it reads the hand turned by each of these angles and keeps the answer
    # that comes back best (keypoints.consistent_view_points); empty: off
    view_angles_deg: list[float] = field(default_factory=lambda: [float(a) for a in range(0, 360, 30)])
    view_consistent_frac: float = 0.05


@dataclass
class RegisterConfig:
    """Stage 4: similarity transform into the standard canvas, region crops.

    Canvas and boxes are given in full-size canvas pixels and multiplied by `canvas_scale`.
    """

    canvas_scale: float = 0.25
    canvas_h_px: int = 2080
    canvas_w_px: int = 1600
    tip_y_px: float = 100.0  # middle fingertip this far below the top edge
    capitate_from_bottom_px: float = 480.0  # capitate this far above the bottom edge
    regions: dict[str, list[int]] = field(
        default_factory=lambda: {
            "A": [0, 0, 1600, 2080],
            "B": [400, 1300, 1200, 2080],
            "C": [0, 600, 1600, 1500],
        }
    )
    crop_sizes: dict[str, list[int]] = field(  # (height, width) of each region crop written
        default_factory=lambda: {"A": [256, 200], "B": [192, 192], "C": [144, 256]}
    )
    # ablation inputs (issue 8), written beside the region crops, same size as A unless crop_sizes names them:
    # raw = the radiograph as read, clean = the cleaned radiograph (stages 1-2); both padded black to the
    # crop's aspect and resized whole, without registration
    baseline_inputs: list[str] = field(default_factory=list)
    max_hand_length_z: float = 4.0  # hand length this many SDs above the data set's median: fallback
    # and this many below it: infants' hands are far shorter than the median (rsna-half: 11 of 1,000 correct
    # hands of 1-4 year olds at z -4.1 to -5.1); the short side's limit only catches points bunched together
    max_hand_length_z_short: float = 6.5
    qc_sheet_n: int = 48
    min_confidence: float = 0.3  # keypoints below this confidence: mask-based fallback
    thumb_canvas_xy: list[float] = field(default_factory=lambda: [1515.0, 835.0])  # typical thumb tip (rsna-half)
    max_thumb_residual_px: float = 600.0  # registered thumb tip farther than this from typical: flagged
    fallback_hand_width_px: float = 1150.0  # mask fallback: the hand's widest extent maps to this width


@dataclass
class FoldsConfig:
    """Stage 5: stratified folds and an optional hold-out."""

    n_folds: int = 5
    seed: int = 42
    holdout_n: int = 0
    age_bin_months: int = 24


@dataclass
class TrainConfig:
    """Stage 6: the grid of bone age networks trained over folds."""

    regions: list[str] = field(default_factory=lambda: ["A", "B", "C"])
    heads: list[str] = field(default_factory=lambda: ["reg", "cls"])
    sex_modes: list[str] = field(default_factory=lambda: ["sex_input"])
    backbones: list[str] = field(default_factory=lambda: ["vgg"])
    weights_path: str = ""  # local backbone weights for timm models; empty: from scratch
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    vgg_width: float = 1.0  # multiplies the paper's filter counts (32 ... 384)
    vgg_fc: int = 2048
    dropout: float = 0.3
    aug_zoom: float = 0.2  # the paper's ranges
    aug_rotate_deg: float = 20.0
    aug_shift: float = 0.2
    aug_gamma: list[float] = field(default_factory=lambda: [0.8, 1.2])
    aug_brightness: float = 0.1  # brightness and contrast limits (albumentations), 0: off
    # a radiograph at a quarter of its resolution or saved as JPEG gives softer or blockier crops (issue 11's stress
    # test): with probability p, a crop is shrunk by a factor from this range and enlarged back, or JPEG-compressed
    # at a quality from this range; [1, 1] / [100, 100]: off
    aug_downscale: list[float] = field(default_factory=lambda: [1.0, 1.0])
    aug_downscale_p: float = 0.25
    aug_jpeg_quality: list[int] = field(default_factory=lambda: [100, 100])
    aug_jpeg_p: float = 0.25
    cls_ce_weight: float = 1.0
    cls_label_sigma_months: float = 6.0  # soft label width for the classification head
    tta: bool = False  # test-time augmentation: average over tta_views (boneage.training)
    tta_scales: list[float] = field(default_factory=lambda: [1.0, 0.95, 1.05])
    tta_shift: float = 0.0  # with tta: also the crop shifted diagonally by this share of its size, 4 ways
    amp: bool = True  # bf16 autocast on CUDA
    channels_last: bool = True
    compile: bool = False
    num_workers: int = 2
    optimizer: str = "adamw"  # adam or adamw
    schedule: str = "onecycle"  # onecycle or cosine (stepped per batch)
    vgg_pool: str = "flatten"  # flatten (the paper) or avg (global average pooling, any input size)
    input_norm: str = "fixed"  # fixed: (x - 0.5) / 0.25 on [0, 1] pixels; per_image: standardise each crop
    timm_fc: int = 256  # hidden units of the head on a timm backbone; 0: one linear layer
    cls_mae_weight: float = 1.0  # weight of the expected value's MAE (months / 120) in the cls loss
    only_models: list[str] = field(default_factory=list)  # train only these model names; empty: all
    only_folds: list[int] = field(default_factory=list)  # train only these folds; empty: all


@dataclass
class BlendConfig:
    """Stage 7: the linear blend of out-of-fold predictions."""

    method: str = "nnls"  # nnls (non-negative coefficients + intercept) or ridge
    ridge_alpha: float = 1.0
    # a per-sex blend that does worse out of fold than its best model alone is replaced by that model
    fallback_single: bool = True
    # inputs whose models are blended; the ablation's whole-radiograph models (raw, clean) are left out
    regions: list[str] = field(default_factory=lambda: ["A", "B", "C"])
    check_top_n: int = 10  # test cases listed for a person to check
    check_keypoint_confidence: float = 0.5  # test cases with keypoint confidence below this are listed too
    age_band_months: int = 24  # width of the age bands in the report's MAE-by-age plot
    copy_qc: bool = True  # copy QC sheets and resolved configs next to the report (self-contained folder)


@dataclass
class PredictConfig:
    """Single-radiograph assessment and the self-check."""

    min_quality: float = 0.5  # below this overall quality a radiograph is rejected
    # the mask part counts a side as a straight edge when it is straight within this share of the long side (1.5 px
    # at 256 px; stage 1 uses 3, masks.STRAIGHT_TOL_FRAC): at 3 the kinked finger and palm sides of hands filling
    # the film counted, and right masks scored 0 (rsna-half 5916, 14175); knees and tray rims still count
    mask_straight_tol_frac: float = 0.006
    min_hand_area_frac: float = 0.02  # a mask smaller than this share of the image: no hand, never forced
    agreement_scale_months: float = 24.0  # quality part exp(-(sd - ok) / this) for model/fold agreement
    agreement_ok_months: float = 12.0  # model/fold spread up to this: agreement part 1
    residual_scale_frac: float = 0.25  # registration part exp(-(thumb residual - ok) / (full canvas height * this))
    residual_ok_frac: float = 0.1  # thumb residual up to this share of the canvas height: registration part 1
    mask_method_quality: float = 0.6  # registration quality part when it fell back to the mask
    # input normalisation (boneage.assess.normalise_input): polarity turned to normal (masks.normal_polarity) and
    # grey levels stretched so that the 0.5th..99.5th percentiles span 0..255. "stretch": every step sees the
    # stretched image; "segment": only the U-Net does (the clean step gets the unstretched one, as stage 2 made
    # the training crops); "off": neither. "segment" since stage 2 stretches the hand by its own percentiles
    # (clean.hand_stretch): the film-wide stretch before it clipped the brightest bones differently when a letter,
    # a ruler or a crop changed the film's percentiles (the clean hands of 10 hold-out radiographs moved 1.5 / 3.4
    # grey levels median under a letter / a 5 % crop with "segment", 2.9 / 5.0 with "stretch")
    normalise_input: str = "segment"
    # self-check (boneage.assess.quality_score): image-level checks before any network
    max_colourfulness: float = 15.0  # Hasler-Suesstrunk colourfulness of the file; above: a colour photograph
    min_dynamic_range: float = 24.0  # grey levels between the 0.5th and 99.5th percentile; below: blank/saturated
    max_saturated_frac: float = 0.9  # share of pixels >= 250 (or <= 5) above which the image is saturated/empty
    # mask checks (on the U-Net's raw mask and the kept hand component)
    max_second_object_ratio: float = 0.4  # 2nd largest mask component / largest; above: two hands (or two objects)
    min_finger_gaps: int = 1  # deep convexity defects of the hand's outline; below: no fingers (forearm, ...)
    finger_gap_depth_frac: float = 0.06  # a gap is deeper than this share of sqrt(hull area)
    min_hand_span: float = 0.42  # the hand's extent / the image's, along the longer of the two: below, a fragment
    max_hand_aspect: float = 4.5  # long / short side of the hand component's rotated box; above: not a hand
    # a convex, elongated outline (no finger gaps to speak of): a foot, or a mask that missed the fingers
    max_convex_solidity: float = 0.9  # rejected when solidity is above this ...
    max_convex_aspect: float = 1.8  # ... and the aspect above this
    # soft parts beyond the four of quality_parts: agreement between regions and the cls heads' spread
    region_spread_ok_months: float = 24.0  # max - min of the region estimates up to this: part 1
    region_spread_scale_months: float = 36.0  # then exp(-(spread - ok) / this)
    # calibrated instead on the models' own out-of-fold spread, where blend.json has it (stage 7 writes it per
    # sex): part 1 up to that spread's ok quantile, 0.5 at its half quantile (a rejection on this part alone)
    region_spread_calibrated: bool = True
    region_spread_ok_quantile: float = 0.9
    region_spread_half_quantile: float = 0.995
    cls_width_ok_months: float = 30.0  # mean SD of the cls heads' distributions up to this: part 1
    cls_width_scale_months: float = 30.0  # then exp(-(width - ok) / this)
    # when the models' validation widths are known (fold*/pred_val.csv): width / their median instead
    cls_width_ok_ratio: float = 1.3  # up to this ratio: part 1
    cls_width_ratio_scale: float = 0.5  # then exp(-(ratio - ok) / this)
    min_part_quality: float = 0.1  # one part below this rejects on its own
    # pixel noise inside the hand (masks.noise_sigma, grey levels after the input stretch): part 1 up to this
    # (rsna-half: 6.3 at most), then exp(-(sigma - ok) / scale); sigma-10 noise scores 0.37 or less
    # thumb part: depth of the thumb tip inside the outline (distance to the mask's edge / tip-capitate length): a
    # thumb tip lies at the outline's edge (1,000 rsna-half stage-3 points: median 0.029, 99th percentile 0.058);
    # on a foot the network's "thumb" lands inside the outline (0.19-0.26 on the synthetic feet)
    thumb_depth_ok_frac: float = 0.08
    thumb_depth_scale_frac: float = 0.04
    noise_ok_sigma: float = 7.0
    noise_scale_sigma: float = 3.0
    # compression part: JPEG block edges in the clean hand (masks.block_artefacts after the hand's stretch, grey
    # levels): part 1 up to this, then exp(-(step - ok) / scale)
    block_ok_levels: float = 8.0
    block_scale_levels: float = 4.0


@dataclass
class Config:
    """The whole run. `input_dir` ... `submissions_dir` let several runs live side by side."""

    input_dir: str = "input"
    work_dir: str = "work"
    folds_dir: str = "folds"
    oof_dir: str = "oof"
    submissions_dir: str = "submissions"
    seed: int = 0
    device: str = "auto"  # auto, cpu, cuda
    threads: int = 0  # torch threads; 0: torch's default
    input: InputConfig = field(default_factory=InputConfig)
    demo: DemoDataConfig = field(default_factory=DemoDataConfig)
    phantom: PhantomConfig = field(default_factory=PhantomConfig)
    segment: SegmentConfig = field(default_factory=SegmentConfig)
    clean: CleanConfig = field(default_factory=CleanConfig)
    keypoints: KeypointsConfig = field(default_factory=KeypointsConfig)
    register: RegisterConfig = field(default_factory=RegisterConfig)
    folds: FoldsConfig = field(default_factory=FoldsConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    blend: BlendConfig = field(default_factory=BlendConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)

    def path(self, key: str) -> Path:
        """Resolve one of the path keys (`input_dir`, `work_dir`, ...) against the repository."""
        p = Path(getattr(self, key))
        return p if p.is_absolute() else REPO_ROOT / p

    @property
    def input_path(self) -> Path:
        return self.path("input_dir")

    @property
    def work_path(self) -> Path:
        return self.path("work_dir")

    @property
    def folds_path(self) -> Path:
        return self.path("folds_dir")

    @property
    def oof_path(self) -> Path:
        return self.path("oof_dir")

    @property
    def submissions_path(self) -> Path:
        return self.path("submissions_dir")


def _coerce(value, tp, key: str):
    """Turn a YAML value into the annotated type, or raise a ConfigError naming the key."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping, got {value!r}")
        return _build(tp, value, key + ".")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)[:1]
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping, got {value!r}")
        _, val_tp = typing.get_args(tp)
        return {str(k): _coerce(v, val_tp, f"{key}.{k}") for k, v in value.items()}
    if origin in (typing.Union, types.UnionType):
        return value
    try:
        if tp is bool:
            if isinstance(value, str):
                low = value.strip().lower()
                if low in ("true", "yes", "1", "on"):
                    return True
                if low in ("false", "no", "0", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if tp is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if tp is float:
            return float(value)
        if tp is str:
            return "" if value is None else str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"config key '{key}' must be {tp.__name__}, got {value!r}") from None
    return value


def _build(cls, data: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            close = [n for n in names if n.startswith(str(key)[:3])]
            hint = f" (did you mean {', '.join(sorted(close))}?)" if close else ""
            raise ConfigError(f"unknown config key '{prefix}{key}'{hint}")
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"config key '{dotted}': '{p}' is not a section")
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, object]:
    """`key.sub=value` -> (key.sub, YAML-parsed value)."""
    if "=" not in text:
        raise ConfigError(f"--set expects key=value, got '{text}'")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML profile and apply `key=value` overrides (dotted keys reach into sections)."""
    data: dict = {}
    if path:
        p = Path(path)
        if not p.is_absolute() and not p.exists():
            p = REPO_ROOT / p
        if not p.exists():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {p} is not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {p} must hold a mapping at the top level")
    for text in overrides or []:
        key, value = parse_override(text)
        _set_dotted(data, key, value)
    return _build(Config, data)


def config_to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def save_resolved(cfg: Config, path: Path) -> None:
    """Write the resolved config (every default filled in) next to a stage's outputs."""
    from boneage.fileio import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
