"""A tiny, learnable detection dataset in COCO layout: red squares and green discs on noise."""
import json
from pathlib import Path

import torch
from torchvision.io import write_png

CLASSES = ["square", "disc"]


def _image(generator: torch.Generator, size: int, objects: int) -> tuple[torch.Tensor, list[dict]]:
    image = (torch.rand(3, size, size, generator=generator) * 60).to(torch.uint8)
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    annotations = []
    for _ in range(objects):
        side = int(torch.randint(size // 5, size // 3, (), generator=generator))
        x, y = (int(v) for v in torch.randint(0, size - side, (2,), generator=generator))
        category = int(torch.randint(0, len(CLASSES), (), generator=generator))
        if category == 0:
            image[:, y:y + side, x:x + side] = torch.tensor([220, 40, 40], dtype=torch.uint8)[:, None, None]
        else:
            radius = side / 2
            inside = (xs - x - radius + 0.5) ** 2 + (ys - y - radius + 0.5) ** 2 <= radius ** 2
            image[:, inside] = torch.tensor([40, 220, 40], dtype=torch.uint8)[:, None]
        annotations.append({"bbox": [x, y, side, side], "category_id": category + 1})
    return image, annotations


def write_synthetic_coco(root: Path, images_per_split: dict[str, int], size: int = 128, seed: int = 0
                         ) -> dict[str, tuple[Path, Path]]:
    """Write `<root>/<split>/*.png` and `<root>/<split>.json`; returns split -> (json, image dir)."""
    generator = torch.Generator().manual_seed(seed)
    layout = {}
    next_id = 1
    for split, count in images_per_split.items():
        image_dir = root / split
        image_dir.mkdir(parents=True, exist_ok=True)
        coco = {"images": [], "annotations": [],
                "categories": [{"id": i + 1, "name": name} for i, name in enumerate(CLASSES)]}
        for index in range(count):
            image, annotations = _image(generator, size, objects=1 + index % 2)
            file_name = f"{split}-{index:03d}.png"
            write_png(image, str(image_dir / file_name))
            image_id = 1000 + index
            coco["images"].append({"id": image_id, "file_name": file_name, "width": size, "height": size})
            for annotation in annotations:
                w, h = annotation["bbox"][2:]
                coco["annotations"].append({**annotation, "id": next_id, "image_id": image_id,
                                            "area": w * h, "iscrowd": 0})
                next_id += 1
        json_path = root / f"{split}.json"
        json_path.write_text(json.dumps(coco))
        layout[split] = (json_path, image_dir)
    return layout


def detection_pairs(generator: torch.Generator, images: int = 2, anchors: int = 3000, classes: int = 4
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels shaped [images, anchors, classes] as a detector's: near the prior-bias init
    (every negative within delta = 1 of every positive, the pruning-free worst case of early
    training), 1 % of the anchors positive for one class, 4 % ignored for all."""
    logits = -4.6 + 0.1 * torch.randn(images, anchors, classes, generator=generator, dtype=torch.float64)
    labels = torch.zeros(images, anchors, classes, dtype=torch.int64)
    anchor_kind = torch.rand(images, anchors, generator=generator)
    positive = anchor_kind < 0.01
    labels[(anchor_kind >= 0.01) & (anchor_kind < 0.05)] = -1
    gt_class = torch.randint(0, classes, (images, anchors), generator=generator)
    labels[positive, gt_class[positive]] = 1
    return logits, labels
