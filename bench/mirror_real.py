"""Mirror decisions without manual points on the radiographs of `hand_boxes.csv` with a known side: a chain's
keypoint network and geometric guess on its own clean images and masks (predict.py's path), then stage 4's
registration with manual=False.

    .venv/bin/python bench/mirror_real.py WORK_DIR [CONFIG]      # e.g. /tmp/realrun5/work configs/cpu.yaml
"""
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from boneage.config import load_config  # noqa: E402
from boneage.fileio import read_gray, read_mask  # noqa: E402
from boneage.keypoints import load_keypoint_model, predict_keypoints  # noqa: E402
from boneage.registration import register_radiograph  # noqa: E402

torch.set_num_threads(1)
W = sys.argv[1]
cfg = load_config(sys.argv[2] if len(sys.argv) > 2 else str(REPO / "configs" / "cpu.yaml"))
model = load_keypoint_model(Path(W) / 'models' / 'keypoints', cfg.keypoints, 'cpu')
boxes = pd.read_csv(REPO.parent / 'shared' / 'data' / 'rsna-half' / 'hand_boxes.csv', dtype={'id': str})
side = boxes.groupby('id')['side'].first()
rows = []
for i, s in side.items():
    c, m = read_gray(f'{W}/clean/{i}.png'), read_mask(f'{W}/masks/{i}.png')
    pts, conf, src = predict_keypoints(model, c, m, cfg.keypoints, 'cpu')
    _, row = register_radiograph(c, pts, conf, m, cfg.register)
    rows.append({'id': i, 'truth': s == 'right', 'mirrored': bool(row['mirrored']), 'method': row['method'],
                 'src': src})
d = pd.DataFrame(rows)
wrong = d[d.truth != d.mirrored]
print(f'{len(d) - len(wrong)} of {len(d)} right ({int(d.truth.sum())} mirrored hands); '
      f'methods {d.method.value_counts().to_dict()}')
print(wrong.to_string())
